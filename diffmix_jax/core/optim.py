"""Optimisation pieces of the SDM trainer: Adam, its two-phase learning rate, the EMA.

optax builds Adam and the schedule (`join_schedules` of constants: the same float32 values as the
former `jnp.where`, bit for bit). The EMA is written out: optax's `incremental_update` computes
`(1 - (1 - rate)) * ema`, which for some rates is not `rate * ema` (0.1 -> 0.09999999999999998).
"""

import jax
import optax


def adam(schedule) -> optax.GradientTransformation:
  """Plain Adam as the official AdamW with weight_decay 0 (docs/sdm.md §4.1): no decay, no clipping."""
  return optax.adam(learning_rate=schedule, b1=0.9, b2=0.999, eps=1e-8)


def phase_schedule(phase1_steps: int, lr1: float, lr2: float) -> optax.Schedule:
  """Constant lr1 for steps < phase1_steps, then constant lr2 (float32 [])."""
  return optax.join_schedules([optax.constant_schedule(lr1), optax.constant_schedule(lr2)],
                              [phase1_steps])


def ema_update(ema, params, rate: float):
  """ema <- rate * ema + (1 - rate) * params, leaf by leaf (docs/sdm.md §4.4)."""
  return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema, params)
