"""Every configuration field of diffmix_jax, with its default and a one-line comment.

Experiment configs (`consep.py`, `glysac.py`, `demo.py`, `tiny.py`) call `base_config()` and override
values only. Library code reads fields directly (never `config.get(key, default)`): a missing field is a
bug here. Fields under `diffusion.model` keep the official SDM flag names so settings carry over from the
official `scripts_train/*.sh`.
"""

import ml_collections

# Stage names in the order `main` runs them (docs/design.md §3).
ALL_STAGES = ('build_data', 'diffusion_train', 'mix_labels', 'sample', 'hovernet_train',
              'evaluate', 'report')


def _data(num_classes: ml_collections.FieldReference) -> ml_collections.ConfigDict:
  """`config.data`: data (docs/datasets.md)."""
  d = ml_collections.ConfigDict()
  # TFDS builder: consep | glysac | demo_nuclei | conic | pannuke | nuclei_folder (your own folder).
  d.name = 'consep'
  d.manual_dir = ''  # The dataset's folder as its builder documents it ('' = $DIFFMIX_CONSEP_DIR for consep).
  d.data_dir = ''  # TFDS data_dir for the built dataset ('' = <workdir>/tfds).
  d.labels = 'original'  # CoNSeP/GLySAC label files hold: original ids (merged by us) | merged ids.
  d.train_tiles = ()  # Names of the train tiles to use (() = all).
  d.test_tiles = ()  # Names of the test tiles to use (() = all).
  # Classes incl. background after the merge (CoNSeP 5, GLySAC 4, CoNIC 7, PanNuke 6); must match the
  # dataset's class table (tfds_builders/class_tables.py). 0 = read from it (with class_names (),
  # mix.balance.{rare,common}_classes ()). diffusion.model.num_classes and hovernet.model.nr_types
  # are tied to it (one FieldReference: setting any of the three sets all).
  d.num_classes = num_classes
  d.class_names = ('background', 'other', 'inflammatory', 'epithelial', 'spindle')  # num_classes.
  d.conic = dc = ml_collections.ConfigDict()
  dc.exclude = ()  # CoNIC cohorts left out (e.g. ('consep',): keeps a CoNSeP test set unseen).
  dc.test_fraction = 0.2  # Share of each cohort's source images drawn for the test split.
  dc.split_seed = 0  # Seed of that draw (recorded in the built dataset's metadata).
  d.pannuke = dp = ml_collections.ConfigDict()
  dp.train_folds = (1, 2)  # PanNuke folds (of 1-3) of the train split.
  dp.test_folds = (3,)  # PanNuke folds of the test split (disjoint from train_folds).
  d.crop_size = 256  # Training crop side for the SDM (docs/sdm.md §4.6).
  d.mpp = 0.25  # µm per pixel of the tiles (CoNSeP: 40x, 0.25); whole-slide predict reads slides at it.
  d.num_workers = 0  # grain worker processes (0 = in the main process).
  d.prefetch = 2  # grain prefetch buffer (batches) when num_workers > 0.
  return d


def _mesh() -> ml_collections.ConfigDict:
  """`config.mesh`: device mesh (docs/design.md §5)."""
  m = ml_collections.ConfigDict()
  m.data = -1  # Devices on the `data` axis (-1 = all devices of all hosts).
  m.shard_opt_state = False  # Shard Adam moments and EMA over `data` (ZeRO-1 style) to save memory.
  m.distributed = False  # Call jax.distributed.initialize() (multi-host).
  m.coordinator_address = ''  # host:port of process 0 ('' = auto-detect: TPU VM, Slurm, ...).
  m.num_processes = -1  # Number of processes (-1 = auto-detect).
  m.process_id = -1  # This process's id (-1 = auto-detect).
  m.initialization_timeout = 300  # Seconds to wait for all processes in jax.distributed.initialize.
  m.heartbeat_timeout = 100  # Seconds without a peer's heartbeat before the job fails (no hang).
  return m


