"""The sample stage's jitted render call (docs/method.md §4, docs/sdm.md §3.8-§3.10): x_0 partly noised
to `sample.percent` of the respaced grid, then guided DDIM to a synthetic image, the batch sharded
over the mesh. Apart from the stage so that benchmarks time it without the stage's data pipeline.
"""

import jax
import jax.numpy as jnp
import ml_collections

from diffmix_jax.core import sharding
from diffmix_jax.sdm import diffusion as gd
from diffmix_jax.sdm import samplers


def render_fn(config: ml_collections.ConfigDict, module, mesh):
  """Jitted (params, x0, y, index) -> uint8-range float images, batch sharded over the mesh."""
  sc = config.sample
  diff = gd.create_diffusion(config.diffusion.schedule.diffusion_steps,
                             config.diffusion.schedule.noise_schedule, sc.timestep_respacing)
  key = jax.random.fold_in(jax.random.key(config.seed), 7)

  def render(params, x0, y, index):
    noise = jax.vmap(lambda g: jax.random.normal(jax.random.fold_in(key, g), x0.shape[1:]))(index)
    model_fn = lambda x, t, c: module.apply({'params': params}, x, t, c)
    out = samplers.diffmix_sample(diff, model_fn, x0, y, noise, sc.percent, sc.guidance,
                                  sc.official_truncation)
    return jnp.clip(jnp.round((out + 1.0) * 127.5), 0, 255)

  batch = sharding.batch_sharding(mesh)
  return jax.jit(render, in_shardings=(sharding.replicated(mesh), batch, batch, batch),
                 out_shardings=batch)
