"""CoNIC (Lizard colon patches, 6 classes) with the paper's DiffMix settings on 256x256 patches.

  python -m diffmix_jax.main --config configs/conic.py --workdir runs/conic \
      --config.data.manual_dir=/path/to/conic \
      --config.hovernet.train.pretrained=/path/to/ImageNet-ResNet50-Preact_pytorch.tar

`manual_dir` holds the release's images.npy, labels.npy and patch_info.csv. CoNIC has no test
split: build_data draws one by source image, 20 % of each cohort's images (seed
data.conic.split_seed), and records it in build_data/summary.json. CoNIC contains CoNSeP's
images: add --config.data.conic.exclude=consep to keep a CoNSeP test set unseen.

Rare classes (balancing donors): neutrophil and eosinophil, the two smallest of the release's class
counts (build_data prints them); common: epithelial, lymphocyte, plasma, connective.
"""

from configs import patches256
from tfds_builders import class_tables


def get_config():
  return patches256.patch_dataset_config('conic', class_tables.CONIC)
