"""SDM/DiffMix samplers (docs/sdm.md §3.8–3.11): batched CFG, DDIM with partial-noise start, ancestral."""

# Each sampler is one `lax.fori_loop`; jit the caller with the params as an argument (not a constant):
#
#   diff = gaussian_diffusion.create_diffusion(timestep_respacing='ddim100')
#   @jax.jit
#   def sample(params, x0, y, noise):
#     model_fn = lambda x_t, t, y: module.apply({'params': params}, x_t, t, y)
#     return samplers.diffmix_sample(diff, model_fn, x0, y, noise, percent=55, guidance=1.5)

import jax
import jax.numpy as jnp

from diffmix_jax.sdm import diffusion as gd


def guided_model_fn(model_fn: gd.ModelFn, guidance: float) -> gd.ModelFn:
  """Classifier-free guidance with the conditional and unconditional passes in ONE forward (§3.9).

  For guidance s > 1 the batch is doubled to [x_t; x_t], [t; t], [y; 0]; the ε channels become
  ε_u + s·(ε_c − ε_u), the variance channels are the conditional pass's. For s ≤ 1 this returns
  `model_fn` itself (a single conditional pass, as the original's `s > 1.0` test, docs/differences.md §1.11).

  Args:
    model_fn: network taking (x_t [B,H,W,3], t [B] original timesteps, y [B,H,W,Cy]).
    guidance: s, a Python float.

  Returns:
    A model_fn with the same signature and output [B,H,W,6].
  """
  if guidance <= 1.0:
    return model_fn

  def fn(x_t, t, y):
    b, c = x_t.shape[0], x_t.shape[-1]
    out = model_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                   jnp.concatenate([y, jnp.zeros_like(y)])).astype(jnp.float32)
    out_c, out_u = out[:b], out[b:]
    eps = out_u[..., :c] + guidance * (out_c[..., :c] - out_u[..., :c])
    return jnp.concatenate([eps, out_c[..., c:]], axis=-1)

  return fn


def start_index(num_timesteps: int, percent: float, official_truncation: bool = False) -> int:
  """First respaced index of the partial-noise DDIM chain (docs/sdm.md §3.10; docs/differences.md §1.14).

  Rule (documented choice): T = round(N · percent / 100) denoising steps, start index T − 1 — the
  official "index T−1 on the respaced grid" semantics (55 % of ddim100 → index 54 → t = 540), without
  its float truncation. With `official_truncation=True`, T = int(N · (percent · 0.01)) exactly as the
  official sampler computes it, so 29 % → T = 28 and 58 % → T = 57 on ddim100 (29 and 58 by default).

  Percent 0 gives T = 0: no noise and no denoising step, and `diffmix_sample` returns x0 unchanged.

  Args:
    num_timesteps: N, the respaced step count (100 for ddim100).
    percent: ddim_percent in [0, 100].
    official_truncation: reproduce the official float truncation.

  Returns:
    The start index T − 1 in −1…N−1 (−1 for T = 0).
  """
  if official_truncation:
    steps = int(num_timesteps * (percent * 0.01))
  else:
    steps = int(round(num_timesteps * percent / 100.0))
  if not 0 <= steps <= num_timesteps:
    raise ValueError(f'percent={percent} gives {steps} steps; need 0…{num_timesteps}')
  return steps - 1


def ddim_step(diff: gd.Diffusion, model_fn: gd.ModelFn, x_t: jax.Array, i: jax.Array,
              y: jax.Array) -> jax.Array:
  """One DDIM (η = 0) step from respaced index i to i − 1 (docs/sdm.md §3.8; docs/differences.md §1.12).

  Args:
    x_t: [B,H,W,3] float32.
    i: scalar int32 respaced index.
    y: [B,H,W,Cy].

  Returns:
    x_{i−1} [B,H,W,3] float32; at i = 0 the clipped x̂0.
  """
  t = jnp.full((x_t.shape[0],), i, jnp.int32)
  x0 = gd.p_mean_variance(diff, model_fn, x_t, t, y, clip_denoised=True)['pred_xstart']
  eps = gd.predict_eps_from_x0(diff, x_t, t, x0)  # re-derived from the clipped x̂0
  ac_prev = jnp.asarray(diff.alphas_cumprod_prev)[i]
  return jnp.sqrt(ac_prev) * x0 + jnp.sqrt(1.0 - ac_prev) * eps


