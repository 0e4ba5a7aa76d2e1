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

from configs import common
from configs import patches256
from tfds_builders import class_tables


def get_config():
  c = common.base_config()
  c.name = 'conic'
  c.data.name = 'conic'
  t = class_tables.CONIC
  c.data.num_classes = c.diffusion.model.num_classes = c.hovernet.model.nr_types = t.num_classes
  c.data.class_names = ','.join(t.names)
  c.mix.balance.rare_classes = ','.join(map(str, t.rare))
  c.mix.balance.common_classes = ','.join(map(str, t.common))
  patches256.set_patch_geometry(c)
  return c
