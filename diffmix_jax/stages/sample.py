"""Stage `sample`: renders a synthetic image for every mixed label patch with the trained SDM.

Work items are the patches of the mixed label maps (docs/method.md §4.1): for each kind
('balance', then 'enlarge'), each training tile in name order and each patch of the grid
range(0, L - S + 1, stride) per axis. With `sample.balance_patches = 'cover'` the balancing
patches are instead the few that hold every replaced nucleus whole (a greedy cover,
`mixing.tiles.covering_offsets`), so a coarse grid cannot miss the rare nuclei balancing placed; the
stage's DONE records these fields and a set or shards rendered for other patches are refused.
Item g is rendered from x_0 = the real image crop at the same offsets (docs/sdm.md §4.7), the condition
of the mixed label patch, and noise fold_in(seed key, g), with the partial-noise DDIM +
classifier-free guidance of samplers.py. Items are grouped in shards of `config.sample.shard_size`;
each shard is one file written atomically, so a killed run restarts at the first missing shard and
no patch is missing or doubled. Every device of every host renders: each
global batch is sharded over the mesh; process 0 writes.

Official sampler bugs fixed here (docs/sdm.md §4.7; docs/differences.md §1.21): the patch offsets, undefined in the
official loader, are the documented grid above; labels are merged once (by the dataset builder), never
again on already merged mixed labels.
"""

import json
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from diffmix_jax.data import input_pipeline
from diffmix_jax.data import labels
from diffmix_jax.mixing import files as mixed_files
from diffmix_jax.mixing import tiles as mixing_tiles
from diffmix_jax.sdm import unet as sdm_unet
from diffmix_jax.sdm import render as sdm_render
from diffmix_jax.core import checkpoint
from diffmix_jax.core import sharding
from diffmix_jax import workdir as wdir
from diffmix_jax.data import synthetic as synthetic_io
from diffmix_jax.core import writers
from diffmix_jax.stages import figures
from tfds_builders import raw_folders


def work_items(config: ml_collections.ConfigDict, workdir: str, tiles: dict) -> list[tuple]:
  """All (kind, tile name, patch index, row, col) items in their global order."""
  items, missed = [], 0
  size, stride = config.sample.patch_size, config.sample.grid_stride
  for kind in mixed_files.KINDS:
    for name in sorted(mixed_files.mixed_names(workdir, kind), key=raw_folders.natural_key):
      h, w = tiles[name]['image'].shape[:2]
      if kind == 'balance' and config.sample.balance_patches == 'cover':
        offsets, held = replaced_cover(workdir, name, size, config.sample.cover_stride)
        missed += int(np.count_nonzero(~held))
      else:
        offsets = mixing_tiles.grid_offsets(h, w, size, stride)
      items += [(kind, name, p, int(r), int(c)) for p, (r, c) in enumerate(offsets)]
  if missed:
    logging.warning('sample: %d replaced nuclei are larger than sample.patch_size=%d px: no '
                    'balancing patch holds them whole', missed, size)
  return items


def replaced_cover(workdir: str, name: str, size: int, stride: int):
  """Balancing patches of tile `name` that hold every replaced nucleus whole (`covering_offsets`).

  Returns:
    offsets int32 [P, 2] (row, col) and held bool [R] over the replaced nuclei still in the map.
  """
  d = mixed_files.load_mixed(workdir, 'balance', name)
  prov = d['provenance']
  ids = prov['target_id'][prov['present'] > 0]
  _, _, boxes = mixing_tiles.id_tables(d['inst_map'])
  h, w = d['inst_map'].shape
  return mixing_tiles.covering_offsets(boxes[ids], h, w, size, stride)


def patches_from(config: ml_collections.ConfigDict) -> dict:
  """The config fields that decide the work items (recorded in the stage's DONE)."""
  sc = config.sample
  rec = {'patch_size': int(sc.patch_size), 'grid_stride': int(sc.grid_stride),
         'balance_patches': str(sc.balance_patches)}
  if sc.balance_patches == 'cover':
    rec['cover_stride'] = int(sc.cover_stride)
  return rec


_STALE = ('delete it and the runs trained on it (hovernet_<arm> of the arms with synthetic data, '
          'eval/) to render the new patches, or set the config back')


def _check_done_patches(config: ml_collections.ConfigDict, out: wdir.StageDir) -> None:
  """A finished synthetic set must have been rendered for the configured patches.

  Raises:
    ValueError: naming the fields that differ (a set from before they were recorded counts as
      balance_patches='grid').
  """
  done = json.loads((out.path / wdir.DONE).read_text() or '{}')
  want = patches_from(config)
  have = done.get('patches_from', {'balance_patches': 'grid'})
  diff = {k: (have[k], v) for k, v in want.items() if k in have and have[k] != v}
  if diff:
    raise ValueError(f'sample: {out.path} was rendered for other patches ('
                     + ', '.join(f'config.sample.{k}: {a!r} there, {b!r} now'
                                 for k, (a, b) in diff.items()) + f'): {_STALE}')