def _diffusion(num_classes: ml_collections.FieldReference) -> ml_collections.ConfigDict:
  """`config.diffusion`: SDM (docs/sdm.md §1, official flag names)."""
  diffusion = ml_collections.ConfigDict()
  diffusion.model = sm = ml_collections.ConfigDict()
  sm.image_size = 256  # Training crop / model resolution.
  sm.num_channels = 256  # Base width (model_channels); time embedding is 4x this.
  sm.num_res_blocks = 2  # Encoder res blocks per level (decoder has one more).
  sm.channel_mult = ''  # Comma list of width multipliers ('' = official default for image_size).
  sm.attention_resolutions = '32,16,8'  # Feature-map sides that get self-attention.
  sm.num_heads = 4  # Heads when num_head_channels == -1.
  sm.num_head_channels = 64  # Channels per head (overrides num_heads when > 0).
  sm.resblock_updown = True  # Resample inside residual blocks.
  sm.use_scale_shift_norm = True  # FiLM (scale, shift) from the time embedding.
  sm.learn_sigma = True  # 6 output channels: eps and the variance interpolant.
  sm.num_classes = num_classes  # One-hot width incl. background: data.num_classes (tied).
  sm.no_instance = False  # False: append the instance-edge channel to the condition.
  sm.dropout = 0.0  # Dropout in res blocks (official 0).
  sm.dtype = 'bfloat16'  # Compute dtype of convs/matmuls (params stay float32).
  sm.remat = True  # Rematerialise every res/attention block in the backward pass.
  sm.spade_hidden = 128  # Width of SPADE's shared conv (official 128; smaller only for CPU demos).

  diffusion.schedule = ds = ml_collections.ConfigDict()
  ds.diffusion_steps = 1000  # Length T of the forward process.
  ds.noise_schedule = 'linear'  # Beta schedule (only 'linear' is used by DiffMix).

  diffusion.train = dt = ml_collections.ConfigDict()
  dt.batch_size = 16  # Global batch (split over the data axis).
  dt.phase1_steps = 5900  # Conditional pre-training steps (docs/sdm.md §4.2).
  dt.phase2_steps = 4100  # Classifier-free fine-tuning steps.
  dt.phase1_lr = 1e-4  # Constant Adam learning rate in phase 1.
  dt.phase2_lr = 2e-5  # Constant Adam learning rate in phase 2.
  dt.phase1_drop_rate = 0.0  # Probability of dropping the whole condition in phase 1.
  dt.phase2_drop_rate = 0.2  # Probability of dropping the whole condition in phase 2.
  dt.ema_rate = 0.9999  # EMA decay, applied after every step.
  dt.log_every_steps = 10  # Scalars (means over the N steps) to TensorBoard every N steps.
  dt.checkpoint_every_steps = 500  # Orbax save every N steps (and at each phase end).
  dt.keep_checkpoints = 3  # Checkpoints kept by the manager.
  dt.sample_every_steps = 2000  # EMA sample grid every N steps (0 = never).
  dt.sample_respacing = 'ddim25'  # Respacing of the preview sampler.
  return diffusion


def _mix() -> ml_collections.ConfigDict:
  """`config.mix`: label mixing (docs/method.md §2-§3)."""
  mix = ml_collections.ConfigDict()
  mix.num_workers = 0  # Threads over tiles (0 = serial); outputs never depend on it (docs/method.md §2.4 F8).
  mix.preview_tiles = 3  # Tiles drawn in mixed_labels/preview.png.
  mix.balance = mb = ml_collections.ConfigDict()
  mb.rare_classes = (1,)  # Rare class ids (donors).
  mb.common_classes = (2, 3, 4)  # Common class ids (targets), in official order.
  mb.target_fraction = 0.8  # Targets per tile = floor(fraction * eligible common nuclei) (docs/method.md §2.2).
  mb.area_ratio = 2.3  # Donor fits when dilated target area >= area_ratio * donor area (docs/method.md §2.2).
  mb.dilation_iterations = 2  # Dilations of the target mask (4-connected cross) for its area.
  mb.border_margin = 30  # Min centroid distance (px) from every tile edge, targets and donors.
  mb.paste_mode = 'overwrite'  # overwrite (official, covers neighbours) | clip (background only).
  mb.max_replacements_per_tile = ml_collections.config_dict.placeholder(int)  # None = no cap (F9).
  mix.enlarge = me = ml_collections.ConfigDict()
  me.preset = 'recovered'  # recovered (docs/method.md §3.3: fields below) | author_issue3 (all, ±3 px).
  me.frame_margin = 32  # Nuclei touching this frame of a patch stay in place (docs/method.md §3.2).
  me.axis_probability = 0.3  # Probability that one axis of an interior nucleus is shifted.
  me.shift_low = -15  # Smallest shift per axis in px (inclusive).
  me.shift_high = 14  # Largest shift per axis in px (inclusive; official randint excludes 15).
  me.collision = 'overwrite'  # overwrite (official, later ids win) | reject (no move onto others).
  return mix


