"""HoVer-Net training pieces (docs/hovernet.md §3): the train state, the jitted step of either phase
(frozen encoder in phase 1, BN statistics, the docs/hovernet.md §3.1 loss, NaN guard), the StepLR
schedule, the trainer that binds them to a mesh, and the ImageNet encoder load. The
`hovernet_train` stage runs them through `core.loop`.
"""

import dataclasses
import functools
from typing import Any, Callable

from absl import logging
import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffmix_jax.core import loop
from diffmix_jax.core import sharding
from diffmix_jax.hovernet import losses as hovernet_losses
from diffmix_jax.hovernet import model as hovernet
from diffmix_jax.hovernet import torch_import as convert_hovernet


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 [], steps done over both phases.
  params: Any
  batch_stats: Any
  opt_state: Any
  first_bad_step: jax.Array  # int32 [], first step with a non-finite loss, -1 if none.


def _frozen_mask(tree) -> Any:
  """Pytree of bools: True where a leaf is frozen in phase 1 (docs/hovernet.md §1.5)."""
  flat = traverse_util.flatten_dict(tree)
  return traverse_util.unflatten_dict({p: hovernet.is_frozen_in_phase1(p) for p in flat})


def train_step(state: TrainState, batch: dict, lr: jax.Array, *, module, tx, phase1: bool,
               mse_weight: float, freeze_bn_stats: bool, tp_weights: tuple | None = None
               ) -> tuple[TrainState, dict]:
  """One Adam step on the docs/hovernet.md §3.1 loss; phase 1 freezes the encoder as a gradient
  path (the encoder still runs forward and its BN statistics update; docs/differences.md §2.1).

  Args:
    state: the train state (donated).
    batch: `image` uint8 [B, I, I, 3]; `np`, `tp` int32 [B, O, O]; `hv` float32 [B, O, O, 2].
    lr: float32 [] learning rate of this step (`Trainer.lr`). An argument, not a schedule baked
      into the step, so runs that differ only in their step counts share one compiled step (the
      persistent compilation cache then skips the second run's compile).
    tx: `ADAM`, the Adam direction without the learning rate.

  Returns:
    (new state, metrics of float32 scalars); a non-finite loss keeps the old state.
  """
  def loss_fn(params):
    out, upd = module.apply({'params': params, 'batch_stats': state.batch_stats},
                            batch['image'].astype(jnp.float32), train=True, freeze=phase1,
                            mutable=['batch_stats'])
    terms = hovernet_losses.compute_losses(out, batch, module.nr_types, mse_weight, tp_weights)
    return terms['loss'], (terms, upd['batch_stats'])

  (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if phase1:  # Belt and braces: frozen leaves get exactly zero gradient (Adam then moves nothing).
    grads = jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, grads, _frozen_mask(grads))
    if freeze_bn_stats:
      batch_stats = jax.tree.map(lambda new, old, f: old if f else new, batch_stats,
                                 state.batch_stats, _frozen_mask(batch_stats))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, jax.tree.map(lambda u: -lr * u, updates))
  new_state = loop.guarded_update(state, loss, params=params, batch_stats=batch_stats,
                                       opt_state=opt_state)
  metrics = dict(terms, grad_norm=optax.global_norm(grads))
  return new_state, metrics


# optax.adam(lr) is this chain followed by a scale of -lr, which train_step applies itself.
ADAM = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)


def step_lr(lr: float, decay_steps: int, gamma: float, count: int) -> np.float32:
  """StepLR stepped per epoch (docs/hovernet.md §3.2): lr until `decay_steps` optimizer steps, then
  lr * gamma, rounded once to float32 (optax's piecewise_constant_schedule multiplies in float32:
  5e-4 * 0.1 gives 5.0000002e-05, not 5e-05)."""
  return np.float32(lr if count < decay_steps else lr * gamma)


@dataclasses.dataclass
class Trainer:
  module: hovernet.HoVerNet
  abstract_state: TrainState
  state_sharding: Any
  init: Callable[[jax.Array], TrainState]
  steps: tuple[Callable, Callable]  # Jitted phase-1/2 (state, batch, lr) steps (donate the state).
  lr: Callable[[int, int], np.float32]  # (phase 0|1, optimizer step within the phase) -> lr.
  reset_optimizer: Callable[[TrainState], TrainState]  # Fresh phase-2 Adam (moments and count).


def create_trainer(config: ml_collections.ConfigDict, mesh, steps_per_epoch: tuple[int, int],
                   tp_weights: np.ndarray | None = None):
  """Model, the two optimizers (same structure, own schedules), shardings, jitted init and steps;
  `tp_weights` [nr_types] (or None) weights the TP cross-entropy, a constant of the steps."""
  tc = config.hovernet.train
  module = hovernet.create_hovernet(**config.hovernet.model)
  size = module.patch_shapes[0]

  def init(rng):
    v = module.init(rng, jnp.zeros((1, size, size, 3)))
    return TrainState(step=jnp.zeros((), jnp.int32), params=v['params'],
                      batch_stats=v['batch_stats'], opt_state=ADAM.init(v['params']),
                      first_bad_step=jnp.full((), -1, jnp.int32))

  abstract_state = jax.eval_shape(init, jax.random.key(0))
  state_sh = sharding.state_shardings(abstract_state, mesh, False)
  steps = tuple(jax.jit(
      functools.partial(train_step, module=module, tx=ADAM, phase1=p == 0,
                        mse_weight=tc.mse_weight, freeze_bn_stats=tc.phase1_freeze_bn_stats,
                        tp_weights=None if tp_weights is None else tuple(map(float, tp_weights))),
      in_shardings=(state_sh, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0) for p in (0, 1))
  reset = jax.jit(lambda s: s.replace(opt_state=ADAM.init(s.params)),
                  in_shardings=(state_sh,), out_shardings=state_sh, donate_argnums=0)
  lr = lambda phase, count: step_lr(tc.lr, tc.lr_step_epochs * steps_per_epoch[phase],
                                    tc.lr_gamma, count)
  return Trainer(module, abstract_state, state_sh, loop.jit_init(init, state_sh), steps, lr,
                 reset)


def eval_variables(state: TrainState) -> dict:
  """Host copy of the eval variables {'params', 'batch_stats'}."""
  return jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})


def load_pretrained(trainer: Trainer, state: TrainState, path: str) -> TrainState:
  """The state with the encoder (conv0, d0-d3) of an ImageNet file (docs/hovernet.md §3.3)."""
  variables, report = convert_hovernet.load_hovernet_encoder(path, eval_variables(state))
  logging.info('hovernet_train: encoder from %s: %s', path, convert_hovernet.describe(report))
  sh = trainer.state_sharding
  return state.replace(params=sharding.put_global(variables['params'], sh.params),
                       batch_stats=sharding.put_global(variables['batch_stats'], sh.batch_stats))
