"""TFDS builder for a user's own nuclei folder: `{Train,Test}/{Images,Labels}` plus `classes.json`.

The folder describes its classes in `classes.json` (class_tables.py): names, rare and common ids, and
an optional merge of the label files' source ids. The table is kept in the built dataset's metadata
(`info.metadata['classes']`), so a run reads the class count and names from the built dataset.
"""

import tensorflow_datasets as tfds

from tfds_builders import class_tables
from tfds_builders import raw_folders
from tfds_builders import tiles


class NucleiFolder(tfds.core.GeneratorBasedBuilder):
  """Any nuclei dataset in the folder layout below; tiles of any size >= the model's patch."""
  VERSION = tiles.VERSION
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='default', description='class table from '
                                             'classes.json')]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Pass the folder that holds your tiles as --manual_dir:
    <manual_dir>/classes.json   {"names": ["background", ...], "rare": [ids], "common": [ids],
                                 "merge": {"<source id>": <class id>, ...}  (optional)}
    <manual_dir>/Train/Images/<name>.png (.tif, .tiff, .jpg, .jpeg; RGB or RGBA)
    <manual_dir>/Train/Labels/<name>.mat (inst_map + type_map or inst_type) or <name>.npy
                              ([H, W, 2] uint/int: instance ids, class ids)
    <manual_dir>/Test/Images/..., <manual_dir>/Test/Labels/...
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=tiles.tile_features(), supervised_keys=None,
                                          disable_shuffling=True,
                                          metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    table = class_tables.read(root)
    for split in ('train', 'test'):  # Every split's file pairing checked before anything is written.
      raw_folders.split_pairs(root, split)
    self.info.metadata['classes'] = table.to_json()
    scheme = raw_folders.table_scheme(table, str(root / class_tables.CLASSES_FILE))
    return {split: self._generate_examples(root, split, scheme) for split in ('train', 'test')}

  def _generate_examples(self, root, split, scheme):
    for tile in raw_folders.iter_split(root, split, scheme):
      yield tile.name, {'image': tile.image, 'inst_map': tile.inst_map,
                        'type_map': tile.type_map, 'name': tile.name}