def _sample() -> ml_collections.ConfigDict:
  """`config.sample`: synthesis (docs/method.md §4, docs/sdm.md §3.8-§3.10)."""
  sp = ml_collections.ConfigDict()
  sp.params_path = ''  # Converted official EMA params ('' = EMA from <workdir>/diffusion).
  sp.timestep_respacing = 'ddim100'  # Respaced grid of the DDIM sampler.
  sp.percent = 55  # Partial-noise start, percent of the respaced grid.
  sp.official_truncation = False  # Reproduce the official float truncation of the percent rule.
  sp.guidance = 1.5  # Classifier-free guidance scale s (guidance only when s > 1).
  sp.patch_size = 256  # Side of a synthesised patch.
  sp.grid_stride = 76  # Stride of the patch grid over a tile (10x10 per 1000^2 tile).
  # Balancing patches: 'grid' (official: every grid patch) | 'cover' (only the few patches that
  # hold every replaced nucleus whole, picked from positions every cover_stride px).
  sp.balance_patches = 'grid'
  sp.cover_stride = 8
  sp.batch_size = 8  # Patches per device batch (cond+uncond run as 2x this).
  sp.shard_size = 64  # Patches per resumable output shard.
  return sp


def _hovernet(num_classes: ml_collections.FieldReference) -> ml_collections.ConfigDict:
  """`config.hovernet`: HoVer-Net (docs/hovernet.md)."""
  hovernet = ml_collections.ConfigDict()
  hovernet.model = hm = ml_collections.ConfigDict()
  hm.mode = 'original'  # original (270->80) | fast (256->164).
  hm.nr_types = num_classes  # Type classes incl. background: data.num_classes (tied).
  hm.encoder_units = (3, 4, 6, 3)  # Residual units per encoder group (official ResNet-50 layout).
  hm.decoder_units = (8, 4)  # Dense units of the u3, u2 decoder levels (official 8, 4).
  hm.width = 1  # Divisor of every channel count: 1 = official network, 16 = tiny (tests).
  hm.split_grouped_convs = True  # Grouped convs as per-group convs (XLA CPU's grouped backward is slow).
  hm.head_init = 'kaiming'  # Output 1x1 convs: kaiming (official) | zeros (learns far faster when short).
  hovernet.train = ht = ml_collections.ConfigDict()
  # Arms (diffmix_jax/core/arms.py): baseline (real only) | balancing | enlarging (real + synthetics of
  # that mixing kind) | diffmix (real + both); each trained once per HoVer-Net seed in `seeds`.
  ht.runs = ('baseline', 'diffmix')
  ht.seeds = (0,)  # HoVer-Net seeds: init, batch order, augmentation; SDM unchanged.
  ht.synthetic_dir = ''  # Images/*.png + Labels/*.mat ('' = <workdir>/synthetic/consep_format).
  # Synthetic rows per real row of each batch, added to the real batch (same steps and real batches
  # in every arm); -1 = enough rows that every synthetic item is seen once per epoch.
  ht.synthetic_ratio = -1.0
  ht.patch_window = 540  # Mirror-mode training patch side (docs/hovernet.md §6.3).
  ht.patch_step = 164  # Mirror-mode training patch stride (49 patches per 1000^2 tile).
  ht.augment = True  # Shape + intensity augmentation (docs/hovernet.md §2.2-§2.3); False = centre crop only.
  # ImageNet encoder file ('' = none): .tar/.pth ({'desc': state dict} or a bare one) or .npz with
  # the PyTorch HoVer-Net names; loaded onto conv0, d0-d3 at init (docs/hovernet.md §3.3). Phase 1 needs it.
  ht.pretrained = ''
  ht.phase1_epochs = 50  # Epochs with the encoder frozen (docs/hovernet.md §3.2).
  ht.phase2_epochs = 50  # Epochs with everything trainable (fresh Adam, restarted schedule).
  ht.phase1_batch_size = 16  # Global batch in phase 1 (official 16 per GPU).
  ht.phase2_batch_size = 4  # Global batch in phase 2 (official 4 per GPU).
  ht.lr = 1e-4  # Adam learning rate at the start of each phase.
  ht.lr_step_epochs = 25  # StepLR step (epochs within a phase).
  ht.lr_gamma = 0.1  # StepLR factor.
  ht.mse_weight = 1.0  # Weight of the HV MSE term (PyTorch repo 1; TF original 2).
  ht.tp_class_weighting = 'none'  # TP CE: none (official mean) | median_frequency (class-balanced).
  ht.phase1_freeze_bn_stats = False  # Keep frozen-encoder BN running stats fixed (reference: False).
  ht.loader_threads = 4  # Host threads preparing batches (augmentation, targets).
  ht.log_every_steps = 20  # Scalars (interval means) to TensorBoard every N steps and epoch end.
  ht.checkpoint_every_epochs = 1  # Orbax save every N epochs (and at each phase end).
  ht.keep_checkpoints = 2  # Checkpoints kept per run.
  ht.val_tiles = 2  # Test tiles validated (tiled inference + metrics) per epoch (0 = none).
  ht.val_every_epochs = 1  # Validation every N epochs of a phase.
  return hovernet


