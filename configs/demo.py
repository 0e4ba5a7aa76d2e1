"""The whole DiffMix chain on the built-in demo set, on a laptop CPU.

  python -m diffmix_jax.main --config configs/demo.py --workdir runs/demo

Data: 32 generated 256x256 train tiles and 8 test tiles (datasets.md §4), built in seconds. Stages that
are not implemented yet stop the run with a NotImplementedError naming their issue. Model sizes, step
counts, the measured time and the numbers to expect are set by the end-to-end issue.
"""

from configs import common


def get_config():
  c = common.base_config()
  c.name = 'demo'
  c.data.name = 'demo_nuclei'
  c.data.labels = 'merged'
  c.data.crop_size = 64
  m = c.diffusion.model
  m.image_size = 64
  m.num_channels = 32
  m.num_res_blocks = 1
  m.channel_mult = '1,2,2'
  m.attention_resolutions = '16'
  m.num_head_channels = 32
  m.dtype = 'float32'
  m.remat = False
  m.spade_hidden = 32  # The official 128 dominates the cost of a model this small.
  t = c.diffusion.train
  t.batch_size = 8
  t.phase1_steps = 1500
  t.phase2_steps = 300
  t.checkpoint_every_steps = 100
  t.sample_every_steps = 500
  c.sample.patch_size = 64
  c.sample.grid_stride = 64
  c.sample.timestep_respacing = 'ddim50'
  c.sample.batch_size = 16
  # Enlarging on 64-px patches: a frame and shifts scaled from the 256-px recipe (32 px, -15..14).
  c.mix.enlarge.frame_margin = 8
  c.mix.enlarge.shift_low = -4
  c.mix.enlarge.shift_high = 3
  c.hovernet.model.mode = 'fast'
  # A narrow, shallow HoVer-Net (same geometry as the official fast mode) on 256-px demo tiles; CPU
  # minutes per run. Sizes and step counts are to be tuned by the end-to-end issue.
  c.hovernet.model.width = 16
  c.hovernet.model.encoder_units = '1,1,1,1'
  h = c.hovernet.train
  h.patch_window = 256  # One window per 256-px demo tile.
  h.patch_step = 256
  h.phase1_epochs = 2
  h.phase2_epochs = 2
  h.phase1_batch_size = 8
  h.phase2_batch_size = 8
  h.lr = 5e-4
  h.lr_step_epochs = 2
  h.val_tiles = 1
  c.eval.batch_size = 8
  return c
