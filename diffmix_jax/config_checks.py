"""Validation of config values: every bad value is an error naming the field and the expected form."""

import os

import ml_collections

from configs import common
from diffmix_jax.core import arms
from tfds_builders import raw_folders
from tfds_builders.demo_nuclei import generate as demo_tiles
from diffmix_jax.data import input_pipeline


def _ints(text: str, field: str) -> list[int]:
  try:
    return [int(v) for v in text.split(',') if v.strip()]
  except ValueError:
    raise ValueError(f'config.{field}={text!r}: expected a comma list of integers') from None


def validate(c: ml_collections.ConfigDict) -> None:
  """Checks the fields the foundation owns; raises ValueError naming the first bad field."""
  stages = [s.strip() for s in c.stages.split(',') if s.strip()]
  unknown = [s for s in stages if s not in common.ALL_STAGES]
  if unknown:
    raise ValueError(f'config.stages: unknown stage(s) {unknown}; expected a comma list of '
                     f'{", ".join(common.ALL_STAGES)}')
  if c.data.name not in ('consep', 'glysac', 'demo_nuclei'):
    raise ValueError(f'config.data.name={c.data.name!r}: expected consep, glysac or demo_nuclei')
  if c.data.labels not in ('original', 'merged'):
    raise ValueError(f'config.data.labels={c.data.labels!r}: expected original or merged')
  names = [n.strip() for n in c.data.class_names.split(',')]
  if len(names) != c.data.num_classes or not all(names):
    raise ValueError(f'config.data.class_names={c.data.class_names!r}: expected '
                     f'{c.data.num_classes} comma-separated names (config.data.num_classes)')
  for field, value in (('diffusion.model.num_classes', c.diffusion.model.num_classes),
                       ('hovernet.model.nr_types', c.hovernet.model.nr_types)):
    if value != c.data.num_classes:
      raise ValueError(f'config.{field}={value} must equal config.data.num_classes='
                       f'{c.data.num_classes}')
  for field, value in (('data.crop_size', c.data.crop_size),
                       ('diffusion.train.batch_size', c.diffusion.train.batch_size),
                       ('sample.batch_size', c.sample.batch_size),
                       ('sample.patch_size', c.sample.patch_size),
                       ('sample.grid_stride', c.sample.grid_stride)):
    if value <= 0:
      raise ValueError(f'config.{field}={value}: expected a positive integer')
  if c.data.crop_size != c.diffusion.model.image_size:
    raise ValueError(f'config.data.crop_size={c.data.crop_size} must equal '
                     f'config.diffusion.model.image_size={c.diffusion.model.image_size}')
  if c.mesh.data == 0 or c.mesh.data < -1:
    raise ValueError(f'config.mesh.data={c.mesh.data}: expected -1 (all devices) or a positive count')
  if not 0 <= c.sample.percent <= 100:
    raise ValueError(f'config.sample.percent={c.sample.percent}: expected 0..100')
  for field, value, allowed in (('hovernet.model.mode', c.hovernet.model.mode, ('original', 'fast')),
                                ('hovernet.model.head_init', c.hovernet.model.head_init,
                                 ('kaiming', 'zeros'))):
    if value not in allowed:
      raise ValueError(f'config.{field}={value!r}: expected one of {", ".join(allowed)}')
  for field in ('mix.balance.rare_classes', 'mix.balance.common_classes'):
    ids = _ints(c.mix.balance[field.rsplit('.', 1)[1]], field)
    bad = [i for i in ids if not 1 <= i < c.data.num_classes]
    if bad:
      raise ValueError(f'config.{field}: class id(s) {bad} not in 1..{c.data.num_classes - 1}')
  arms.runs(c)  # Unknown arms or bad seeds fail here, before any stage runs.
  _check_pretrained(c, stages)
  for split in ('train', 'test'):
    if input_pipeline.tile_names(c, split):
      available = _tile_names_on_disk(c, split)
      if available is not None:  # Else `build_data` reports the missing folder.
        input_pipeline.check_tile_names(c, split, available)


def _tile_names_on_disk(c: ml_collections.ConfigDict, split: str) -> list[str] | None:
  """The tile names of a split as the builders name them, or None when the source folder is absent."""
  if c.data.name == 'demo_nuclei':
    return [f'{split}_{i + 1}' for i in range(demo_tiles.NUM_TILES[split])]
  root = c.data.manual_dir or (os.environ.get('DIFFMIX_CONSEP_DIR', '') if c.data.name == 'consep'
                               else '')
  if not root or not os.path.isdir(root):
    return None
  return [name for name, _, _ in raw_folders.split_pairs(root, split)]


PRETRAINED_SOURCE = ('the official ImageNet-ResNet50-Preact_pytorch.tar (HoVer-Net README, Google '
                     'Drive), or a .npz / torch state dict with the PyTorch HoVer-Net encoder names '
                     'conv0.*, d0.* ... d3.*')


def _check_pretrained(c: ml_collections.ConfigDict, stages: list[str]) -> None:
  """Phase 1 freezes the encoder, so it needs ImageNet weights (hovernet.md §3.2-§3.3)."""
  if 'hovernet_train' not in stages:
    return
  tc = c.hovernet.train
  if tc.phase1_epochs > 0 and not tc.pretrained:
    raise ValueError(
        f'config.hovernet.train.phase1_epochs={tc.phase1_epochs} trains with the encoder frozen, '
        'which only makes sense from ImageNet weights, and config.hovernet.train.pretrained is '
        f"empty: set it to {PRETRAINED_SOURCE}; or train everything from scratch with "
        '--config.hovernet.train.phase1_epochs=0')
  if tc.pretrained and not os.path.isfile(tc.pretrained):
    raise ValueError(f'config.hovernet.train.pretrained={tc.pretrained!r}: no such file; expected '
                     f'{PRETRAINED_SOURCE}')