def _check_shards(workdir: str, items: list[tuple], shard_size: int) -> None:
  """Shards left by a killed run must hold the items this run would render in their place.

  Raises:
    ValueError: naming the first shard whose items differ, or one beyond the last item.
  """
  folder = synthetic_io.shard_path(workdir, 0).parent
  for path in sorted(folder.glob('shard_*.npz')) if folder.is_dir() else []:
    k = int(path.stem.split('_')[-1])
    chunk = items[k * shard_size:(k + 1) * shard_size]
    with np.load(path) as z:
      got = [(str(a), str(b), int(p), int(o[0]), int(o[1]))
             for a, b, p, o in zip(z['kind'], z['tile'], z['patch'], z['offset'])]
    if got != list(chunk):
      raise ValueError(f'sample: shard {path} holds other patches than this config renders there '
                       f'(first: {got[:1]}, expected {chunk[:1]}): {_STALE}')


def _renumber(inst: np.ndarray) -> np.ndarray:
  """Instance ids of a patch renumbered 1..N in order of first id."""
  ids = np.unique(inst[inst > 0])
  lut = np.zeros(int(inst.max()) + 1, np.int32)
  lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
  return lut[inst]


class _Labels:
  """Mixed label patches, loading each tile's file once."""

  def __init__(self, workdir: str):
    self._workdir, self._cache = workdir, {}

  def patch(self, kind: str, name: str, p: int, r: int, c: int, size: int):
    key = (kind, name)
    if key not in self._cache:
      self._cache = {key: mixed_files.load_mixed(self._workdir, kind, name)}  # One tile at a time.
    d = self._cache[key]
    if kind == 'balance':
      inst, types = d['inst_map'][r:r + size, c:c + size], d['type_map'][r:r + size, c:c + size]
    else:
      if tuple(d['offsets'][p]) != (r, c):
        raise ValueError(f'enlarging map of {name}: patch {p} is at {tuple(d["offsets"][p])}, not '
                         f'({r}, {c}); rerun mix_labels with the same sample.patch_size/grid_stride')
      inst, types = d['inst_maps'][p], d['type_maps'][p]
    return _renumber(inst), types.astype(np.int32)


