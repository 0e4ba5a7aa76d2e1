"""Small pieces both trainers share: writers, progress, optimizer, EMA, NaN guard, image grids.

CLU's writers import TensorFlow (~8 CPU-s); only a process that writes TensorBoard pays for it:
process 0's writers. Progress and the other processes' writers log through absl alone.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from diffmix_jax.data import labels



def jit_init(init, out_shardings=None):
  """`jax.jit(init)`, compiled without backend optimisation on CPU.

  An init runs once, but the XLA CPU compiler spends ~30 s optimising the hundreds of threefry
  calls of a model's initialisers (HoVer-Net, the SDM); at optimisation level 0 it takes half that.
  Other backends compile as usual.
  """
  opts = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
  return jax.jit(init, out_shardings=out_shardings, compiler_options=opts)


class LogWriter:
  """The writer of processes other than 0: scalars to the log, images dropped (no TensorBoard)."""

  def write_scalars(self, step: int, scalars: dict) -> None:
    logging.info('[%d] %s', step, ', '.join(f'{k}={float(v):.6g}' for k, v in scalars.items()))

  def write_images(self, step: int, images: dict) -> None:
    del step, images

  def flush(self) -> None:
    pass


def create_writer(logdir: str):
  """CLU's TensorBoard writer (and log) on process 0; a `LogWriter` elsewhere."""
  if jax.process_index() > 0:
    return LogWriter()
  from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  return metric_writers.create_default_writer(logdir, asynchronous=False)


def create_progress(total_steps: int, every_secs: float = 30.0):
  """`progress(step)`: logs step, steps/s and ETA at most every `every_secs` and at the last step
  (the trainers write their rates to TensorBoard themselves)."""
  last = {'time': None, 'step': None}

  def progress(step: int) -> None:
    now = time.monotonic()
    if last['step'] is None:  # The first call only starts the clock (it includes compiling).
      last.update(time=now, step=step)
      return
    if now - last['time'] < every_secs and step < total_steps:
      return
    rate = (step - last['step']) / max(now - last['time'], 1e-9)
    eta = (total_steps - step) / rate if rate > 0 else float('inf')
    logging.info('step %d/%d (%.1f %%), %.3g steps/s, ETA %s', step, total_steps,
                 100.0 * step / max(total_steps, 1), rate, _duration(eta))
    last.update(time=now, step=step)

  return progress


def _duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return '?'
  m, s = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def log_overview(config, params) -> None:
  """Logs the config and the parameter table (names, shapes, sizes) at the start of a run."""
  from clu import parameter_overview  # pylint: disable=g-import-not-at-top
  logging.info('config:\n%s', config)
  logging.info('parameters:\n%s', parameter_overview.get_parameter_overview(params))


def adam(schedule) -> optax.GradientTransformation:
  """Plain Adam as the official AdamW with weight_decay 0 (sdm.md §4.1): no decay, no clipping."""
  return optax.adam(learning_rate=schedule, b1=0.9, b2=0.999, eps=1e-8)


def phase_schedule(phase1_steps: int, lr1: float, lr2: float) -> optax.Schedule:
  """Constant lr1 for steps < phase1_steps, then constant lr2."""
  return lambda count: jnp.where(count < phase1_steps, lr1, lr2).astype(jnp.float32)


def ema_update(ema, params, rate: float):
  """ema <- rate * ema + (1 - rate) * params, leaf by leaf (sdm.md §4.4)."""
  return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema, params)


def guarded_update(state, loss: jax.Array, **new):
  """`state` with the fields of `new` and step + 1 when `loss` is finite; otherwise only step + 1 and
  `first_bad_step` (the first step whose loss was not finite) recorded, the fields kept as they were.
  Inside a jitted step: the check on the host is `check_finite`."""
  finite = jnp.isfinite(loss)
  kept = {k: jax.tree.map(lambda n, o: jnp.where(finite, n, o), v, getattr(state, k))
          for k, v in new.items()}
  return state.replace(step=state.step + 1, first_bad_step=jnp.where(
      (state.first_bad_step < 0) & ~finite, state.step, state.first_bad_step), **kept)


def check_finite(first_bad_step: int, where: str) -> None:
  """Raises FloatingPointError naming the first step whose loss was not finite."""
  if first_bad_step >= 0:
    raise FloatingPointError(
        f'{where}: non-finite loss at step {first_bad_step}; that update and all later ones were '
        'skipped, and the last checkpoint before it is kept. Lower the learning rate or check the '
        'data, then rerun to resume from it.')


def colour_labels(type_map: np.ndarray, edges: np.ndarray | None = None) -> np.ndarray:
  """Classes in colour (and instance edges in white): uint8 [..., H, W, 3]."""
  out = labels.class_colours(type_map)
  if edges is not None:
    out = np.where(edges[..., None], np.uint8(255), out)
  return out.astype(np.uint8)


def text_strip(width: int, texts, columns: bool = False, height: int = 24) -> np.ndarray:
  """White strip with black text: one line, or with `columns` each text centred over its equal
  share of the width (column titles). uint8 [height, width, 3]."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  img = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(img)
  if columns:
    w = width / len(texts)
    for i, t in enumerate(texts):
      draw.text((i * w + max((w - draw.textlength(t)) / 2, 2), height // 2 - 6), t, fill='black')
  else:
    draw.text((6, height // 2 - 6), '   '.join(texts), fill='black')
  return np.asarray(img)


def legend_strip(width: int, class_names, height: int = 24) -> np.ndarray:
  """White strip naming each class (id 1 on) beside its palette colour: uint8 [height, width, 3]."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  img = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(img)
  x = 6
  for k, name in enumerate(class_names[1:], start=1):
    colour = tuple(int(v) for v in labels.class_colours(np.array(k)))
    draw.rectangle([x, height // 2 - 7, x + 14, height // 2 + 7], fill=colour, outline='black')
    text = f'{k} {name}'
    draw.text((x + 20, height // 2 - 6), text, fill='black')
    x += 36 + int(draw.textlength(text))
  return np.asarray(img)


def to_uint8(x: np.ndarray) -> np.ndarray:
  """[-1, 1] float images -> uint8 (x + 1) * 127.5, rounded and clipped."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(columns: list[np.ndarray]) -> np.ndarray:
  """Rows of examples, one column per kind: each entry uint8 [N, H, W, 3] -> uint8 [N*H, K*W, 3]."""
  rows = np.concatenate(columns, axis=2)  # [N, H, K*W, 3]
  return rows.reshape(-1, *rows.shape[2:])
