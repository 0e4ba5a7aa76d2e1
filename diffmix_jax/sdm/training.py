"""SDM training pieces (docs/sdm.md §3.5, §4): the train state, the jitted step (hybrid loss, label
dropping, EMA, dropout, NaN guard), the host-side condition, the EMA gather for previews, and the
trainer that binds them to a mesh. The `diffusion_train` stage runs them through `core.loop`.
"""

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffmix_jax.core import loop
from diffmix_jax.core import optim
from diffmix_jax.core import sharding
from diffmix_jax.data import labels
from diffmix_jax.sdm import diffusion as gd
from diffmix_jax.sdm import unet as sdm_unet


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 [], steps done.
  params: Any
  ema: Any
  opt_state: Any
  rng: jax.Array  # uint32 [2] key data; step keys are fold_in(key, step).
  first_bad_step: jax.Array  # int32 [], first step with a non-finite loss, -1 if none.


def create_state(module, tx, rng: jax.Array) -> TrainState:
  params = module.init(rng, *sdm_unet.dummy_inputs(module))['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=params,
                    opt_state=tx.init(params), rng=jax.random.key_data(jax.random.fold_in(rng, 1)),
                    first_bad_step=jnp.full((), -1, jnp.int32))


def train_step(state: TrainState, batch: dict, *, module, diff: gd.Diffusion, tx,
               phase1_steps: int, drop_rates: tuple[float, float], ema_rate: float,
               schedule) -> tuple[TrainState, dict]:
  """One Adam step on the hybrid loss with label dropping and EMA (docs/sdm.md §3.5, §4.1-§4.4).

  Args:
    state: the train state (donated).
    batch: `image` float32 [B, S, S, 3] in [-1, 1]; `y` float32 [B, S, S, Cy] condition.

  Returns:
    (new state, metrics dict of float32 scalars). A non-finite loss leaves the state unchanged apart
    from `step` and records `first_bad_step`.
  """
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  k_t, k_eps, k_drop = jax.random.split(rng, 3)
  x0, y = batch['image'], batch['y']
  b = x0.shape[0]
  t = jax.random.randint(k_t, (b,), 0, diff.num_timesteps)
  noise = jax.random.normal(k_eps, x0.shape, jnp.float32)
  drop_rate = jnp.where(state.step < phase1_steps, drop_rates[0], drop_rates[1])
  keep = jax.random.uniform(k_drop, (b,)) >= drop_rate
  y = labels.drop_labels(y, keep)  # Whole condition, edge channel included.

  k_dropout = jax.random.fold_in(rng, 3)  # Apart from the split above: dropout 0 changes nothing.

  def loss_fn(params):
    model_fn = lambda x_t, tt, yy: module.apply({'params': params}, x_t, tt, yy, train=True,
                                                rngs={'dropout': k_dropout})
    losses = gd.training_losses(diff, model_fn, x0, t, y, noise)
    return losses['loss'].mean(), losses

  (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = optim.ema_update(state.ema, params, ema_rate)
  new_state = loop.guarded_update(state, loss, params=params, ema=ema, opt_state=opt_state)
  metrics = {'loss': loss, 'mse': losses['mse'].mean(), 'vb': losses['vb'].mean(),
             'grad_norm': optax.global_norm(grads), 'lr': schedule(state.step),
             'conditioned_fraction': jnp.mean(jnp.any(y != 0, axis=(1, 2, 3)).astype(jnp.float32))}
  return new_state, metrics


def make_condition(local: dict, model_config: ml_collections.ConfigDict) -> np.ndarray:
  """Host-side condition y for a local batch (docs/sdm.md §4.6)."""
  return labels.condition(local['type_map'], local['inst_map'], model_config.num_classes,
                          model_config.no_instance)


def local_ema(ema, sharded: bool):
  """This process's whole copy of the EMA for the preview sampler. A sharded EMA
  (`mesh.shard_opt_state`) is gathered: a collective, so every process calls it at the same step."""
  if sharded:
    return multihost_utils.process_allgather(ema, tiled=True)
  return jax.tree.map(lambda a: a.addressable_data(0), ema)


@dataclasses.dataclass
class Trainer:
  """Everything a training loop needs, built once from the config."""
  module: Any
  abstract_state: TrainState
  state_sharding: Any
  init: Callable[[jax.Array], TrainState]  # rng -> sharded initial state.
  step: Callable[[TrainState, dict], tuple[TrainState, dict]]  # Jitted, donates the state.


def create_trainer(config: ml_collections.ConfigDict, mesh) -> Trainer:
  """Builds the model, diffusion, optimizer, shardings and the jitted init and step."""
  tc, mc = config.diffusion.train, config.diffusion.model
  sharding.check_batch(tc.batch_size, mesh, 'diffusion.train.batch_size')
  module = sdm_unet.create_sdm(**mc)
  diff = gd.create_diffusion(config.diffusion.schedule.diffusion_steps,
                             config.diffusion.schedule.noise_schedule)
  schedule = optim.phase_schedule(tc.phase1_steps, tc.phase1_lr, tc.phase2_lr)
  tx = optim.adam(schedule)
  init = functools.partial(create_state, module, tx)
  abstract_state = jax.eval_shape(init, jax.random.key(0))
  state_sh = sharding.state_shardings(abstract_state, mesh, config.mesh.shard_opt_state)
  step = jax.jit(
      functools.partial(train_step, module=module, diff=diff, tx=tx, phase1_steps=tc.phase1_steps,
                        drop_rates=(tc.phase1_drop_rate, tc.phase2_drop_rate),
                        ema_rate=tc.ema_rate, schedule=schedule),
      in_shardings=(state_sh, sharding.batch_sharding(mesh)),
      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
  return Trainer(module=module, abstract_state=abstract_state, state_sharding=state_sh,
                 init=loop.jit_init(init, state_sh), step=step)