def load_params(config: ml_collections.ConfigDict, workdir: str, module) -> dict:
  """EMA params of `diffusion_train`, or converted official weights from config.sample.params_path.

  Raises:
    FileNotFoundError / ValueError: missing file, or a tree that does not fit the model (names the
    first mismatching leaves).
  """
  return checkpoint.load_tree(
      config.sample.params_path or wdir.ema_params_path(workdir), sdm_unet.abstract_params(module),
      'run diffusion_train, or set config.sample.params_path to weights converted by convert_torch')


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Renders every missing shard, then exports the synthetic set; no-op when done."""
  out = wdir.StageDir(workdir, wdir.SYNTHETIC)
  if out.done():
    _check_done_patches(config, out)
    logging.info('sample: already done (%s)', out.path)
    return
  sc, size = config.sample, config.sample.patch_size
  mesh = sharding.create_mesh(config.mesh)
  global_batch = sc.batch_size * mesh.shape[sharding.DATA]
  tiles = {t['name']: t for t in input_pipeline.load_split(config, workdir, 'train')}
  items = work_items(config, workdir, tiles)
  num_shards = -(-len(items) // sc.shard_size)
  _check_shards(workdir, items, sc.shard_size)
  todo = [k for k in range(num_shards) if not synthetic_io.shard_path(workdir, k).exists()]
  logging.info('sample: %d patches in %d shards, %d shards to render', len(items), num_shards,
               len(todo))
  if todo:
    module = sdm_unet.create_sdm(**config.diffusion.model)
    params = jax.device_put(load_params(config, workdir, module), sharding.replicated(mesh))
    render = sdm_render.render_fn(config, module, mesh)
  source = _Labels(workdir)
  start, done_patches = time.time(), 0
  for n_done, k in enumerate(todo):
    chunk = items[k * sc.shard_size:(k + 1) * sc.shard_size]
    inst, types = zip(*(source.patch(*it, size=size) for it in chunk))
    x0 = np.stack([tiles[n]['image'][r:r + size, c:c + size] for _, n, _, r, c in chunk])
    images = []
    for b in range(0, len(chunk), global_batch):  # Pad the last batch with copies of its first row.
      rows = np.arange(b, min(b + global_batch, len(chunk)))
      rows = np.concatenate([rows, np.full(global_batch - len(rows), rows[0])])
      y = labels.condition(np.stack([types[i] for i in rows]), np.stack([inst[i] for i in rows]),
                           config.diffusion.model.num_classes, config.diffusion.model.no_instance)
      local = slice(jax.process_index() * (global_batch // jax.process_count()),
                    (jax.process_index() + 1) * (global_batch // jax.process_count()))
      batch = sharding.global_batch(
          {'x0': x0[rows][local].astype(np.float32) / 127.5 - 1.0, 'y': y[local],
           'index': (k * sc.shard_size + rows)[local].astype(np.int32)}, mesh)
      img = render(params, batch['x0'], batch['y'], batch['index'])
      img = multihost_utils.process_allgather(img, tiled=True)
      images.append(np.asarray(img, np.uint8)[:min(global_batch, len(chunk) - b)])
    if jax.process_index() == 0:
      synthetic_io.write_shard(workdir, k, {
          'image': np.concatenate(images), 'inst_map': np.stack(inst), 'type_map': np.stack(types),
          'kind': np.array([it[0] for it in chunk]), 'tile': np.array([it[1] for it in chunk]),
          'patch': np.array([it[2] for it in chunk], np.int32),
          'offset': np.array([it[3:] for it in chunk], np.int32),
          'index': np.arange(k * sc.shard_size, k * sc.shard_size + len(chunk), dtype=np.int32)})
    done_patches += len(chunk)
    rate = done_patches / (time.time() - start)
    left = sum(min(sc.shard_size, len(items) - j * sc.shard_size) for j in todo[n_done + 1:])
    logging.info('sample: shard %d/%d, %.2f patches/s, ETA %.0f s', n_done + 1, len(todo), rate,
                 left / max(rate, 1e-9))
  if jax.process_count() > 1:
    sharding.barrier('sample shards written')
  if jax.process_index() == 0:
    _finish(config, workdir, out, num_shards, tiles)


def _finish(config, workdir: str, out: wdir.StageDir, num_shards: int, tiles: dict) -> None:
  """TFDS set, CoNSeP-format export, preview grid and TensorBoard image; then DONE."""
  synthetic_io.build_tfds(workdir)
  synthetic_io.export_consep(workdir, num_shards)
  names = list(config.data.class_names)
  grid = preview(workdir, tiles, config.sample.patch_size, num_shards, names)
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(grid).save(buf, format='png')
  out.write_bytes(wdir.PREVIEW, buf.getvalue())
  writer = writers.create_writer(out.tensorboard)
  writer.write_images(0, {'label_original_synthetic_contours': grid[None]})
  writer.flush()
  out.mark_done({'shards': num_shards, 'patches_from': patches_from(config)})
  logging.info('sample: wrote %s', out.path)


def preview(workdir: str, tiles: dict, size: int, num_shards: int, class_names, count: int = 8,
            panel: int = 128) -> np.ndarray:
  """The synthetic samples figure: a title strip, `count` rows of (mixed label in colour, original
  crop, synthetic image, synthetic with contours), each panel upscaled (nearest neighbour) to at
  least `panel` px, and a legend of the class colours. uint8 [H, 4 P, 3], P = ceil(panel/size) size.
  """
  # The patches with the most classes, then the most nuclei, of the first shards (most patches of
  # a tile are plain stroma), in their order in the set.
  examples = [ex for _, ex in synthetic_io.iter_examples(workdir, min(num_shards, 4))]
  score = lambda ex: (len(np.unique(ex['type_map'])), int(ex['inst_map'].max()))
  best = sorted(sorted(range(len(examples)), key=lambda i: score(examples[i]), reverse=True)[:count])
  rows = []
  for ex in (examples[i] for i in best):
    r, c = ex['offset']
    edges = labels.edge_map(ex['inst_map']) & (ex['inst_map'] > 0)
    contour = ex['image'].copy()
    contour[edges] = (0, 255, 0)
    rows.append([labels.colour_labels(ex['type_map'], edges)[None],
                 tiles[ex['source_tile']]['image'][r:r + size, c:c + size][None],
                 ex['image'][None], contour[None]])
  grid = figures.image_grid([np.concatenate(col) for col in zip(*rows)])
  k = -(-panel // size)
  grid = np.repeat(np.repeat(grid, k, axis=0), k, axis=1)
  titles = figures.text_strip(grid.shape[1], ['mixed label', 'original crop', 'synthetic',
                                              'synthetic + contours'], columns=True)
  return np.concatenate([titles, grid, figures.legend_strip(grid.shape[1], class_names)])
