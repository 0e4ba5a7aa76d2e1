"""One slide through reading, the network, post-processing and writing, overlapped (docs/slides.md).

A reader thread cuts the windows of each chunk's extent into a bounded queue; the main thread runs the
jitted, device-sharded network and hands each extent's stitched map to a process pool for the
post-processing (docs/hovernet.md §4, on the whole extent); results are committed in raster order
(`chunks.select`) and saved as the chunk's part, so a killed slide resumes from its finished chunks.
When every chunk is done the parts are streamed into the outputs (`writers`).
"""

import collections
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import pathlib
import queue
import threading
import time

from absl import logging
import numpy as np

from diffmix_jax import workdir as wdir
from diffmix_jax.slides import chunks as chunks_lib
from diffmix_jax.slides import cohort
from diffmix_jax.slides import reading
from diffmix_jax.slides import tissue
from diffmix_jax.slides import writers

SUMMARY, TISSUE_MASK = 'summary.json', 'tissue_mask.png'
THUMBNAIL_SIDE = 1024  # Longer side of the level read for the tissue mask and the thumbnail (px).


@dataclasses.dataclass(frozen=True)
class Options:
  """How slides are read and cut (flags of `predict`).

  Attributes:
    chunk: output blocks per chunk side (fast: 164 px each).
    margin_px: the least margin around a chunk, px of the work image (rounded up to whole blocks).
    mpp: µm/px of level 0 for slides that state none (0 = none given).
    tolerance: relative µm/px difference within which a level is used without resampling.
    masks: folder of tissue masks named by slide stem ('' = Otsu).
    workers: post-processing processes (0 = in the main process, not overlapped).
    normalise: 'slide' (HV ranges over the whole slide, as tile mode: two network passes) or
      'chunk' (each extent its own, HoVer-Net's WSI mode: one pass).
  """
  chunk: int = 12
  margin_px: int = 160
  mpp: float = 0.0
  tolerance: float = 0.1
  masks: str = ''
  workers: int = 2
  normalise: str = 'slide'


def postprocess_extent(pred_map: np.ndarray, nr_types: int, params, ranges, y0: int,
                       x0: int) -> dict:
  """docs/hovernet.md §4 on one extent; nuclei in work pixels (`cohort.FIELDS` + contours, seconds)."""
  from diffmix_jax.metrics import postprocess  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  inst_map, info = postprocess.process(pred_map, nr_types, params, ranges)
  areas = np.bincount(inst_map.ravel()) if inst_map.size else np.zeros(1, np.int64)
  ids = sorted(info)
  out = cohort.empty_nuclei()
  if ids:
    out['bbox'] = np.array([info[i]['bbox'].ravel() for i in ids], np.int64) + [y0, x0, y0, x0]
    out['centroid'] = np.array([info[i]['centroid'] for i in ids]) + [x0, y0]
    out['type'] = np.array([info[i]['type'] for i in ids], np.int32)
    out['type_prob'] = np.array([info[i]['type_prob'] for i in ids])
    out['area'] = areas[ids].astype(np.int64)
    out['contours'] = [info[i]['contour'] + np.array([x0, y0], np.int32) for i in ids]
  out['seconds'] = time.perf_counter() - start
  return out


class _Inline:
  """An executor that runs the function at submission (workers=0)."""

  def submit(self, fn, *args):
    f = concurrent.futures.Future()
    f.set_result(fn(*args))
    return f

  def shutdown(self):
    pass


def _exit_with_parent(parent: int) -> None:
  """Pool-worker initializer: the worker ends when the process that started it is gone.

  A worker holds both ends of its task pipe, so after a SIGKILL of `predict` it would wait on it
  forever (an orphan per worker per kill); a daemon thread polls the parent id instead.
  """
  def watch():
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(1)  # pylint: disable=protected-access
  threading.Thread(target=watch, daemon=True).start()


def executor(workers: int):
  """A post-processing pool of `workers` spawned processes (JAX is not fork-safe), or inline."""
  if workers <= 0:
    return _Inline()
  return concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context('spawn'), initializer=_exit_with_parent,
      initargs=(os.getpid(),))


@dataclasses.dataclass
class Plan:
  """A slide made ready: reader, geometry, grid, tissue and the run key."""
  slide: reading.SlideReader
  geom: reading.Geometry
  grid: chunks_lib.Grid
  mask: np.ndarray  # bool [h, w] at the thumbnail's resolution.
  windows: np.ndarray  # bool [rows, cols]: windows that touch tissue.
  thumbnail: np.ndarray
  slide_key: str
  key: str


