"""The one training loop (core/loop.py) with a fake step: interval means, cadence, NaN guard, resume.

No model, no jit: the six tests' calls take 0.15 s together, the file 2.6 CPU-s with the JAX import
(2 cores, 2026-12-06).
"""

import flax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmix_jax.core import loop as loop_lib


@flax.struct.dataclass
class _State:
  step: jnp.ndarray
  first_bad_step: jnp.ndarray


class _Writer:
  def __init__(self):
    self.scalars, self.images = [], []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, dict(scalars)))

  def write_images(self, step, images):
    self.images.append(step)

  def flush(self):
    pass


def _fake_step(values):
  """A step whose scalars at global step i are values[i] (loss) and 10 * values[i] (other)."""
  def step_fn(state, batch, step):
    assert batch == step  # One batch per step, in order.
    return (state.replace(step=state.step + 1),
            {'loss': jnp.float32(values[step]), 'other': np.float32(10 * values[step])})
  return step_fn


def _loop(total, log_every, writer):
  return loop_lib.Loop('test', total, log_every, manager=None, writer=writer,
                       progress=lambda done: None)


def _state(step=0, bad=-1):
  return _State(step=jnp.int32(step), first_bad_step=jnp.int32(bad))


def test_logged_value_of_each_scalar_is_the_mean_of_its_interval():
  # Steps 0..6 (done 1..7), log every 3: intervals {1,2,3}, {4,5,6} and the phase end {7}.
  values = [1.0, 2.0, 6.0, -1.0, 0.5, 4.0, 7.0]
  writer = _Writer()
  _loop(7, 3, writer).run(_state(), range(7), iter(range(7)), _fake_step(values), phase=2,
                          rows=4, checkpoint_every=100)
  assert [s for s, _ in writer.scalars] == [3, 6, 7]
  assert [m['loss'] for _, m in writer.scalars] == [3.0, 3.5 / 3, 7.0]  # (1+2+6)/3, (-1+.5+4)/3.
  assert [m['other'] for _, m in writer.scalars] == [30.0, 35.0 / 3, 70.0]
  for _, m in writer.scalars:
    assert m['phase'] == 2.0 and m['images_per_sec'] == pytest.approx(4 * m['steps_per_sec'])


def test_interval_means_are_float64_means_of_the_step_values():
  means = loop_lib.IntervalMeans()
  for v in (0.1, 0.2, 0.7):
    means.add({'x': jnp.float32(v)})
  want = np.mean(np.float32([0.1, 0.2, 0.7]), dtype=np.float64)  # Not the float32 mean.
  assert means.pop() == {'x': want}
  assert means.pop() == {}  # Emptied.


def test_epoch_ends_and_resumed_start_set_the_intervals_and_after_step_sees_every_step():
  # A resumed phase: origin 4 (phase start), resumed at 6, epochs of 3 steps from the origin, log
  # every 4 global steps: log at 7 (epoch end), 8 (log_every), 10 (epoch end = phase end).
  values = [float(i) for i in range(10)]
  writer, seen = _Writer(), []
  _loop(10, 4, writer).run(_state(6), range(6, 10), iter(range(6, 10)), _fake_step(values),
                           phase=1, rows=1, checkpoint_every=3, origin=4, epoch_steps=3,
                           after_step=lambda done, state, batch: seen.append((done, batch)))
  assert [(s, m['loss']) for s, m in writer.scalars] == [(7, 6.0), (8, 7.0), (10, 8.5)]
  assert seen == [(7, 6), (8, 7), (9, 8), (10, 9)]


def test_checkpoint_cadence_counts_from_the_origin_and_saves_the_phase_end(monkeypatch):
  saved = []
  monkeypatch.setattr(loop_lib.checkpoint, 'save',
                      lambda manager, step, state, data: saved.append((step, data)))
  loop = loop_lib.Loop('test', 12, 100, manager=object(), writer=_Writer(),
                       progress=lambda done: None)
  loop.run(_state(2), range(2, 11), iter(range(2, 11)), _fake_step([0.0] * 12), phase=1, rows=1,
           checkpoint_every=4, origin=1, data_state=lambda done: {'step': done})
  assert saved == [(5, {'step': 5}), (9, {'step': 9}), (11, {'step': 11})]


def test_a_recorded_non_finite_loss_stops_the_run_at_the_next_log_step():
  def step_fn(state, batch, step):
    bad = jnp.where(step == 1, state.step, state.first_bad_step)  # As guarded_update records it.
    return state.replace(step=state.step + 1, first_bad_step=bad), {'loss': jnp.float32(0)}
  writer = _Writer()
  with pytest.raises(FloatingPointError, match='test: non-finite loss at step 1'):
    _loop(6, 2, writer).run(_state(), range(6), iter(range(6)), step_fn, phase=1, rows=1,
                            checkpoint_every=100)
  assert not writer.scalars  # The first log step (2) raised before writing.


def test_guarded_update_keeps_the_fields_and_records_the_first_bad_step():
  @flax.struct.dataclass
  class S:
    step: jnp.ndarray
    first_bad_step: jnp.ndarray
    w: jnp.ndarray

  s = S(step=jnp.int32(3), first_bad_step=jnp.int32(-1), w=jnp.float32(1))
  bad = loop_lib.guarded_update(s, jnp.float32(jnp.nan), w=jnp.float32(2))
  assert (int(bad.step), int(bad.first_bad_step), float(bad.w)) == (4, 3, 1.0)
  good = loop_lib.guarded_update(bad, jnp.float32(0.5), w=jnp.float32(5))
  assert (int(good.step), int(good.first_bad_step), float(good.w)) == (5, 3, 5.0)
