"""Shared TFDS builder for nuclei tile datasets: features, splits and the raw-folder reader.

Features per tile (docs/datasets.md §2): `image` uint8 [H, W, 3] (PNG-encoded), `inst_map` int32 [H, W]
(ids 1..N contiguous), `type_map` int32 [H, W] (merged classes), `name` (text). Splits `train`,
`test`.
"""

import numpy as np
import tensorflow_datasets as tfds

from tfds_builders import raw_folders

VERSION = tfds.core.Version('1.0.0')


def tile_features(**extra) -> tfds.features.FeaturesDict:
  """The features above, plus `extra` ({name: feature}, e.g. PanNuke's `tissue`)."""
  return tfds.features.FeaturesDict({
      **extra,
      'image': tfds.features.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format='png'),
      'inst_map': tfds.features.Tensor(shape=(None, None), dtype=np.int32,
                                       encoding=tfds.features.Encoding.ZLIB),
      'type_map': tfds.features.Tensor(shape=(None, None), dtype=np.int32,
                                       encoding=tfds.features.Encoding.ZLIB),
      'name': tfds.features.Text(),
  })


def png_bytes(image: np.ndarray, where: str) -> bytes:
  """`image` uint8 [H, W, 3] (RGB) as PNG bytes for the `image` feature, which stores them as given.

  OpenCV at zlib level 1 encodes a 1000^2 H&E tile in ~0.06 s, TFDS's own encoder (TensorFlow, level
  6) in ~0.25 s, for a file ~3 % larger; PNG is lossless, so the decoded pixels are the same.

  Raises:
    ValueError: naming `where`, for another shape or dtype.
  """
  import cv2  # pylint: disable=g-import-not-at-top
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'{where}: image {image.dtype} {list(image.shape)}; expected uint8 [H, W, 3]')
  ok, buf = cv2.imencode('.png', np.ascontiguousarray(image[..., ::-1]),
                         [cv2.IMWRITE_PNG_COMPRESSION, 1])
  if not ok:
    raise ValueError(f'{where}: OpenCV could not encode the image as PNG')
  return buf.tobytes()


def info_with_metadata(builder, **extra) -> tfds.core.DatasetInfo:
  """The DatasetInfo of a builder that keeps its class table (and split record) in
  `info.metadata`: the tile features plus `extra`, tile-name order kept."""
  return builder.dataset_info_from_configs(features=tile_features(**extra), supervised_keys=None,
                                           disable_shuffling=True,
                                           metadata=tfds.core.MetadataDict())


class RawFolderBuilder(tfds.core.GeneratorBasedBuilder):
  """Base for datasets read from a user folder `{Train,Test}/{Images,Labels}` (manual_dir).

  Subclasses set `DATASET` ('consep' or 'glysac'); the builder config name ('original' or 'merged')
  says which class ids the label files hold.
  """
  DATASET = ''
  VERSION = VERSION
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='original', description='label files hold the original class '
                              'ids; the builder merges them'),
      tfds.core.BuilderConfig(name='merged', description='label files already hold merged ids'),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=tile_features(), supervised_keys=None,
                                          disable_shuffling=True)  # Keep tile-name order.

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    # Check every split's file pairing before anything is written.
    for split in ('train', 'test'):
      raw_folders.split_pairs(root, split)
    return {split: self._generate_examples(root, split) for split in ('train', 'test')}

  def _generate_examples(self, root, split):
    scheme = raw_folders.dataset_scheme(self.DATASET, self.builder_config.name)
    for tile in raw_folders.iter_split(root, split, scheme):
      yield tile.name, {'image': png_bytes(tile.image, tile.name), 'inst_map': tile.inst_map,
                        'type_map': tile.type_map, 'name': tile.name}
