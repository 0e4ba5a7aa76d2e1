"""The one training loop of both trainers (SDM, HoVer-Net): steps, per-interval scalar means,
progress, checkpoint cadence, resume and the NaN guard. A trainer brings its jitted step and its
batches; `Loop.run` does the rest for one phase's steps.

Scalars: every value a step returns is kept (on device) until the next log step, which writes the
mean of the interval's values (as flax's imagenet example does), so a curve is not as noisy as a
single step. The loop adds `steps_per_sec`, `images_per_sec` and `phase`.
"""

import dataclasses
import time
from typing import Any, Callable, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from diffmix_jax.core import checkpoint
from diffmix_jax.core import writers

# (state, batch, step) -> (state, metrics): one jitted update; `step` is the 0-based global step.
StepFn = Callable[[Any, Any, int], tuple[Any, dict]]


def jit_init(init, out_shardings=None):
  """`jax.jit(init)`, compiled without backend optimisation on CPU.

  An init runs once, but the XLA CPU compiler spends ~30 s optimising the hundreds of threefry
  calls of a model's initialisers (HoVer-Net, the SDM); at optimisation level 0 it takes half that.
  Other backends compile as usual.
  """
  opts = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
  return jax.jit(init, out_shardings=out_shardings, compiler_options=opts)


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


def restore_or_init(manager, abstract_state, state_sharding, init: Callable[[], Any], name: str
                    ) -> tuple[int, Any, dict | None]:
  """(start step, state, data state): the newest readable checkpoint's, else `init()` at step 0
  with no data state. A restored state that recorded a non-finite loss raises (`check_finite`)."""
  restored = checkpoint.restore_latest(manager, checkpoint.abstract(abstract_state, state_sharding))
  if restored is None:
    return 0, init(), None
  start, state, data_state = restored
  logging.info('%s: resumed from step %d', name, start)
  check_finite(int(state.first_bad_step), f'{name} (restored state)')
  return start, state, data_state


class IntervalMeans:
  """The scalars of the steps since the last log step, and their means."""

  def __init__(self):
    self._steps: list[dict] = []

  def add(self, metrics: dict) -> None:
    """Keeps one step's scalars (device arrays or numbers); nothing is copied to the host."""
    self._steps.append(metrics)

  def pop(self) -> dict[str, float]:
    """{name: mean over the kept steps} (float64 means of the float32 values); empties the store."""
    steps, self._steps = jax.device_get(self._steps), []
    if not steps:
      return {}
    return {k: float(np.mean([s[k] for s in steps], dtype=np.float64)) for k in steps[0]}


@dataclasses.dataclass
class Loop:
  """One run's loop state shared by its phases.

  Attributes:
    name: the run in messages ('diffusion_train', 'hovernet_train baseline').
    total: steps of the whole run (for progress).
    log_every: scalars every N global steps (and at every epoch and phase end).
    manager: the orbax manager of the run's checkpoints (None: no checkpoints, for tests).
    writer: `writers.create_writer`'s writer.
  """
  name: str
  total: int
  log_every: int
  manager: Any
  writer: Any
  progress: Callable[[int], None] = None

  def __post_init__(self):
    if self.progress is None:
      self.progress = writers.create_progress(self.total)

  @classmethod
  def create(cls, name: str, logdir: str, *, total: int, log_every: int, manager, config,
             state, start: int) -> 'Loop':
    """A loop writing TensorBoard to `logdir`; a fresh run (start 0) logs the config and params."""
    writer = writers.create_writer(logdir)
    if start == 0:
      writers.log_overview(config, jax.device_get(state.params))
    return cls(name, total, log_every, manager, writer)

  def run(self, state, steps: range, batches: Iterator, step_fn: StepFn, *, phase: int,
          rows: int, checkpoint_every: int, origin: int = 0, epoch_steps: int = 0,
          data_state: Callable[[int], dict] = lambda done: {'step': done},
          after_step: Callable[[int, Any, Any], None] | None = None):
    """Steps `steps` (0-based global steps; the phase's first not yet done to its last) of a phase.

    Args:
      state: the train state (has `first_bad_step`); donated to `step_fn`.
      steps: the steps to run; `steps.stop` is the phase end (logged and checkpointed).
      batches: yields one batch per step, passed to `step_fn` as it is.
      step_fn: (state, batch, step) -> (state, metrics of scalars).
      phase: the phase number written as the `phase` scalar.
      rows: images per step (for `images_per_sec`).
      checkpoint_every: checkpoint when (done - origin) is a multiple of it (and at the phase end).
      origin: where the phase's cadence counts from (0: global steps).
      epoch_steps: > 0: also log at every epoch end, (done - origin) a multiple of it.
      data_state: done -> the JSON data-iterator state saved with a checkpoint.
      after_step: (done, state, batch) after the log and checkpoint of each step (previews,
        validation): the hook decides when to act.

    Returns:
      The state after the last step.

    Raises:
      FloatingPointError: at a log step or checkpoint after a non-finite loss.
    """
    means, last_log, last_time = IntervalMeans(), steps.start, time.time()
    for step in steps:
      batch = next(batches)
      state, metrics = step_fn(state, batch, step)
      means.add(metrics)
      done = step + 1
      self.progress(done)
      epoch_end = epoch_steps > 0 and (done - origin) % epoch_steps == 0
      if done % self.log_every == 0 or epoch_end or done == steps.stop:
        scalars = means.pop()
        check_finite(int(state.first_bad_step), self.name)
        rate = (done - last_log) / max(time.time() - last_time, 1e-9)
        scalars.update(steps_per_sec=rate, images_per_sec=rate * rows, phase=float(phase))
        self.writer.write_scalars(done, scalars)
        last_log, last_time = done, time.time()
      if (done - origin) % checkpoint_every == 0 or done == steps.stop:
        check_finite(int(state.first_bad_step), self.name)
        if self.manager is not None:
          checkpoint.save(self.manager, done, state, data_state(done))
      if after_step is not None:
        after_step(done, state, batch)
    return state

  def finish(self) -> None:
    """Waits for the pending checkpoint saves, closes the manager (its threads and event loop) and
    flushes the writer."""
    if self.manager is not None:
      self.manager.close()  # Waits for the pending saves first.
    self.writer.flush()
