"""Stage `report`: `<workdir>/report/` — metrics baseline vs DiffMix, plots, sample grids, summary.

Reads what the other stages wrote (`eval/<run>.json`, `mixed_labels/`, `synthetic/preview.png`,
`timings.json`, `config.json`) and writes `metrics.json`, `report.md` and its PNGs, plus the same
scalars and images to TensorBoard (`report/tb`).
"""

import io
import json
import os
import pathlib

from absl import logging
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from diffmix_jax.core import arms  # pylint: disable=g-import-not-at-top,wrong-import-position
from diffmix_jax.metrics import run_stats  # pylint: disable=g-import-not-at-top,wrong-import-position
from diffmix_jax import workdir as wdir  # pylint: disable=g-import-not-at-top,wrong-import-position

RUNS = tuple(arms.ARMS)  # Row order of tables and figures.
TABLE_KEYS = ('dice', 'aji', 'aji_plus', 'pq', 'f_d', 'acc')


def _read_json(path: pathlib.Path, what: str) -> dict:
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist: run the {what} stage first')
  return json.loads(path.read_text())


def collect(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """metrics.json content: per arm the evaluate JSON of its first seed (seed 0 by default), plus
  timings and the config name.

  Also `runs` (`{arm: {seed: evaluate JSON}}`), `summary` (mean, s.d., n per arm) and `paired`
  (per-seed differences arm - baseline with their 95 % interval), from `run_stats`, and
  `hovernet_seeds`: the seeds vary HoVer-Net only (one SDM, one mixing draw).
  """
  root = pathlib.Path(workdir)
  out = {'config': config.name, 'dataset': config.data.name,
         'tiles': {split: ','.join(config.data[f'{split}_tiles']) or 'all'
                   for split in ('train', 'test')}}
  runs = {}
  for arm, seed in arms.runs(config):
    runs.setdefault(arm, {})[str(seed)] = _read_json(
        wdir.eval_json(workdir, arms.run_name(arm, seed)), 'evaluate')
  first = str(arms.seeds(config)[0])
  for arm, per_seed in runs.items():
    out[arm] = per_seed[first]
  fidelity = wdir.eval_json(workdir, wdir.SYNTHETIC_FIDELITY)
  if fidelity.exists() and 'baseline' in out:
    out['synthetic_fidelity'] = {'synthetic': json.loads(fidelity.read_text()),
                                 'real_test': out['baseline']}
  out['hovernet_seeds'] = arms.seeds(config)
  out['runs'] = runs
  out['summary'] = run_stats.summarize(runs)
  out['paired'] = run_stats.paired(runs)
  timings = root / wdir.TIMINGS
  out['timings_s'] = json.loads(timings.read_text()) if timings.exists() else {}
  return out


def _figure_png(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=110, bbox_inches='tight')
  plt.close(fig)
  return buf.getvalue()


def f1_bars(metrics: dict, class_names: list[str]) -> bytes:
  """Per-class F_c bars, one per run: the mean over seeds, error bars one s.d. (none for n = 1)."""
  runs = [r for r in RUNS if r in metrics]
  classes = sorted({int(c) for r in runs for c in metrics[r]['f_c'] if int(c) > 0})
  fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(classes), 3.2))
  width = 0.8 / max(len(runs), 1)
  for k, run in enumerate(runs):
    summary = metrics.get('summary', {}).get(run, {}).get('f_c', {})
    values = [summary[str(c)]['mean'] if str(c) in summary else np.nan for c in classes]
    sds = [summary[str(c)]['sd'] if str(c) in summary and summary[str(c)]['sd'] is not None
           else np.nan for c in classes]
    n = max([summary[str(c)]['n'] for c in classes if str(c) in summary], default=0)
    ax.bar(np.arange(len(classes)) + k * width, values, width, yerr=sds, capsize=3,
           label=f'{run} (n={n})')
  ax.set_xticks(np.arange(len(classes)) + width * (len(runs) - 1) / 2)
  ax.set_xticklabels([class_names[c] if c < len(class_names) else str(c) for c in classes])
  ax.set_ylabel('F1 (F_c), mean ± s.d. over seeds')
  ax.set_ylim(0, 1)
  ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.12), ncol=4)  # Off the bars.
  ax.set_title('Per-class detection+classification F1 on the test split')
  return _figure_png(fig)


