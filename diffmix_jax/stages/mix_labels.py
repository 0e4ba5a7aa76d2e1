"""Stage `mix_labels`: balancing and enlarging label maps of the training split in workdir/mixed_labels/.

Layout (every file written to a temporary name and renamed; `DONE` last; docs/method.md §2.5, §3.3):
  balance/<tile>.npz, enlarge/<tile>.npz   the maps (mixing/files.py writes and reads them)
  provenance.csv       one row per replacement: tile, target_id, donor_tile, donor_id, classes, present
  summary.json, class_histogram.png, preview.png, DONE
Read the maps back with `mixing.files.load_mixed`.
"""

import io
import json
import logging
import os
import pathlib

import matplotlib
matplotlib.use('Agg')
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from diffmix_jax.data import labels  # noqa: E402
from diffmix_jax.mixing import balancing  # noqa: E402
from diffmix_jax.mixing import enlarging  # noqa: E402
from diffmix_jax.mixing import files as mixed_files  # noqa: E402
from diffmix_jax.mixing import tiles as mixing_tiles  # noqa: E402
from diffmix_jax import workdir as wdir  # noqa: E402
from tfds_builders import raw_folders

def _save_figure(fig, path: pathlib.Path) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=100)
  plt.close(fig)
  wdir.atomic_write(path, buf.getvalue())


def balance_params(cfg) -> balancing.BalanceParams:
  """`balancing.BalanceParams` from `config.mix.balance` (§2.4; values checked by config_checks)."""
  cap = cfg.max_replacements_per_tile
  return balancing.BalanceParams(tuple(cfg.rare_classes), tuple(cfg.common_classes),
                                 float(cfg.target_fraction), float(cfg.area_ratio),
                                 int(cfg.dilation_iterations), float(cfg.border_margin),
                                 cfg.paste_mode, None if cap is None else int(cap))


def enlarge_params(cfg, patch_size: int, stride: int) -> enlarging.EnlargeParams:
  """`enlarging.EnlargeParams` from `config.mix.enlarge` and `config.sample`'s grid (§3.3, §4.1; values
  checked by config_checks). The `author_issue3` preset moves every interior nucleus by -3..3 px."""
  prob, low, high = cfg.axis_probability, cfg.shift_low, cfg.shift_high
  if cfg.preset == 'author_issue3':
    prob, low, high = 1.0, -3, 3
  if 2 * cfg.frame_margin == patch_size:
    logging.warning('config.mix.enlarge.frame_margin=%d leaves no interior in a %d px patch: '
                    'enlarging maps will equal the real labels', cfg.frame_margin, patch_size)
  return enlarging.EnlargeParams(int(cfg.frame_margin), float(prob), int(low), int(high),
                                 cfg.collision, int(patch_size), int(stride))


def _patch_sums(mask: np.ndarray, offsets: np.ndarray, size: int) -> np.ndarray:
  """int64 [P]: number of True pixels of `mask` [H, W] in each size² patch at `offsets` [P, 2]."""
  c = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
  c[1:, 1:] = mask.cumsum(0).cumsum(1)
  r, q = offsets[:, 0], offsets[:, 1]
  return c[r + size, q + size] - c[r, q + size] - c[r + size, q] + c[r, q]


def _patches_without_rare(type_maps, offsets, size: int, rare) -> tuple[int, int]:
  """(non-empty grid patches with no rare pixel, empty grid patches) over all tiles (§8 item 16)."""
  no_rare = empty = 0
  for t, off in zip(type_maps, offsets):
    nuclei = _patch_sums(t > 0, off, size)
    rare_px = _patch_sums(np.isin(t, rare), off, size)
    no_rare += int(np.sum((nuclei > 0) & (rare_px == 0)))
    empty += int(np.sum(nuclei == 0))
  return no_rare, empty


def _shares(counts: np.ndarray) -> tuple[list, float]:
  """Class shares and entropy normalised by ln(number of classes) of per-class counts [K]."""
  total = counts.sum()
  p = counts / total if total else np.zeros(len(counts))
  nz = p[p > 0]
  ent = float(-(nz * np.log(nz)).sum() / np.log(len(counts))) if len(counts) > 1 else 0.0
  return [float(v) for v in p], ent


