"""Geometry shared by the datasets of 256x256 patches (CoNIC, PanNuke): no 1000^2 tile anywhere.

One synthesis patch per tile (the tile is the patch) and one HoVer-Net training window per tile,
mirror-padded by 32 px a side so that the shape augmentation's crops stay inside real content.
"""


def set_patch_geometry(c):
  """Sets the 256-px patch geometry on config `c` in place."""
  c.data.crop_size = 256
  c.diffusion.model.image_size = 256
  c.sample.patch_size = 256
  c.sample.grid_stride = 256  # One patch per 256-px tile.
  c.hovernet.train.patch_window = 320  # Original mode reads 270 px; one window per tile.
  c.hovernet.train.patch_step = 256
