"""TFDS builder for a user's own nuclei folder: `{Train,Test}/{Images,Labels}` plus `classes.json`.

The folder describes its classes in `classes.json` (class_tables.py): names, rare and common ids,
and an optional merge of the label files' source ids. The table is kept in the built dataset's
metadata (`info.metadata['classes']`), so a run reads the class count and names from the build.

Each folder builds into its own builder config, named by the folder's path (`<name>_<hash>`), so
two folders never share a build in one data_dir; the build also keeps a fingerprint of the folder
(classes.json and every file's name, size and time), and `check_current` refuses a build made
before the folder changed.
"""

import dataclasses
import hashlib
import pathlib
import re

import tensorflow_datasets as tfds

from tfds_builders import class_tables
from tfds_builders import raw_folders
from tfds_builders import tiles


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
  """The folder (absolute path) this build reads."""
  folder: str = ''


def config_for(folder) -> FolderConfig:
  """The builder config of `folder`: name `<folder name>_<sha1 of its absolute path>`."""
  path = str(pathlib.Path(folder).resolve())
  stem = re.sub(r'[^A-Za-z0-9]+', '_', pathlib.Path(path).name).strip('_')[:40] or 'folder'
  return FolderConfig(name=f'{stem}_{hashlib.sha1(path.encode()).hexdigest()[:10]}', folder=path,
                      description=f'nuclei folder {path}')


def fingerprint(folder) -> str:
  """sha1 of classes.json and of every file's relative path, size and mtime under Train/ and Test/."""
  root = pathlib.Path(folder)
  h = hashlib.sha1((root / class_tables.CLASSES_FILE).read_bytes())
  for split in raw_folders.SPLIT_FOLDERS.values():
    for p in sorted((root / split).rglob('*')) if (root / split).is_dir() else []:
      if p.is_file():
        st = p.stat()
        h.update(f'{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  return h.hexdigest()


class NucleiFolder(tfds.core.GeneratorBasedBuilder):
  """Any nuclei dataset in the folder layout below; tiles of any size >= the model's patch."""
  VERSION = tiles.VERSION
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Pass the folder that holds your tiles as --manual_dir:
    <manual_dir>/classes.json   {"names": ["background", ...], "rare": [ids], "common": [ids],
                                 "merge": {"<source id>": <class id>, ...}  (optional)}
    <manual_dir>/Train/Images/<name>.png (.tif, .tiff, .jpg, .jpeg; RGB or RGBA)
    <manual_dir>/Train/Labels/<name>.mat (inst_map + type_map or inst_type) or <name>.npy
                              ([H, W, 2] integers: instance ids, class ids)
    <manual_dir>/Test/Images/..., <manual_dir>/Test/Labels/...
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tiles.info_with_metadata(self)

  def _split_generators(self, dl_manager):
    root = pathlib.Path(dl_manager.manual_dir)
    if str(root.resolve()) != self.builder_config.folder:
      raise raw_folders.DatasetError(f'manual_dir {root} is not the folder of this build '
                                     f'({self.builder_config.folder})')
    table = class_tables.read(root)
    for split in ('train', 'test'):  # Every split's pairing checked before anything is written.
      raw_folders.split_pairs(root, split)
    self.info.metadata.update(classes=table.to_json(), folder=str(root.resolve()),
                              fingerprint=fingerprint(root))
    scheme = raw_folders.table_scheme(table, str(root / class_tables.CLASSES_FILE))
    return {split: self._generate_examples(root, split, scheme) for split in ('train', 'test')}

  def _generate_examples(self, root, split, scheme):
    for tile in raw_folders.iter_split(root, split, scheme):
      yield tile.name, {'image': tiles.png_bytes(tile.image, tile.name), 'inst_map': tile.inst_map,
                        'type_map': tile.type_map, 'name': tile.name}

  def check_current(self) -> None:
    """Raises DatasetError when the folder changed after this (finished) build was made."""
    built = (self.info.metadata or {}).get('fingerprint')
    if built and built != fingerprint(self.builder_config.folder):
      raise raw_folders.DatasetError(
          f'{self.data_dir} holds a build of {self.builder_config.folder} made before its files or '
          f'{class_tables.CLASSES_FILE} changed; delete that folder to rebuild, or use another '
          '--data_dir')
