"""The synthetic dataset on disk: resumable shards, the TFDS-readable set, CoNSeP-format export.

Layout under `<workdir>/synthetic/`:
  shards/shard_NNNNN.npz   rendered patches, one file per shard (written atomically, resumable unit)
  tfds/                    TFDS `synthetic_nuclei` (array_record): the real builders' features plus
                           `source_tile`, `kind`, `patch`, `offset`
  consep_format/{Images,Labels}/<name>.{png,mat}   for HoVer-Net / TIAToolbox users
  consep_format/manifest.json   {"patches": {<name>: {kind, tile, patch, offset}}}: which mixing
                           kind ('balance' | 'enlarge') each patch was rendered from (`arms`)
  preview.png, DONE
"""

import io
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from diffmix_jax.hovernet import patches as hovernet_data
from diffmix_jax import workdir as wdir
from diffmix_jax.metrics import records
from tfds_builders import tiles as tile_features

SHARD_KEYS = ('image', 'inst_map', 'type_map', 'kind', 'tile', 'patch', 'offset', 'index')


def shard_path(workdir: os.PathLike, k: int) -> pathlib.Path:
  return wdir.synthetic_shard_path(workdir, k)


def write_shard(workdir: os.PathLike, k: int, arrays: dict) -> None:
  """Writes shard k atomically. `arrays` holds SHARD_KEYS: image uint8 [n, S, S, 3], inst_map and
  type_map int32 [n, S, S], kind and tile str [n], patch int32 [n], offset int32 [n, 2] (row, col),
  index int32 [n] (global item index)."""
  buf = io.BytesIO()
  np.savez(buf, **{key: arrays[key] for key in SHARD_KEYS})
  wdir.atomic_write(shard_path(workdir, k), buf.getvalue())


def read_shard(workdir: os.PathLike, k: int) -> dict:
  with np.load(shard_path(workdir, k)) as z:
    return {key: z[key] for key in SHARD_KEYS}


def example_name(kind: str, tile: str, patch: int) -> str:
  return f'{tile}_{kind}_{int(patch):03d}'


def iter_examples(workdir: os.PathLike, num_shards: int):
  """Yields (name, example dict) over all shards in global item order."""
  for k in range(num_shards):
    s = read_shard(workdir, k)
    for i in range(len(s['index'])):
      name = example_name(str(s['kind'][i]), str(s['tile'][i]), s['patch'][i])
      yield name, {'image': s['image'][i], 'inst_map': s['inst_map'][i],
                   'type_map': s['type_map'][i], 'name': name, 'source_tile': str(s['tile'][i]),
                   'kind': str(s['kind'][i]), 'patch': np.int32(s['patch'][i]),
                   'offset': s['offset'][i].astype(np.int32)}


class SyntheticNuclei(tfds.core.GeneratorBasedBuilder):
  """DiffMix synthetic patches, read from the sample stage's shards (manual_dir = synthetic/)."""
  VERSION = tile_features.VERSION
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Written by the sample stage; manual_dir is <workdir>/synthetic.'

  def _info(self) -> tfds.core.DatasetInfo:
    features = dict(tile_features.tile_features())
    features.update({
        'source_tile': tfds.features.Text(),  # Real training tile the patch was cut from.
        'kind': tfds.features.Text(),  # Mixing record: 'balance' or 'enlarge'.
        'patch': tfds.features.Scalar(dtype=np.int32),  # Index among the tile's patches of its kind.
        'offset': tfds.features.Tensor(shape=(2,), dtype=np.int32),  # (row, col) on the tile.
    })
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features),
                                          disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(pathlib.Path(dl_manager.manual_dir))}

  def _generate_examples(self, root: pathlib.Path):
    workdir = root.parent
    num_shards = len(list(wdir.synthetic_shard_path(workdir, 0).parent.glob('shard_*.npz')))
    yield from iter_examples(workdir, num_shards)


def build_tfds(workdir: os.PathLike) -> str:
  """Builds the TFDS dataset from the shards into `<workdir>/synthetic/tfds`; returns data_dir."""
  root = wdir.synthetic_dir(workdir)
  data_dir = str(wdir.synthetic_tfds_dir(workdir))
  builder = SyntheticNuclei(data_dir=data_dir)
  builder.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(manual_dir=str(root), try_download_gcs=False))
  return data_dir


def open_source(workdir: os.PathLike, split: str = 'train'):
  """Random-access source of the synthetic set, same item layout as `input_pipeline.open_source`."""
  data_dir = wdir.synthetic_tfds_dir(workdir)
  builder = SyntheticNuclei(data_dir=str(data_dir))
  if not pathlib.Path(builder.data_dir, 'dataset_info.json').exists():
    raise FileNotFoundError(f'no synthetic dataset in {data_dir}: run the sample stage first')
  return builder.as_data_source(split=split)


def export_consep(workdir: os.PathLike, num_shards: int) -> pathlib.Path:
  """Writes `consep_format/{Images,Labels}` (PNG + .mat with inst_map, type_map, inst_type,
  inst_centroid) and `manifest.json` (each patch's kind, source tile, index among
  the tile's patches of that kind, and offset), each
  file atomically, the manifest last."""
  import json  # pylint: disable=g-import-not-at-top
  out = wdir.synthetic_export_dir(workdir)
  manifest = {}
  for name, ex in iter_examples(workdir, num_shards):
    rec = records.label_record(ex['inst_map'], ex['type_map'])
    records.write_consep_example(out, name, ex['image'], {
        'inst_map': rec['inst_map'], 'type_map': ex['type_map'].astype(np.int32),
        'inst_type': rec['inst_type'][:, None], 'inst_centroid': rec['inst_centroid']})
    manifest[name] = {'kind': ex['kind'], 'tile': ex['source_tile'], 'patch': int(ex['patch']),
                      'offset': [int(v) for v in ex['offset']]}
  wdir.atomic_write(out / hovernet_data.MANIFEST, json.dumps({'patches': manifest}, indent=1).encode())
  return out
