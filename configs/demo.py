"""The whole DiffMix chain on the built-in demo set, on a laptop CPU.

  python -m diffmix_jax.main --config configs/demo.py --workdir runs/demo

Data: 32 generated 256x256 train tiles and 8 test tiles (docs/datasets.md §4), built in seconds.

Measured on the project's 2-core CPU machine (AMD EPYC; 2026-12-05 02:29-02:38 UTC, fresh clone of
f4ce928, cold compilation cache): 8 min 30 s with the install (build 5 s, SDM 93 s, mixing 1 s,
synthesis 47 s, HoVer-Net 341 s for both runs, evaluate 14 s); the same command again returns in
~3 s (every stage says "already done"). XLA compilations are kept in <workdir>/jax_cache, so a
rerun after a kill compiles less.
What to expect:
  - SDM (2.2 M parameters, 180 steps of 4 crops of 48 px): hybrid loss 0.60 at step 10, ~0.015 by
    step 150. The synthetic images (report's synthetic_samples.png) paint nuclei of the mixed
    label's classes where it has them (irregular rare nuclei, dark elongated spindle, large pale
    epithelial) on a smooth pink background; the real stroma's fibres are mostly lost.
  - Mixing: 154 of 689 targets replaced; class entropy 0.833 -> 0.941; 226 synthetic patches (98
    balancing patches holding the 154 replaced nuclei, 128 enlarging).
  - HoVer-Net (tiny, 320 steps of 2 real windows, + 1 synthetic row per step for diffmix), seed 0
    (8 test tiles, 456 nuclei, 77 rare: the test split is rare-enriched): baseline Dice 0.988, PQ
    0.730, F_d 0.895, F_c 0.60 / 0.78 / 0.82 / 0.84 (other, inflammatory, epithelial, spindle);
    diffmix Dice 0.988, PQ 0.742, F_d 0.891, F_c 0.84 / 0.75 / 0.95 / 0.82. One seed's figures
    move by up to ~0.6 between seeds (the baseline's rare F_c is 0 in seed 2): README gives the
    3-seed study.
"""

from configs import common


def get_config():
  c = common.base_config()
  c.name = 'demo'
  c.data.name, c.data.labels = 'demo_nuclei', 'merged'
  c.data.crop_size = 48
  c.data.mpp = 0.25  # The demo nuclei are drawn at CoNSeP's 40x sizes (tfds_builders/demo_nuclei).
  m = c.diffusion.model
  m.image_size = 48
  m.num_channels = 32
  m.num_res_blocks = 1
  m.channel_mult = '1,2,2'
  m.attention_resolutions = '16'
  m.num_head_channels = 32
  m.dtype = 'float32'
  m.remat = False
  m.spade_hidden = 32  # The official 128 dominates the cost of a model this small.
  t = c.diffusion.train
  # 48-px crops at batch 4: ~0.9 s per step on 2 CPU cores (64 px at batch 8 costs 3.7 s).
  t.batch_size = 4
  t.phase1_steps = 150
  t.phase2_steps = 30
  # A 2 M-parameter model learns faster than lr 1e-4 allows; the EMA must forget the random init
  # in 180 steps: 0.9999 keeps 98 % of it (noise), 0.99 16 %, 0.95 1e-4.
  t.phase1_lr, t.phase2_lr = 1e-3, 2e-4
  t.ema_rate = 0.95
  t.checkpoint_every_steps = 60
  t.sample_every_steps = 0  # The report's synthetic_samples.png shows the sampler's output.
  c.sample.patch_size = 48
  c.sample.grid_stride = 208  # Enlarging: 2x2 patches per 256-px tile (128 patches).
  # Balancing: the 98 patches holding every replaced nucleus whole (the corner grid held 1 of 175).
  c.sample.balance_patches = 'cover'
  c.sample.timestep_respacing = 'ddim8'  # 55 %: 4 guided steps from t = 375 (ddim10's: no better).
  c.sample.batch_size = 16
  c.mix.enlarge.frame_margin = 6  # Frame and shifts scaled from 256 px (32 px, -15..14) to 48 px.
  c.mix.enlarge.shift_low, c.mix.enlarge.shift_high = -3, 3
  c.hovernet.model.mode = 'fast'
  # A narrow, shallow HoVer-Net (same geometry as the official fast mode) on 256-px demo tiles.
  c.hovernet.model.width = 16
  c.hovernet.model.encoder_units = (1, 1, 1, 1)
  # Zero-initialised output convs: with the official Kaiming init the 2-channel heads start as noise
  # of std ~1.4 and the HV map needs ~600 steps before the watershed finds a marker; from zero,
  # the test tiles' nuclei are separated after ~150-200 steps (BENCHMARKS.md).
  c.hovernet.model.head_init = 'zeros'
  h = c.hovernet.train
  # Mirror-mode windows at the official step (the fast output, 164 px): 4 per tile, whose outputs
  # cover it (step 256 gave one window whose 164-px output left 59 % of each tile's labels unused).
  h.patch_window = 256
  h.patch_step = 164
  # No phase 1: it freezes the encoder, which only makes sense with ImageNet weights (none here).
  # Small batches buy more steps in the CPU budget (~0.45 s per step of 2); 320 steps (160 left
  # seeds far apart: README); lr 1e-2, then 1e-3 for the last epoch; no augmentation.
  h.phase1_epochs = 0
  h.phase2_epochs = 5
  h.phase1_batch_size = 2
  h.phase2_batch_size = 2
  h.lr = 1e-2
  h.lr_step_epochs = 4
  h.augment = False
  # One synthetic row beside the 2 real tiles of each batch (every arm: the same 320 steps on the same
  # real batches); the 48-px synthetic patches are packed 25 per 240-px mosaic, cut into windows.
  h.synthetic_ratio = 0.5
  # Class-balanced TP cross-entropy (median-frequency weights from the pixel shares of the run's real
  # and synthetic rows): with the official unweighted mean the tiny network labels every nucleus
  # epithelial for its whole budget (F_c 0 / 0 / 0.41 / 0 on the test split, 2026-12-03).
  h.tp_class_weighting = 'median_frequency'
  # One loader thread (4 fought XLA for the 2 cores: 1.1 steps/s against 1.5). A checkpoint every
  # epoch (64 steps, ~40 s of work): each save costs about a second here.
  h.loader_threads = 1
  h.checkpoint_every_epochs = 1
  h.val_tiles = 0  # Validation every epoch would cost ~10 % of the budget; evaluate runs at the end.
  c.eval.batch_size = 8
  # Post-processing for nuclei half CoNSeP's size (inflammatory: median 50 px against 184): kernels
  # and minimum area halved (21 -> 11, 5 -> 3, 10 -> 5). With exact NP/HV maps of the 32 train tiles
  # the official values recover 40 % of inflammatory and 58 % of spindle nuclei, these 79 % and 89 %.
  pp = c.eval.postprocess
  pp.sobel_ksize, pp.marker_open, pp.min_area = 11, 3, 5
  # The baseline model on every synthetic patch cost 266 s for 256 patches on 2 cores (2026-12-03):
  # off here, on in demo_study; --config.eval.synthetic_fidelity=True adds it.
  c.eval.synthetic_fidelity = False
  return c