def _eval() -> ml_collections.ConfigDict:
  """`config.eval`: evaluation (docs/hovernet.md §4-§5, §7)."""
  ev = ml_collections.ConfigDict()
  ev.match_radius = 12  # Centroid pairing radius in pixels (inclusive).
  ev.f_c_weights = (2.0, 2.0, 1.0, 1.0)  # Weights of F_c terms (official).
  ev.batch_size = 8  # Patches per jitted tiled-inference call (multiple of the local devices).
  # Also score the baseline model on every synthetic patch against its own labels (report's
  # synthetic_fidelity): does the SDM render each class recognisably?
  ev.synthetic_fidelity = True
  # Post-processing (docs/hovernet.md §4.1; `metrics.postprocess.Params`): the official values, set for
  # 40x CoNSeP nuclei. With exact NP/HV maps of 5 CoNSeP train tiles they recover 90-98 % of each
  # class's nuclei (IoU > 0.5); smaller nuclei need a smaller opening (configs/demo.py).
  ev.postprocess = ml_collections.ConfigDict({
      'np_threshold': 0.5, 'edge_threshold': 0.4, 'min_area': 10, 'sobel_ksize': 21,
      'marker_open': 5})
  return ev


def stage_names(stages: str) -> list[str]:
  """The stages of a `stages` value, in order: 'sample, evaluate' -> ['sample', 'evaluate']."""
  return [s.strip() for s in stages.split(',') if s.strip()]


def set_classes(c: ml_collections.ConfigDict, table) -> None:
  """Sets every class field of config `c` from a `tfds_builders.class_tables.ClassTable`."""
  c.data.num_classes = table.num_classes  # diffusion.model.num_classes, nr_types: tied.
  c.data.class_names = tuple(table.names)
  c.mix.balance.rare_classes = tuple(table.rare)
  c.mix.balance.common_classes = tuple(table.common)


def base_config() -> ml_collections.ConfigDict:
  """Returns the full default config (CoNSeP-like values, paper settings)."""
  c = ml_collections.ConfigDict()
  c.name = 'base'  # Name of the experiment, shown in logs and the report.
  c.seed = 0  # Master seed; every random stream is derived from it by fold-in.
  # Comma list of stages to run, in order. A string, not a tuple, so that the command line's
  # --config.stages=sample,evaluate selects two stages (a tuple flag would read one 'sample,evaluate').
  c.stages = ','.join(ALL_STAGES)
  c.compilation_cache = True  # XLA compilations in <workdir>/jax_cache ($JAX_COMPILATION_CACHE_DIR wins).
  num_classes = ml_collections.FieldReference(5, field_type=int)
  c.data = _data(num_classes)
  c.mesh = _mesh()
  c.diffusion = _diffusion(num_classes)
  c.mix = _mix()
  c.sample = _sample()
  c.hovernet = _hovernet(num_classes)
  c.eval = _eval()
  return c
