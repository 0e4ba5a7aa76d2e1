"""Your own nuclei dataset: a folder with classes.json (README "Your own data").

  python -m diffmix_jax.main --config configs/folder_example.py --workdir runs/mine \
      --config.data.manual_dir=/path/to/my_nuclei \
      --config.hovernet.train.pretrained=/path/to/ImageNet-ResNet50-Preact_pytorch.tar

The class count, names, rare and common classes are left to the folder's classes.json (the 0 and ()
below): `main` reads the table before any stage runs (from the built dataset's summary once built)
and fills them; a class count set here must agree with it, names, rare and common classes set here
replace the table's. Everything else is the paper's recipe for
1000^2 tiles at 40x (configs/consep.py); for tiles of 256 px take the geometry of configs/conic.py
(configs/patches256.py). The tiles may have any size >= the patch sizes.
"""

from configs import common


def get_config():
  c = common.base_config()
  c.name = 'folder_example'
  c.data.name = 'nuclei_folder'
  c.data.num_classes = 0  # 0 / (): from classes.json (diffmix_jax/data/datasets.py).
  c.data.class_names = ()
  c.mix.balance.rare_classes = ()
  c.mix.balance.common_classes = ()
  return c
