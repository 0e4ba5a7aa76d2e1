"""The whole chain on real CoNSeP at smoke scale: the paper's geometry, tiny networks, a few steps.

  DIFFMIX_CONSEP_DIR=/path/to/CoNSeP python -m diffmix_jax.main --config configs/consep_smoke.py \
      --workdir runs/consep_smoke

What a user with a GPU runs first, in minutes on a CPU, before hours of `configs/consep.py`: real
1000^2 tiles (merged labels, as in ../shared/data/consep; use --config.data.labels=original for
the original CoNSeP release), SDM crops and synthetic patches of 256 px on the official patch grid
(every 5th point of the stride-76 grid: 4 patches per tile and mixing kind), HoVer-Net `original`
mode (270 -> 80) on 540-px mirror windows at stride 164 (49 per tile), tiled evaluation on whole
1000^2 test tiles (169 patches each). The networks are tiny and train a few steps: the numbers
mean nothing, the files and shapes are the check. No ImageNet encoder here, so no phase 1.

Tiles: one train tile holding all four classes (train_24: 54 other, 26 inflammatory, 223
epithelial, 464 spindle nuclei) and one test tile holding all four (test_4: 50, 5, 304, 59).
`tests/e2e/consep_smoke_test.py` runs it through `main` when DIFFMIX_CONSEP_DIR is set (one
HoVer-Net run there). Measured on the project's 2-core CPU (2026-12-06, cold compilation cache, one
`main` per stage): 3 min 48 s (build 12 s, SDM 68 s, synthesis 31 s, HoVer-Net 54 s for both runs,
evaluate 52 s with the synthetic fidelity); the same command again: 4 s.
"""

from configs import consep


def get_config():
  c = consep.get_config()
  c.name = 'consep_smoke'
  c.data.labels = 'merged'
  c.data.train_tiles = ('train_24',)
  c.data.test_tiles = ('test_4',)
  c.mesh.data = 1  # One device: the smoke check runs anywhere, results identical.
  m = c.diffusion.model  # A four-level 32-channel UNet at the paper's 256 px.
  m.num_channels = 32
  m.num_res_blocks = 1
  m.channel_mult = '1,1,2,2'
  m.attention_resolutions = '32'
  m.num_head_channels = 32
  m.spade_hidden = 32
  m.dtype = 'float32'
  m.remat = False
  t = c.diffusion.train
  t.batch_size = 1
  t.phase1_steps = 2
  t.phase2_steps = 1
  t.checkpoint_every_steps = 2
  t.log_every_steps = 1
  t.sample_every_steps = 0
  s = c.sample
  s.grid_stride = 380  # Rows and columns 0 and 380 of the official stride-76 grid.
  s.timestep_respacing = 'ddim4'  # 55 %: 2 guided steps.
  s.batch_size = 4
  s.shard_size = 4
  hm, h = c.hovernet.model, c.hovernet.train
  hm.mode = 'original'
  hm.width = 16
  hm.encoder_units = (1, 1, 1, 1)
  hm.decoder_units = (1, 1)
  hm.head_init = 'kaiming'  # The official init: untrained, it finds nuclei, so the real-data
  # post-processing and metrics run on non-empty predictions (zero heads predict none in 7 steps).
  h.phase1_epochs = 0  # No ImageNet encoder file in a smoke check.
  h.phase2_epochs = 1
  h.phase2_batch_size = 7  # 49 windows of the train tile: 7 steps (+ synthetic rows for diffmix).
  h.synthetic_ratio = 2 / 7  # 2 synthetic rows per step: the 8 patches packed into windows.
  h.augment = True
  h.loader_threads = 2
  h.val_tiles = 0
  h.checkpoint_every_epochs = 1
  c.eval.batch_size = 13  # 169 patches per 1000^2 tile in 13 calls.
  c.eval.synthetic_fidelity = True  # The baseline on each 256-px synthetic patch.
  return c
