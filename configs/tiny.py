"""The smallest config that exercises every stage: for tests (seconds per stage on 2 CPU cores).

  python -m diffmix_jax.main --config configs/tiny.py --workdir /tmp/tiny

Numbers from it mean nothing; it checks plumbing, files, resumption and determinism.
"""

from configs import demo


def get_config():
  c = demo.get_config()
  c.name = 'tiny'
  # A one-level SDM on 16-px crops (attention at that level): the stage and multi-process tests
  # check plumbing, and this model compiles in half the time of a two-level 32-px one. The UNet's
  # down/up-sampling blocks are covered by tests/sdm/unet_test.py.
  c.data.crop_size = 16
  m = c.diffusion.model
  m.image_size = 16
  m.num_channels = 32
  m.num_res_blocks = 1
  m.channel_mult = '1'
  m.attention_resolutions = '16'
  m.num_head_channels = 32
  t = c.diffusion.train
  t.batch_size = 8
  t.phase1_steps = 8  # Long enough for the tests to kill a run between checkpoints.
  t.phase2_steps = 4
  t.phase1_lr = 1e-4  # The paper's rates, not the demo's: the device-count tests compare params.
  t.phase2_lr = 2e-5
  t.ema_rate = 0.9999
  t.log_every_steps = 1
  t.checkpoint_every_steps = 4
  t.sample_every_steps = 6
  c.sample.patch_size = 16
  c.sample.grid_stride = 256  # One patch per tile: 64 items (balancing + enlarging).
  c.sample.balance_patches = 'grid'  # The demo's 'cover': few 16-px patches hold a whole nucleus.
  c.sample.timestep_respacing = 'ddim10'
  c.sample.batch_size = 2  # Per device: 16 patches per render call on 8 test devices.
  c.sample.shard_size = 8  # 8 shards: the kill test stops the stage part-way.
  c.mix.enlarge.frame_margin = 4
  c.mix.enlarge.shift_low = -2
  c.mix.enlarge.shift_high = 1
  hm, h = c.hovernet.model, c.hovernet.train
  hm.width = 16  # Tiny HoVer-Net: channels / 16, one unit per encoder group.
  hm.encoder_units = (1, 1, 1, 1)
  hm.decoder_units = (1, 1)  # One dense unit per level (official 8, 4): a third of the compile time.
  # The official init, not the demo's zero heads: an untrained tiny network then finds nuclei, so
  # the plumbing tests (multi-process evaluate) post-process non-empty predictions.
  hm.head_init = 'kaiming'
  h.patch_window = 256  # One 256-px window per demo tile.
  h.patch_step = 256
  # Phase 2 only, as in the demo: the frozen-encoder phase 1 (its step, checkpoint and resume into
  # phase 2) is covered by tests/stages/hovernet_train_test.py, and through `main` it cost the chain test
  # a compile and 40 more windows per run.
  h.phase1_epochs = 0
  h.phase2_epochs = 1
  h.phase1_batch_size = 8
  h.phase2_batch_size = 16
  h.lr = 5e-4
  h.lr_step_epochs = 2
  h.augment = True  # The tests exercise the augmentation path the demo switches off.
  h.synthetic_ratio = 0.5  # 8 synthetic rows beside the 16 real ones of each batch.
  h.log_every_steps = 2
  h.val_tiles = 0  # Validation is covered by tests/stages/hovernet_train_test.py.
  h.loader_threads = 2
  c.eval.synthetic_fidelity = True  # The demo skips it; 64 patches of 16 px cost seconds here.
  return c