def fidelity_bars(fidelity: dict, class_names: list[str]) -> bytes:
  """The seed-0 baseline model on the real test tiles and on the synthetic patches: Dice, PQ, F_d
  and F_c per class side by side."""
  sets = ('real_test', 'synthetic')
  classes = sorted({int(c) for k in sets for c in fidelity[k]['f_c'] if int(c) > 0})
  labels = ['Dice', 'PQ', 'F_d'] + [f'F_c {class_names[c] if c < len(class_names) else c}'
                                    for c in classes]
  fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(labels), 3.2))
  for k, name in enumerate(sets):
    m = fidelity[name]
    values = [m['dice'], m['pq'], m['f_d']] + [m['f_c'].get(str(c), np.nan) for c in classes]
    ax.bar(np.arange(len(labels)) + 0.4 * k, values, 0.4,
           label=f"{name.replace('_', ' ')} ({m['num_images']} images, {m['num_true']} nuclei)")
  ax.set_xticks(np.arange(len(labels)) + 0.2)
  ax.set_xticklabels(labels, rotation=20)
  ax.set_ylim(0, 1)
  ax.legend(fontsize=8, loc='upper center', bbox_to_anchor=(0.5, -0.22), ncol=2)
  ax.set_title('Baseline model (real data only) on real test tiles vs synthetic patches')
  return _figure_png(fig)


def paired_dots(metrics: dict, class_names: list[str]) -> bytes:
  """One panel per class (F_c): per seed a line from the baseline's value to each other arm's."""
  runs = metrics['runs']
  others = [r for r in RUNS if r in runs and r != run_stats.REFERENCE]
  ref = runs[run_stats.REFERENCE]
  classes = sorted({int(c) for per_seed in runs.values() for m in per_seed.values()
                    for c in m['f_c'] if int(c) > 0})
  fig, axes = plt.subplots(1, len(classes), figsize=(0.6 + 2.2 * len(classes), 3.0), sharey=True,
                           squeeze=False)
  colours = plt.get_cmap('tab10')
  for ax, c in zip(axes[0], classes):
    for k, seed in enumerate(sorted(ref, key=int)):
      for x, arm in enumerate(others, start=1):
        a, b = ref[seed]['f_c'].get(str(c)), runs[arm].get(seed, {}).get('f_c', {}).get(str(c))
        if a is not None and b is not None:
          ax.plot([0, x], [a, b], '-o', ms=3, lw=1, color=colours(k % 10),
                  label=f's{seed}' if x == 1 else None)
    ax.set_xticks(range(len(others) + 1))
    ax.set_xticklabels([run_stats.REFERENCE] + others, fontsize=9)
    ax.set_xlim(-0.35, len(others) + 0.35)
    ax.set_title(f'F_c {class_names[c] if c < len(class_names) else c}')
    ax.set_ylim(-0.03, 1.03)
  axes[0][0].set_ylabel('F1 per seed')
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='lower center', bbox_to_anchor=(0.5, -0.12), ncol=10,
             fontsize=8)
  return _figure_png(fig)


def metrics_table(metrics: dict, class_names: list[str]) -> str:
  """Markdown table: one row per run, columns Dice, AJI, AJI+, PQ, F_d, acc, F_c per class."""
  runs = [r for r in RUNS if r in metrics]
  classes = sorted({int(c) for r in runs for c in metrics[r]['f_c'] if int(c) > 0})
  head = ['run'] + [k.replace('_', ' ').upper() if k != 'f_d' else 'F_d' for k in TABLE_KEYS] + [
      f'F_c {class_names[c] if c < len(class_names) else c}' for c in classes]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for run in runs:
    m = metrics[run]
    row = [run] + [f'{m[k]:.4f}' for k in TABLE_KEYS] + [
        f'{m["f_c"][str(c)]:.4f}' if str(c) in m['f_c'] else '—' for c in classes]
    lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines)