def plan_slide(path: pathlib.Path, model, model_mpp: float, opts: Options) -> Plan:
  """Opens and measures a slide. Raises ValueError / FileNotFoundError naming the file."""
  slide = reading.open_slide(path)
  geom = reading.choose_level(slide, model_mpp, opts.mpp or None, opts.tolerance)
  in_size, out_size = model.module.patch_shapes
  grid = chunks_lib.Grid(geom.height, geom.width, in_size, out_size, opts.chunk,
                         -(-opts.margin_px // out_size))
  thumbnail, _ = reading.read_level(slide, THUMBNAIL_SIDE)
  if opts.masks:
    mask_path = tissue.find_mask(opts.masks, path.stem)
    mask, mask_src = tissue.read_mask(mask_path, slide.dims[0][::-1]), cohort.file_fingerprint(mask_path)
  else:
    mask, mask_src = tissue.otsu_mask(thumbnail), 'otsu'
  windows = tissue.window_tissue(mask, (geom.height, geom.width), grid.blocks, in_size, out_size)
  slide_key = cohort.file_fingerprint(path)
  key = cohort.run_key({'model': model.fingerprint(), 'slide': slide_key, 'geometry':
                        dataclasses.asdict(geom), 'grid': dataclasses.asdict(grid), 'mask': mask_src,
                        'tissue': [tissue.SATURATION_RANGE, tissue.MIN_OBJECT_FRACTION],
                        'normalise': opts.normalise})
  return Plan(slide, geom, grid, mask, windows, thumbnail, slide_key, key)


def _reused(plan: Plan, chunk, previous) -> set:
  """Blocks whose outputs the previous chunk predicted (same chunk row): its extent's columns that
  this extent shares. Only these outputs are kept between chunks (memory independent of the slide)."""
  if previous is None or previous[0] != chunk[0] or previous[1] != chunk[1] - 1:
    return set()
  b0, b1, c0, c1 = plan.grid.extent_blocks(*chunk)
  return {(r, c) for r in range(b0, b1) for c in range(c0, plan.grid.extent_blocks(*previous)[3])}


def _extent_windows(plan: Plan, chunk, skip: set) -> tuple[np.ndarray, list[tuple[int, int]]]:
  """The input windows of the tissue blocks of a chunk's extent not in `skip`: uint8 [P, I, I, 3] and
  their blocks."""
  g = plan.grid
  b0, b1, c0, c1 = g.extent_blocks(*chunk)
  blocks = [(r, c) for r in range(b0, b1) for c in range(c0, c1)
            if plan.windows[r, c] and (r, c) not in skip]
  if not blocks:
    return np.zeros((0, g.in_size, g.in_size, 3), np.uint8), []
  b0, b1 = min(r for r, _ in blocks), max(r for r, _ in blocks) + 1
  c0, c1 = min(c for _, c in blocks), max(c for _, c in blocks) + 1
  s, i = g.out_size, g.in_size
  pad = (i - s) // 2
  region = reading.read_work(plan.slide, plan.geom, b0 * s - pad, c0 * s - pad,
                             (b1 - b0 - 1) * s + i, (c1 - c0 - 1) * s + i)
  patches = np.stack([region[(r - b0) * s:(r - b0) * s + i, (c - c0) * s:(c - c0) * s + i]
                      for r, c in blocks])
  return patches, blocks


def _extent_map(plan: Plan, chunk, outputs: dict) -> tuple[np.ndarray, int, int]:
  """Network outputs {block: [S, S, 4]} placed into the extent (zeros where no window ran), cropped to
  the image: float32 [h, w, 4] and the extent's top-left work pixel (y0, x0)."""
  g = plan.grid
  b0, b1, c0, c1 = g.extent_blocks(*chunk)
  s = g.out_size
  full = np.zeros(((b1 - b0) * s, (c1 - c0) * s, 4), np.float32)
  for (r, c), out in outputs.items():
    if b0 <= r < b1 and c0 <= c < c1:
      full[(r - b0) * s:(r - b0 + 1) * s, (c - c0) * s:(c - c0 + 1) * s] = out
  y0, y1, x0, x1 = g.to_px(b0, b1, c0, c1)
  return full[:y1 - y0, :x1 - x0], y0, x0


def _stream(plan: Plan, predict, todo: list, times: dict, on_map) -> None:
  """Reads (a thread, bounded queue) and predicts the extents of `todo` in order, calling
  `on_map(chunk, pred_map [h, w, 4] float32, y0, x0)` with each stitched extent."""
  feed, stop = queue.Queue(maxsize=2), threading.Event()

  def reader():
    try:
      for k, ch in enumerate(todo):
        start = time.perf_counter()
        item = (ch, *_extent_windows(plan, ch, _reused(plan, ch, todo[k - 1] if k else None)))
        times['read'] += time.perf_counter() - start
        while not stop.is_set():
          try:
            feed.put(item, timeout=0.5)
            break
          except queue.Full:
            continue
      feed.put(None)
    except Exception as e:  # pylint: disable=broad-except  (re-raised by the main thread)
      feed.put(e)

  threading.Thread(target=reader, daemon=True).start()
  outputs, previous = {}, None
  try:
    while (item := feed.get()) is not None:
      if isinstance(item, Exception):
        raise item
      ch, patches, blocks = item
      start = time.perf_counter()
      reused = _reused(plan, ch, previous)
      outputs = {b: out for b, out in outputs.items() if b in reused}
      if len(patches):
        outputs.update(zip(blocks, predict(patches)))
      times['network'] += time.perf_counter() - start
      times['windows'] += len(patches)
      on_map(ch, *_extent_map(plan, ch, outputs))
      previous = ch
  finally:
    stop.set()


def slide_ranges(plan: Plan, predict, parts: pathlib.Path, ksize: int, times: dict):
  """First pass: the slide-wide `postprocess.Ranges` (network over every tissue chunk, cores only),
  saved as `ranges.json` in the parts (a resumed slide reuses it)."""
  from diffmix_jax.metrics import postprocess  # pylint: disable=g-import-not-at-top
  path = parts / 'ranges.json'
  if path.exists():
    return postprocess.Ranges(*json.loads(path.read_text()))
  g, acc = plan.grid, [None]

  def on_map(ch, pred_map, y0, x0):
    cy0, cy1, cx0, cx1 = g.to_px(*g.core_blocks(*ch))
    region = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
    acc[0] = postprocess.merge_ranges(acc[0], postprocess.raw_ranges(
        pred_map[..., 2], pred_map[..., 3], ksize, region))

  logging.info('%s: first pass (slide-wide HV ranges) over %d chunks', plan.slide.path.name,
               len(_tissue_chunks(plan)))
  _stream(plan, predict, _tissue_chunks(plan), times, on_map)
  ranges = acc[0] or postprocess.Ranges((0, 0), (0, 0), (0, 0), (0, 0))
  wdir.atomic_write(path, json.dumps(list(ranges)).encode())
  return ranges


def _tissue_chunks(plan: Plan) -> list:
  g = plan.grid
  return [ch for ch in g.order() if plan.windows[slice(*g.core_blocks(*ch)[:2]),
                                                  slice(*g.core_blocks(*ch)[2:])].any()]


def run_chunks(plan: Plan, model, predict, parts: pathlib.Path, opts: Options, times: dict) -> None:
  """Predicts every tissue chunk without a part, overlapping the four parts; adds seconds to `times`.

  With `opts.normalise == 'slide'` a first network pass finds the slide-wide ranges of the HV maps
  and their derivatives, so every chunk is post-processed as tile mode would the whole slide
  (docs/slides.md §3); with 'chunk' each extent is normalised on its own (HoVer-Net's WSI
  mode: one network pass).
  """
  from diffmix_jax.metrics import postprocess  # pylint: disable=g-import-not-at-top
  params = model.postprocess or postprocess.OFFICIAL
  todo = [ch for ch in _tissue_chunks(plan) if not cohort.part_path(parts, ch).exists()]
  if not todo:
    return
  ranges = (slide_ranges(plan, predict, parts, params.sobel_ksize, times)
            if opts.normalise == 'slide' else None)
  pool, pending, kept = executor(opts.workers), collections.deque(), {}
  progress = _progress(plan, len(todo), times)

  def on_map(ch, pred_map, y0, x0):
    pending.append((ch, pool.submit(postprocess_extent, pred_map, model.module.nr_types, params,
                                    ranges, y0, x0)))
    while len(pending) > max(opts.workers, 0):
      _commit(plan, parts, *pending.popleft(), kept, times)
      progress()

  try:
    _stream(plan, predict, todo, times, on_map)
    while pending:
      _commit(plan, parts, *pending.popleft(), kept, times)
      progress()
  finally:
    pool.shutdown()


def _commit(plan: Plan, parts: pathlib.Path, chunk, future, kept: dict, times: dict) -> None:
  """Keeps a chunk's nuclei by `chunks.select` against its earlier neighbours; saves its part."""
  nuclei = future.result()
  times['postprocess'] += nuclei.pop('seconds')
  start = time.perf_counter()
  earlier = []
  for ch in plan.grid.earlier_neighbours(*chunk):
    if ch not in kept:
      kept[ch] = cohort.load_part(parts, ch) or cohort.empty_nuclei()
    earlier.append(kept[ch])
  idx = chunks_lib.select(plan.grid, *chunk, nuclei, cohort.concat(earlier))
  mine = {k: nuclei[k][idx] for k in cohort.FIELDS}
  mine['contours'] = [nuclei['contours'][k] for k in idx]
  cohort.save_part(parts, chunk, mine)
  kept[chunk] = mine
  for ch in [c for c in kept if c[0] < chunk[0] - 2 * plan.grid.margin - 1]:
    del kept[ch]  # Rows this far above can no longer meet a later chunk's extent.
  times['write'] += time.perf_counter() - start
  times['chunks'] += 1


def _progress(plan: Plan, total: int, times: dict):
  """Logs chunks done, windows/s, mm² of tissue per minute and the ETA, every 10 s and at the end."""
  start, last = time.monotonic(), [time.monotonic()]
  tissue_mm2 = plan.windows.sum() * (plan.grid.out_size * plan.geom.mpp) ** 2 / 1e6
  per_window = tissue_mm2 / max(1, plan.windows.sum())

  def progress():
    now, done = time.monotonic(), times['chunks']
    if now - last[0] < 10 and done < total:
      return
    last[0], elapsed = now, max(now - start, 1e-9)
    eta = (total - done) * elapsed / max(done, 1)
    logging.info('%s: chunk %d/%d, %.1f windows/s, %.2f mm² tissue/min, ETA %.0f s',
                 plan.slide.path.name, done, total, times['windows'] / elapsed,
                 times['windows'] * per_window / elapsed * 60, eta)

  return progress


def finish_slide(plan: Plan, folder: pathlib.Path, parts: pathlib.Path, table, model_mpp: float,
                 times: dict) -> dict:
  """Streams the parts into the outputs, writes the tissue mask; returns the summary."""
  start, geom = time.perf_counter(), plan.geom
  out = writers.SlideWriters(folder, table, geom.level0_per_px, geom.mpp, plan.slide_key,
                             plan.slide.magnification, plan.thumbnail,
                             plan.thumbnail.shape[1] / plan.slide.dims[0][0])
  try:
    for ch in plan.grid.order():
      part = cohort.load_part(parts, ch)
      if part is not None:
        out.add(part)
    out.close()
  except BaseException:
    out.abort()
    raise
  writers.write_png(folder / TISSUE_MASK, plan.mask)
  times['write'] += time.perf_counter() - start
  tissue_mm2 = float(plan.mask.mean()) * geom.width * geom.height * geom.mpp ** 2 / 1e6
  counts = {table[t][0]: int(out.counts[t]) for t in range(1, len(table))}
  summary = {
      'slide': str(plan.slide.path), 'mpp': geom.mpp, 'model_mpp': model_mpp, 'level': geom.level,
      'resampled': geom.scale != 1.0, 'level0_per_px': geom.level0_per_px,
      'work_size': [geom.width, geom.height], 'tissue_mm2': tissue_mm2, 'nuclei': int(out.n),
      'counts': counts, 'per_mm2': {k: v / tissue_mm2 if tissue_mm2 else 0.0 for k, v in counts.items()},
      'windows': int(plan.windows.sum()), 'chunks': len(plan.grid.order()),
      'seconds': {k: float(times[k]) for k in ('read', 'network', 'postprocess', 'write')}}
  if not plan.windows.any():
    summary['note'] = 'no tissue found: the outputs hold no nuclei'
  return summary


def predict_slide(path: pathlib.Path, model, predict, out: pathlib.Path, table, model_mpp: float,
                  opts: Options, plan: Plan | None = None) -> dict:
  """Predicts one slide into `out/<stem>/` (skipped when finished by the same run key).

  Returns:
    The summary (written as summary.json), with `skipped` True when nothing was redone.
  Raises:
    ValueError / FileNotFoundError naming the slide, on unreadable input.
  """
  plan = plan or plan_slide(path, model, model_mpp, opts)
  folder = out / path.stem
  if cohort.is_finished(folder, plan.key):
    return dict(json.loads((folder / SUMMARY).read_text()), skipped=True)
  times = collections.Counter(read=0.0, network=0.0, postprocess=0.0, write=0.0)
  start = time.perf_counter()
  parts = cohort.open_parts(folder, plan.key)
  run_chunks(plan, model, predict, parts, opts, times)
  summary = finish_slide(plan, folder, parts, table, model_mpp, times)
  summary['seconds']['wall'] = time.perf_counter() - start
  wdir.atomic_write(folder / SUMMARY, json.dumps(summary, indent=1).encode())
  cohort.mark_finished(folder, plan.key)
  return dict(summary, skipped=False)
