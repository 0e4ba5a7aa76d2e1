"""GLySAC with the paper's settings (docs/sdm.md §1, docs/hovernet.md §3, docs/method.md).

  python -m diffmix_jax.main --config configs/glysac.py --workdir runs/glysac \
      --config.data.manual_dir=/path/to/GLySAC \
      --config.hovernet.train.pretrained=/path/to/ImageNet-ResNet50-Preact_pytorch.tar

The ImageNet encoder file is needed as for configs/consep.py (see there), or
--config.hovernet.train.phase1_epochs=0.

Raw GLySAC ids are merged {1,2,9,10} -> 1, {4,5,6,7} -> 2, {3,8} -> 3 (class names inferred, see
docs/method.md §1). Guidance 2.0 as in the authors' GLySAC test line. Hardware and expected numbers
as for configs/consep.py.
"""

from configs import common


def get_config():
  c = common.base_config()
  c.name = 'glysac'
  c.data.name = 'glysac'
  c.data.labels = 'original'
  c.data.num_classes = 4  # diffusion.model.num_classes and hovernet.model.nr_types follow.
  c.data.class_names = ('background', 'miscellaneous', 'lymphocyte', 'epithelial')
  c.mix.balance.rare_classes = (1,)
  c.mix.balance.common_classes = (2, 3)
  c.diffusion.train.phase1_steps = 9480
  c.diffusion.train.phase2_steps = 720
  c.diffusion.train.checkpoint_every_steps = 480
  c.sample.guidance = 2.0
  return c