def summary_tables(metrics: dict, class_names: list[str]) -> str:
  """Markdown: mean ± s.d. over seeds per arm, then paired differences against baseline with their
  95 % intervals, then the differences' Wilcoxon p."""
  summary, paired = metrics.get('summary', {}), metrics.get('paired', {})
  classes = sorted({int(c) for m in summary.values() for c in m['f_c'] if int(c) > 0})
  name = lambda c: class_names[c] if c < len(class_names) else str(c)
  keys = ('dice', 'aji', 'pq', 'f_d', 'acc')
  columns = [k.upper() if k != 'f_d' else 'F_d' for k in keys] + [f'F_c {name(c)}' for c in classes]

  def table(title: str, entries: dict, fmt) -> list[str]:
    head = [title, 'n'] + columns
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for arm, m in entries.items():
      lines.append('| ' + ' | '.join([arm, str(m['dice']['n'])] + [fmt(m[k]) for k in keys] + [
          fmt(m['f_c'].get(str(c))) for c in classes]) + ' |')
    return lines

  def diff(e):
    if e is None or e['mean_diff'] is None:
      return '—'
    if e['ci95_low'] is None:
      return f"{e['mean_diff']:+.3f}"
    return f"{e['mean_diff']:+.3f} [{e['ci95_low']:+.3f}, {e['ci95_high']:+.3f}]"

  p = lambda e: '—' if e is None or e.get('wilcoxon_p') is None else f"{e['wilcoxon_p']:.3g}"
  lines = table('arm', summary, run_stats.format_mean_sd)
  if paired:
    columns = [f'Δ {c}' for c in columns]
    lines += [''] + table('arm − baseline', paired, diff)
    lines += [''] + table('Wilcoxon p (two-sided)', paired, p)
  return '\n'.join(lines)