def ddim_sample_loop(diff: gd.Diffusion, model_fn: gd.ModelFn, x_start: jax.Array, y: jax.Array,
                     first_index: int | None = None, guidance: float = 1.0) -> jax.Array:
  """DDIM over indices first_index, …, 0 in one fori_loop (docs/sdm.md §3.8–3.9).

  Args:
    x_start: [B,H,W,3] float32, the sample at `first_index` (pure N(0, I) noise for a full chain).
    y: [B,H,W,Cy] condition.
    first_index: static start index (None = N − 1, the full chain).
    guidance: classifier-free guidance scale s (static; guidance only when s > 1).

  Returns:
    x0 samples [B,H,W,3] float32 in [−1, 1].
  """
  first = diff.num_timesteps - 1 if first_index is None else int(first_index)
  fn = guided_model_fn(model_fn, guidance)
  body = lambda k, x: ddim_step(diff, fn, x, first - k, y)
  return jax.lax.fori_loop(0, first + 1, body, x_start.astype(jnp.float32))


def diffmix_sample(diff: gd.Diffusion, model_fn: gd.ModelFn, x0: jax.Array, y: jax.Array,
                   noise: jax.Array, percent: float = 55, guidance: float = 1.5,
                   official_truncation: bool = False) -> jax.Array:
  """DiffMix partial-noise DDIM: x = q_sample(x0, T−1, noise), then DDIM from T−1 to 0 (docs/sdm.md §3.10).

  Args:
    x0: [B,H,W,3] float32 original image crop in [−1, 1].
    y: [B,H,W,Cy] (mixed) condition.
    noise: [B,H,W,3] float32 ε of the start.
    percent: ddim_percent (55 official); see `start_index` for the rule.
    guidance: s (1.5 official).
    official_truncation: reproduce the official percent truncation.

  Returns:
    [B,H,W,3] float32 synthetic images in [−1, 1].
  """
  first = start_index(diff.num_timesteps, percent, official_truncation)
  if first < 0:  # 0 %: nothing to noise or denoise.
    return x0.astype(jnp.float32)
  t = jnp.full((x0.shape[0],), first, jnp.int32)
  x_start = gd.q_sample(diff, x0.astype(jnp.float32), t, noise)
  return ddim_sample_loop(diff, model_fn, x_start, y, first_index=first, guidance=guidance)


def p_sample_loop(diff: gd.Diffusion, model_fn: gd.ModelFn, noise: jax.Array, y: jax.Array,
                  rng: jax.Array, guidance: float = 1.0, clip_denoised: bool = True) -> jax.Array:
  """Ancestral sampling from pure noise over all respaced indices (docs/sdm.md §3.11).

  x_{t−1} = mean + 1[t≠0]·exp(½ log σ²)·z with the learned-range σ²; z from fold_in(rng, t).

  Args:
    noise: [B,H,W,3] float32 x_{N−1}.
    y: [B,H,W,Cy].
    rng: PRNG key for the per-step noise.
    guidance: s (static).
    clip_denoised: clamp x̂0.

  Returns:
    [B,H,W,3] float32.
  """
  fn = guided_model_fn(model_fn, guidance)
  n = diff.num_timesteps

  def body(k, x):
    i = n - 1 - k
    t = jnp.full((x.shape[0],), i, jnp.int32)
    out = gd.p_mean_variance(diff, fn, x, t, y, clip_denoised=clip_denoised)
    z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
    return out['mean'] + jnp.where(i != 0, 1.0, 0.0) * jnp.exp(0.5 * out['log_variance']) * z

  return jax.lax.fori_loop(0, n, body, noise.astype(jnp.float32))
