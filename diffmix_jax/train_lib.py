"""Small pieces both trainers share: writers, progress, optimizer, EMA, NaN guard, image grids."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
from absl import logging

# Colours of merged class ids 0..4 in label previews (background black).
CLASS_COLOURS = np.array([[0, 0, 0], [255, 200, 0], [220, 30, 30], [30, 120, 255], [40, 200, 80],
                          [200, 80, 220]], np.uint8)


def jit_init(init, out_shardings=None):
  """`jax.jit(init)`, compiled without backend optimisation on CPU.

  An init runs once, but the XLA CPU compiler spends ~30 s optimising the hundreds of threefry
  calls of a model's initialisers (HoVer-Net, the SDM); at optimisation level 0 it takes half that.
  Other backends compile as usual.
  """
  opts = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
  return jax.jit(init, out_shardings=out_shardings, compiler_options=opts)


def create_writer(logdir: str) -> metric_writers.MetricWriter:
  """TensorBoard writer on process 0; plain logging elsewhere."""
  return metric_writers.create_default_writer(logdir, just_logging=jax.process_index() > 0,
                                              asynchronous=False)


def create_progress(total_steps: int, writer) -> periodic_actions.ReportProgress:
  """Logs step, steps/s and ETA (every 30 s)."""
  return periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer, every_secs=30)


def log_overview(config, params) -> None:
  """Logs the config and the parameter table (names, shapes, sizes) at the start of a run."""
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


def check_finite(first_bad_step: int, where: str) -> None:
  """Raises FloatingPointError naming the first step whose loss was not finite."""
  if first_bad_step >= 0:
    raise FloatingPointError(
        f'{where}: non-finite loss at step {first_bad_step}; that update and all later ones were '
        'skipped, and the last checkpoint before it is kept. Lower the learning rate or check the '
        'data, then rerun to resume from it.')


def colour_labels(type_map: np.ndarray, edges: np.ndarray | None = None) -> np.ndarray:
  """Classes in colour (and instance edges in white): uint8 [..., H, W, 3]."""
  out = CLASS_COLOURS[np.clip(type_map, 0, len(CLASS_COLOURS) - 1)]
  if edges is not None:
    out = np.where(edges[..., None], np.uint8(255), out)
  return out.astype(np.uint8)


def to_uint8(x: np.ndarray) -> np.ndarray:
  """[-1, 1] float images -> uint8 (x + 1) * 127.5, rounded and clipped."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(columns: list[np.ndarray]) -> np.ndarray:
  """Rows of examples, one column per kind: each entry uint8 [N, H, W, 3] -> uint8 [N*H, K*W, 3]."""
  rows = np.concatenate(columns, axis=2)  # [N, H, K*W, 3]
  return rows.reshape(-1, *rows.shape[2:])