def write_report(config: ml_collections.ConfigDict, workdir: str) -> pathlib.Path:
  """Writes every report file; returns the report folder."""
  root = pathlib.Path(workdir)
  out = wdir.StageDir(workdir, wdir.REPORT)
  metrics = collect(config, workdir)
  names = list(config.data.class_names)
  out.write_text('metrics.json', json.dumps(metrics, indent=2))
  out.write_bytes('f1_per_class.png', f1_bars(metrics, names))
  copied = {}
  for src, dst in ((root / wdir.MIXED_LABELS / wdir.CLASS_HISTOGRAM, 'class_histogram.png'),
                   (root / wdir.MIXED_LABELS / wdir.PREVIEW, 'mixed_labels_preview.png'),
                   (root / wdir.SYNTHETIC / wdir.PREVIEW, 'synthetic_samples.png')):
    if src.exists():
      out.write_bytes(dst, src.read_bytes())
      copied[dst] = True
  summary = {}
  mixed_summary = root / wdir.MIXED_LABELS / wdir.SUMMARY
  if mixed_summary.exists():
    summary = json.loads(mixed_summary.read_text())
  md = [f'# DiffMix report: {config.name} ({config.data.name})', '',
        f"Tiles: train {metrics['tiles']['train']}; test {metrics['tiles']['test']}.", '',
        '## Segmentation and classification on the test split', '',
        f"First seed ({metrics['hovernet_seeds'][0]}) of each arm.", '',
        metrics_table(metrics, names), '',
        'Dice, AJI, AJI+ and PQ are means over test tiles; F_d (detection F1), acc and F_c '
        '(per-class F1, HoVer-Net weights 2,2,1,1) are pooled over the split (docs/hovernet.md §5).', '',
        '![per-class F1](f1_per_class.png)', '',
        '## Over seeds', '',
        'Mean ± sample s.d. over the HoVer-Net seeds of each arm, then the paired difference '
        'arm − baseline at equal seeds with its 95 % t interval (none for n = 1), and the '
        'two-sided Wilcoxon signed-rank p of the same differences. HoVer-Net '
        f"seeds {', '.join(map(str, metrics['hovernet_seeds']))}: they vary HoVer-Net's init, "
        'batch order and augmentation only; every arm reads the one SDM and the one mixing draw '
        'of this workdir, and arms of a seed train the same steps on the same real batches.', '',
        summary_tables(metrics, names), '']
  if metrics['paired'] and len(metrics['hovernet_seeds']) > 1:
    out.write_bytes('paired_seeds.png', paired_dots(metrics, names))
    md += ['Each seed from the baseline to every other arm, per class:', '',
           '![paired seeds](paired_seeds.png)', '']
  if 'synthetic_fidelity' in metrics:
    out.write_bytes('synthetic_fidelity.png', fidelity_bars(metrics['synthetic_fidelity'], names))
    md += ['## Synthetic fidelity', '',
           'The baseline model (trained on real data only) reads every synthetic patch and is '
           'scored against the label map the patch was rendered from, beside its score on the '
           'real test tiles: a class the SDM renders recognisably scores alike on both.', '',
           '![synthetic fidelity](synthetic_fidelity.png)', '']
  if summary:
    md += ['## Label maps before and after mixing', '',
           f"Replacements: {summary.get('replacements')} of {summary.get('targets')} targets; "
           f"normalised class entropy {summary.get('normalised_entropy_before', 0):.3f} → "
           f"{summary.get('normalised_entropy_after', 0):.3f}; enlarging moved "
           f"{summary.get('enlarge_moved_per_patch', 0):.2f} nuclei per patch.", '']
  if 'class_histogram.png' in copied:
    md += ['![class counts before and after balancing](class_histogram.png)', '']
  if 'synthetic_samples.png' in copied:
    md += ['## Synthetic samples', '',
           'Columns: mixed label (classes in colour), original image crop, synthetic image, '
           'synthetic image with instance contours.', '',
           '![synthetic samples](synthetic_samples.png)', '']
  md += ['## Timings (seconds, first full run of each stage)', '', '| stage | s |', '|---|---|']
  md += [f'| {k} | {v:.1f} |' for k, v in metrics['timings_s'].items()]
  md += ['', '## Config', '', '```', config.to_json_best_effort(indent=1)[:20000], '```', '']
  out.write_text('report.md', '\n'.join(md))
  _to_tensorboard(out, metrics)
  return out.path


def _to_tensorboard(out: wdir.StageDir, metrics: dict) -> None:
  from diffmix_jax.core import writers  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  writer = writers.create_writer(out.tensorboard)
  for run in RUNS:
    if run in metrics:
      scalars = {f'{run}/{k}': metrics[run][k] for k in TABLE_KEYS}
      scalars.update({f'{run}/f_c_{c}': v for c, v in metrics[run]['f_c'].items()})
      writer.write_scalars(0, scalars)
  images = {p.stem: np.asarray(Image.open(p).convert('RGB'))[None] for p in out.path.glob('*.png')}
  writer.write_images(0, images)
  writer.flush()


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Stage entry: writes the report; a no-op when done for the same runs and post-processing (delete
  report/ to redraw it); runs added to the config since, or other `eval.postprocess` values, redraw
  it."""
  out = wdir.StageDir(workdir, wdir.REPORT)
  info = {'runs': [arms.run_name(a, s) for a, s in arms.runs(config)],
          'postprocess': config.eval.postprocess.to_dict()}
  if out.done() and json.loads((out.path / wdir.DONE).read_text()) == info:
    logging.info('report: already done (%s)', out.path)
    return
  path = write_report(config, workdir)
  out.mark_done(info)
  logging.info('report: %s', os.path.join(path, 'report.md'))