def summarize(tiles, balanced, enlarged, bparams, seed: int, num_classes: int,
              patch_size: int) -> dict:
  """The summary.json dict: the measured quantities of §2.3 and §3.3 (§8 items 13-17).

  Args:
    tiles: real tiles (mixing_tiles.Tile), tile-name order.
    balanced: their balancing.BalanceResult, same order.
    enlarged: their enlarging.EnlargeResult, same order.
    bparams: balancing parameters (rare / common roles, border margin).
    seed: master seed, recorded.
    num_classes: classes incl. background; counts and shares are keyed '1'..'num_classes-1'.
    patch_size: side of the grid patches.

  Returns:
    A JSON-serialisable dict (counts int, shares and entropies float).
  """
  fg = range(1, num_classes)
  before = np.bincount(np.concatenate([t.classes[1:][t.areas[1:] > 0] for t in tiles] + [[0]]),
                       minlength=num_classes)[1:]
  after = np.bincount(np.concatenate([b.inst_type for b in balanced] + [[0]]),
                      minlength=num_classes)[1:]
  sb, eb = _shares(before)
  sa, ea = _shares(after)
  offsets = [e.offsets for e in enlarged]
  nb, empty = _patches_without_rare([t.classes[t.inst_map] for t in tiles], offsets, patch_size,
                                    bparams.rare_classes)
  na, _ = _patches_without_rare([b.type_map for b in balanced], offsets, patch_size,
                                bparams.rare_classes)
  donors = balancing.rare_donors(tiles, bparams)
  common = [mixing_tiles.eligible(t, bparams.border_margin)
            & np.isin(t.classes, bparams.common_classes) for t in tiles]
  reps = {b.name: int(len(b.provenance['target_id'])) for b in balanced}

  def hist(cls):
    return {str(c): int(v) for c, v in enumerate(np.bincount(cls, minlength=num_classes)) if c > 0}

  per_tile = {t.name: {'before': hist(t.classes[1:][t.areas[1:] > 0]), 'after': hist(b.inst_type)}
              for t, b in zip(tiles, balanced)}
  n_patches = int(sum(len(o) for o in offsets))

  def per(field):
    return float(sum(int(getattr(e, field).sum()) for e in enlarged) / max(n_patches, 1))

  return {
      'seed': int(seed),
      'tiles': len(tiles),
      'eligible_rare': int(sum(len(d) for d in donors)),
      'eligible_common': int(sum(int(c.sum()) for c in common)),
      'targets': int(sum(b.num_targets for b in balanced)),
      'replacements': int(sum(reps.values())),
      'replacements_per_tile': reps,
      'max_replacements_per_tile': max(reps.values(), default=0),
      'class_counts_before': {str(c): int(before[c - 1]) for c in fg},
      'class_counts_after': {str(c): int(after[c - 1]) for c in fg},
      'class_counts_per_tile': per_tile,
      'class_shares_before': {str(c): sb[c - 1] for c in fg},
      'class_shares_after': {str(c): sa[c - 1] for c in fg},
      'normalised_entropy_before': eb,
      'normalised_entropy_after': ea,
      'patches': n_patches,
      'patches_empty': empty,
      'patches_without_rare_before': nb,
      'patches_without_rare_after': na,
      'enlarge_nuclei_per_patch': per('num_nuclei'),
      'enlarge_interior_per_patch': per('num_interior'),
      'enlarge_moved_per_patch': per('num_moved'),
  }


def _class_cmap(num_classes: int) -> mcolors.ListedColormap:
  """The project's class palette (labels.CLASS_COLOURS) as a colormap over ids 0..num_classes-1."""
  return mcolors.ListedColormap(labels.class_colours(np.arange(num_classes)) / 255.0)


def plot_histogram(summary: dict, class_names, path: pathlib.Path) -> None:
  """Before/after instance counts per class as grouped bars, written to `path` (PNG)."""
  keys = list(summary['class_counts_before'])
  x = np.arange(len(keys))
  fig, ax = plt.subplots(figsize=(7, 4))
  for off, which in ((-0.2, 'before'), (0.2, 'after')):
    vals = [summary[f'class_counts_{which}'][k] for k in keys]
    ax.bar(x + off, vals, 0.4, label=f'{which} balancing')
  ax.set_xticks(x, [f'{k} {class_names[int(k)]}' for k in keys])
  ax.set_ylabel('nuclei (instances)')
  ax.set_title(f"Class counts, real vs balancing maps ({summary['replacements']} replacements)")
  ax.legend()
  fig.tight_layout()
  _save_figure(fig, path)


def most_moved_patches(enlarged, count: int) -> list[tuple[int, int, int]]:
  """(nuclei moved, tile index, patch index) of the `count` enlarging patches that moved the most,
  most first (ties: lower tile, then patch index). `enlarged`: EnlargeResult per tile."""
  ranked = sorted(((int(n), i, p) for i, e in enumerate(enlarged)
                   for p, n in enumerate(e.num_moved)), key=lambda x: (-x[0], x[1], x[2]))
  return ranked[:count]


