"""The workdir: the contract between stages. Every folder and file name a stage writes for another
stage (or for a rerun) is spelled here and nowhere else.

  config.json, timings.json     main: the config used, seconds per stage
  jax_cache/                    main: persistent XLA compilation cache
  tfds/                         build_data: the TFDS dataset (unless `data.data_dir` names another)
  build_data/summary.json       build_data: counts per split and class
  diffusion/                    diffusion_train: checkpoints, `ema_params.msgpack`, preview grid
  mixed_labels/<kind>/<tile>.npz  mix_labels: balanced / enlarged label maps, summary and figures
  synthetic/                    sample: shards, TFDS set, `consep_format/` folder, preview
  hovernet_<run>/               hovernet_train: checkpoints, `variables.msgpack`
  eval/<label>.json, eval/<label>/{pred,true}/   evaluate: metrics and `.mat` records per run
  eval/<label>/tissue.json      evaluate: {tile: tissue} of the test tiles, when they carry one
  report/                       report: metrics.json, report.md, figures

Every file is written to a temporary name in the same folder and renamed into place, so a killed run
never leaves a half file that a rerun trusts. A stage writes `DONE` last; a rerun that finds it returns.
"""

import json
import os
import pathlib
import tempfile

DONE = 'DONE'

CONFIG = 'config.json'
TIMINGS = 'timings.json'
COMPILATION_CACHE = 'jax_cache'
BUILD_DATA = 'build_data'
DIFFUSION = 'diffusion'
EMA_PARAMS = 'ema_params.msgpack'  # In DIFFUSION: the EMA weights the sample stage renders with.
MIXED_LABELS = 'mixed_labels'
SYNTHETIC = 'synthetic'
EVAL = 'eval'
REPORT = 'report'
HOVERNET_VARIABLES = 'variables.msgpack'  # In hovernet_<run>: the final eval variables.
PREVIEW = 'preview.png'  # In MIXED_LABELS and SYNTHETIC: the stage's picture.
SUMMARY = 'summary.json'  # In BUILD_DATA and MIXED_LABELS.
CLASS_HISTOGRAM = 'class_histogram.png'  # In MIXED_LABELS.


def tfds_dir(config, workdir: os.PathLike) -> str:
  """The TFDS data_dir of the real dataset: `config.data.data_dir`, else `<workdir>/tfds`."""
  return config.data.data_dir or os.path.join(workdir, 'tfds')


def ema_params_path(workdir: os.PathLike) -> str:
  return os.path.join(workdir, DIFFUSION, EMA_PARAMS)


def mixed_dir(workdir: os.PathLike, kind: str) -> pathlib.Path:
  """`<workdir>/mixed_labels/<kind>/`: one `<tile>.npz` per tile (mixing/files.py)."""
  return pathlib.Path(workdir) / MIXED_LABELS / kind


def synthetic_dir(workdir: os.PathLike) -> pathlib.Path:
  return pathlib.Path(workdir) / SYNTHETIC


def synthetic_shard_path(workdir: os.PathLike, k: int) -> pathlib.Path:
  """`<workdir>/synthetic/shards/shard_NNNNN.npz`: the sample stage's resumable unit."""
  return synthetic_dir(workdir) / 'shards' / f'shard_{k:05d}.npz'


def synthetic_tfds_dir(workdir: os.PathLike) -> pathlib.Path:
  return synthetic_dir(workdir) / 'tfds'


def synthetic_export_dir(workdir: os.PathLike) -> pathlib.Path:
  """`<workdir>/synthetic/consep_format/`: the sample stage's set in CoNSeP layout."""
  return synthetic_dir(workdir) / 'consep_format'


def synthetic_consep_dir(config, workdir: os.PathLike) -> str:
  """The synthetic set HoVer-Net reads: `hovernet.train.synthetic_dir`, else the sample stage's."""
  return config.hovernet.train.synthetic_dir or str(synthetic_export_dir(workdir))


def hovernet_stage(run: str) -> str:
  """Folder name of HoVer-Net run `run` (arms.run_name)."""
  return f'hovernet_{run}'


def hovernet_variables_path(workdir: os.PathLike, run: str) -> str:
  return os.path.join(workdir, hovernet_stage(run), HOVERNET_VARIABLES)


SYNTHETIC_FIDELITY = 'synthetic_fidelity'  # Eval label: the first baseline model on the synthetic set.


def eval_json(workdir: os.PathLike, label: str) -> pathlib.Path:
  """`<workdir>/eval/<label>.json`: metrics of one run (or of SYNTHETIC_FIDELITY)."""
  return pathlib.Path(workdir) / EVAL / f'{label}.json'


def eval_record_dirs(workdir: os.PathLike, label: str) -> tuple[pathlib.Path, pathlib.Path]:
  """`<workdir>/eval/<label>/pred/` and `.../true/`: one `<tile>.mat` record per test tile."""
  root = pathlib.Path(workdir) / EVAL / label
  return root / 'pred', root / 'true'


def eval_tissue_json(workdir: os.PathLike, label: str) -> pathlib.Path:
  """`<workdir>/eval/<label>/tissue.json`: {tile name: tissue} (PanNuke), next to pred/ and true/."""
  return pathlib.Path(workdir) / EVAL / label / 'tissue.json'


def atomic_write(path: os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file in the same folder and os.replace."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


class StageDir:
  """`<workdir>/<name>/` of one stage."""

  def __init__(self, workdir: os.PathLike, name: str):
    self.path = pathlib.Path(workdir) / name
    self.path.mkdir(parents=True, exist_ok=True)

  def done(self) -> bool:
    return (self.path / DONE).exists()

  def mark_done(self, info: dict | None = None) -> None:
    atomic_write(self.path / DONE, json.dumps(info or {}).encode())

  def write_bytes(self, relpath: str, data: bytes) -> pathlib.Path:
    out = self.path / relpath
    atomic_write(out, data)
    return out

  def write_text(self, relpath: str, text: str) -> pathlib.Path:
    return self.write_bytes(relpath, text.encode())

  @property
  def checkpoints(self) -> str:
    """`<stage>/checkpoints/`: the stage's orbax checkpoints (core/checkpoint.py)."""
    return str(self.path / 'checkpoints')

  @property
  def tensorboard(self) -> str:
    """`<stage>/tb/`: the stage's TensorBoard events."""
    return str(self.path / 'tb')
