"""The base of the datasets of 256x256 patches (CoNIC, PanNuke): the paper's recipe, 256-px geometry.

One synthesis patch per tile (the tile is the patch) and one HoVer-Net training window per tile,
mirror-padded by 32 px a side so that the shape augmentation's crops stay inside real content.
No 1000^2 tile anywhere.
"""

from configs import common


def set_patch_geometry(c):
  """Sets the 256-px patch geometry on config `c` in place."""
  c.data.crop_size = 256
  c.diffusion.model.image_size = 256
  c.sample.patch_size = 256
  c.sample.grid_stride = 256  # One patch per 256-px tile.
  c.hovernet.train.patch_window = 320  # Original mode reads 270 px; one window per tile.
  c.hovernet.train.patch_step = 256


def patch_dataset_config(dataset: str, table):
  """The config of builder `dataset` with the class fields of `table` (a ClassTable)."""
  c = common.base_config()
  c.name = c.data.name = dataset
  common.set_classes(c, table)
  set_patch_geometry(c)
  return c
