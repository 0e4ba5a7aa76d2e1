"""CoNSeP with the paper's settings (docs/sdm.md §1, docs/hovernet.md §3, docs/method.md).

  python -m diffmix_jax.main --config configs/consep.py --workdir runs/consep \
      --config.data.manual_dir=/path/to/CoNSeP \
      --config.hovernet.train.pretrained=/path/to/ImageNet-ResNet50-Preact_pytorch.tar

HoVer-Net phase 1 (50 epochs) trains the decoders on a frozen encoder, so it starts from the
ImageNet pre-activation ResNet-50 of the official training (the `.tar` linked from the HoVer-Net
README, or a `.npz`/torch state dict with the same PyTorch names); `main` refuses phase 1 without
it. No file at hand: add --config.hovernet.train.phase1_epochs=0 to train everything from scratch
(not the paper's recipe).

Use --config.data.labels=merged for a copy whose type_map already holds the 4 merged classes (such as
the rebuilt copy in ../shared/data/consep). Hardware: one 80 GB GPU (H100/A100) or a TPU slice. The
expected times and headline numbers are filled in by the end-to-end issue once measured; the paper's
numbers are in docs/method.md §6.
"""

from configs import common


def get_config():
  c = common.base_config()
  c.name = 'consep'
  c.data.name = 'consep'
  c.data.labels = 'original'
  c.data.num_classes = 5  # diffusion.model.num_classes and hovernet.model.nr_types follow.
  c.data.class_names = ('background', 'other', 'inflammatory', 'epithelial', 'spindle')
  c.mix.balance.rare_classes = (1,)
  c.mix.balance.common_classes = (2, 3, 4)
  c.sample.guidance = 1.5
  return c
