"""PanNuke (19 tissues, 5 classes, 3 folds) with the paper's DiffMix settings on 256x256 patches.

  python -m diffmix_jax.main --config configs/pannuke.py --workdir runs/pannuke \
      --config.data.manual_dir=/path/to/pannuke \
      --config.hovernet.train.pretrained=/path/to/ImageNet-ResNet50-Preact_pytorch.tar

`manual_dir` holds 'Fold 1/', 'Fold 2/', 'Fold 3/' as released; folds 1 + 2 train and 3 test by
default (data.pannuke.train_folds / test_folds: run the three rotations for PanNuke's protocol).
`evaluate` adds PanNuke's mPQ and bPQ per tissue to every JSON.

Rare class (balancing donor): dead cells, by far the smallest of PanNuke's class counts (build_data
prints them); common: neoplastic, inflammatory, connective, epithelial.
"""

from configs import common
from configs import patches256
from tfds_builders import class_tables


def get_config():
  c = common.base_config()
  c.name = 'pannuke'
  c.data.name = 'pannuke'
  t = class_tables.PANNUKE
  c.data.num_classes = c.diffusion.model.num_classes = c.hovernet.model.nr_types = t.num_classes
  c.data.class_names = ','.join(t.names)
  c.mix.balance.rare_classes = ','.join(map(str, t.rare))
  c.mix.balance.common_classes = ','.join(map(str, t.common))
  patches256.set_patch_geometry(c)
  return c
