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

from configs import patches256
from tfds_builders import class_tables


def get_config():
  return patches256.patch_dataset_config('pannuke', class_tables.PANNUKE)
