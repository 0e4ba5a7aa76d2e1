"""TFDS builder for the built-in demo set: generated H&E-like tiles, no download (docs/datasets.md §4)."""

import tensorflow_datasets as tfds

from tfds_builders import tiles
from tfds_builders.demo_nuclei import generate


class DemoNuclei(tfds.core.GeneratorBasedBuilder):
  """32 train and 8 test generated tiles of 256x256 in CoNSeP's merged classes: train strongly
  imbalanced, test enriched in the rare class (generate.RARE)."""
  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Test split as imbalanced as train (5 rare nuclei).',
                   '1.1.0': 'Test split enriched in the rare class (77 of 456 nuclei).'}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='merged', description='generated, merged ids')]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=tiles.tile_features(), supervised_keys=None,
                                          disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download or read: the tiles are generated.
    return {split: self._generate_examples(split) for split in generate.NUM_TILES}

  def _generate_examples(self, split):
    for i in range(generate.NUM_TILES[split]):
      image, inst, types = generate.make_tile(generate.SEED, split, i)
      name = f'{split}_{i + 1}'
      yield name, {'image': tiles.png_bytes(image, name), 'inst_map': inst, 'type_map': types,
                   'name': name}