def plot_preview(tiles, balanced, enlarged, count: int, num_classes: int, class_names,
                 path: pathlib.Path) -> None:
  """Real / balancing type maps of the tiles with the most replacements, beside the real /
  enlarging maps of the patches (of any tile) where enlarging moved the most nuclei."""
  by_reps = sorted(range(len(tiles)), key=lambda i: -len(balanced[i].provenance['target_id']))
  chosen = sorted(by_reps[:max(count, 1)])
  most_moved = most_moved_patches(enlarged, len(chosen))
  cmap = _class_cmap(num_classes)
  fig, axes = plt.subplots(len(chosen), 4, figsize=(13, 3.3 * len(chosen)), squeeze=False)
  for k, (row, i) in enumerate(zip(axes, chosen)):
    t, b = tiles[i], balanced[i]
    panels = [(t.classes[t.inst_map], f'{t.name}: real'),
              (b.type_map, f'balancing ({len(b.provenance["target_id"])} replaced)')]
    if k < len(most_moved):
      n, j, p = most_moved[k]
      e, te = enlarged[j], tiles[j]
      r, c = e.offsets[p]
      s = e.inst_maps.shape[1]
      panels += [(te.classes[te.inst_map[r:r + s, c:c + s]], f'{te.name} patch {p} at ({r}, {c})'),
                 (e.type_maps()[p], f'enlarging ({n} moved)')]
    for ax, (img, title) in zip(row, panels):
      ax.imshow(img, cmap=cmap, vmin=0, vmax=num_classes - 1, interpolation='nearest')
      ax.set_title(title, fontsize=9)
    for ax in row:
      ax.axis('off')
  handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(k)) for k in range(1, num_classes)]
  fig.legend(handles, class_names[1:], loc='lower center', ncol=num_classes - 1)
  fig.tight_layout(rect=(0, 0.04, 1, 1))
  _save_figure(fig, path)


def run(config, workdir: os.PathLike) -> None:
  """Runs the stage: real training labels -> balancing and enlarging maps (docs/method.md §2-§4.1).

  Args:
    config: the full experiment config (`configs/common.py`).
    workdir: experiment folder; outputs go to `workdir/mixed_labels/`.
  """
  stage = wdir.StageDir(workdir, wdir.MIXED_LABELS)
  if stage.done():
    logging.info('mix_labels: already done (%s)', stage.path)
    return
  num_classes = config.data.num_classes
  class_names = list(config.data.class_names)
  bparams = balance_params(config.mix.balance)
  eparams = enlarge_params(config.mix.enlarge, config.sample.patch_size, config.sample.grid_stride)
  # Imported here so that this NumPy stage does not load the pipeline's dependencies until it runs.
  from diffmix_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  raw = input_pipeline.load_split(config, workdir, 'train')
  raw = sorted(raw, key=lambda d: raw_folders.natural_key(d['name']))
  if not raw:
    raise ValueError('mix_labels: the training split has no tiles')
  if len({d['name'] for d in raw}) != len(raw):
    raise ValueError('mix_labels: tile names of the training split are not unique')
  tiles = [mixing_tiles.prepare_tile(d['name'], d['inst_map'], d['type_map'], num_classes,
                                     d.get('inst_centroid')) for d in raw]
  for t in tiles:
    if min(t.inst_map.shape) < eparams.patch_size:
      logging.warning('mix_labels: tile %s (%s) is smaller than %d px: no enlarging patches',
                      t.name, t.inst_map.shape, eparams.patch_size)
  seed, workers = config.seed, config.mix.num_workers
  balanced = balancing.balance_all(tiles, bparams, seed, workers)
  enlarged = enlarging.enlarge_all(tiles, eparams, seed, workers)
  summary = summarize(tiles, balanced, enlarged, bparams, seed, num_classes, eparams.patch_size)
  summary['messages'] = []
  write_balance = summary['eligible_rare'] > 0
  if not write_balance:
    msg = (f'no eligible rare nucleus (classes {bparams.rare_classes}, centroid >= '
           f'{bparams.border_margin} px from the edges) in the training split: the balancing set is '
           f'empty; enlarging maps are still written')
    logging.warning('mix_labels: %s', msg)
    summary['messages'].append(msg)
  summary['balance_tiles'] = [b.name for b in balanced] if write_balance else []
  summary['enlarge_tiles'] = [e.name for e in enlarged]

  names = [t.name for t in tiles]
  csv = ['tile,target_id,donor_tile,donor_id,original_class,donor_class,present']
  for b in balanced if write_balance else []:
    pv = b.provenance
    donor_names = np.array([names[i] for i in pv['donor_tile']], dtype=str)
    mixed_files.write_balanced(workdir, b, donor_names)
    csv += [f'{b.name},{r[0]},{names[r[1]]},{r[2]},{r[3]},{r[4]},{r[5]}' for r in zip(
        pv['target_id'], pv['donor_tile'], pv['donor_id'], pv['original_class'], pv['donor_class'],
        pv['present'])]
  for e in enlarged:
    mixed_files.write_enlarged(workdir, e)
  for kind, kept in (('balance', summary['balance_tiles']), ('enlarge', summary['enlarge_tiles'])):
    mixed_files.remove_stale(workdir, kind, kept)
  stage.write_text('provenance.csv', '\n'.join(csv) + '\n')
  plot_histogram(summary, class_names, stage.path / wdir.CLASS_HISTOGRAM)
  plot_preview(tiles, balanced, enlarged, config.mix.preview_tiles, num_classes, class_names,
               stage.path / wdir.PREVIEW)
  stage.write_text(wdir.SUMMARY, json.dumps(summary, indent=1))
  stage.mark_done({'seed': int(seed), 'tiles': len(tiles)})
  logging.info('mix_labels: %d tiles, %d replacements, %.2f moved per patch -> %s', len(tiles),
               summary['replacements'], summary['enlarge_moved_per_patch'], stage.path)
