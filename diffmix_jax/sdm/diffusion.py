"""SDM diffusion math (docs/sdm.md §3): schedule, q_sample, posterior, variance, hybrid loss, respacing."""

# No Flax here: every function that needs the network takes a `model_fn(x_t, t, y) -> [B, H, W, 6]`.

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

NOISE_SCHEDULES = ('linear',)  # `config.diffusion.schedule.noise_schedule` (DiffMix uses linear only).

# model_fn(x_t [B,H,W,3] float32, t [B] int32 on the ORIGINAL grid, y [B,H,W,Cy]) -> [B,H,W,6] float32.
ModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def space_timesteps(num_steps: int, respacing: str) -> list[int]:
  """Kept original timesteps for a respacing string (docs/sdm.md §3.7).

  Args:
    num_steps: length of the original process (1000).
    respacing: '' (all steps), 'ddimN' (smallest integer stride giving exactly N steps), or a comma list
      of counts, one per equal section of the original grid, each taken with fractional striding.

  Returns:
    Sorted list of kept original indices τ_0 < τ_1 < ….
  """
  if not respacing:
    return list(range(num_steps))
  if respacing.startswith('ddim'):
    n = int(respacing[len('ddim'):])
    for stride in range(1, num_steps):
      if len(range(0, num_steps, stride)) == n:
        return list(range(0, num_steps, stride))
    raise ValueError(f'cannot create exactly {n} steps with an integer stride from {num_steps}')
  counts = [int(c) for c in respacing.split(',')]
  size_per, extra = divmod(num_steps, len(counts))
  kept, start = [], 0
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f'cannot take {count} steps from a section of {size} (respacing={respacing!r})')
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      kept.append(start + round(cur))
      cur += stride
    start += size
  return sorted(set(kept))


def linear_betas(num_steps: int = 1000) -> np.ndarray:
  """β_t = linspace(1e-4·s, 0.02·s, T), s = 1000/T, float64 (docs/sdm.md §3.1)."""
  scale = 1000.0 / num_steps
  return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class Diffusion:
  """Schedule tables of one (possibly respaced) process, float32 NumPy, index k = respaced step.

  Attributes: names as in docs/sdm.md §3.1; `timestep_map[k]` = original τ_k handed to the network.
  """
  num_timesteps: int
  timestep_map: np.ndarray
  betas: np.ndarray
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  sqrt_alphas_cumprod: np.ndarray
  sqrt_one_minus_alphas_cumprod: np.ndarray
  sqrt_recip_alphas_cumprod: np.ndarray
  sqrt_recipm1_alphas_cumprod: np.ndarray
  posterior_variance: np.ndarray
  posterior_log_variance_clipped: np.ndarray
  posterior_mean_coef1: np.ndarray
  posterior_mean_coef2: np.ndarray
  log_betas: np.ndarray


def create_diffusion(diffusion_steps: int = 1000, noise_schedule: str = 'linear',
                     timestep_respacing: str = '') -> Diffusion:
  """Tables in float64 NumPy, stored as float32 (docs/sdm.md §3.1, §3.7).

  Args:
    diffusion_steps: original length T (1000).
    noise_schedule: only 'linear'.
    timestep_respacing: see `space_timesteps`.

  Returns:
    A Diffusion over the respaced indices 0…N−1.
  """
  if noise_schedule != 'linear':
    raise ValueError(f'noise_schedule={noise_schedule!r}; only "linear" is implemented')
  base_ac = np.cumprod(1.0 - linear_betas(diffusion_steps))
  kept = space_timesteps(diffusion_steps, timestep_respacing)
  last, betas = 1.0, []
  for i in kept:  # β'_k = 1 − ᾱ_{τ_k}/ᾱ_{τ_{k−1}}
    betas.append(1.0 - base_ac[i] / last)
    last = base_ac[i]
  b = np.asarray(betas, np.float64)
  ac = np.cumprod(1.0 - b)
  ac_prev = np.append(1.0, ac[:-1])
  post_var = b * (1.0 - ac_prev) / (1.0 - ac)
  post_logvar = np.log(np.append(post_var[1], post_var[1:])) if len(b) > 1 else np.log(b)
  f32 = lambda a: np.asarray(a, np.float32)
  return Diffusion(
      num_timesteps=len(b), timestep_map=np.asarray(kept, np.int32), betas=f32(b),
      alphas_cumprod=f32(ac), alphas_cumprod_prev=f32(ac_prev),
      sqrt_alphas_cumprod=f32(np.sqrt(ac)), sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ac)),
      sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / ac)),
      sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / ac - 1.0)),
      posterior_variance=f32(post_var), posterior_log_variance_clipped=f32(post_logvar),
      posterior_mean_coef1=f32(b * np.sqrt(ac_prev) / (1.0 - ac)),
      posterior_mean_coef2=f32((1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac)),
      log_betas=f32(np.log(b)))


def _at(table: np.ndarray, t: jax.Array) -> jax.Array:
  """table[t] as [B, 1, 1, 1] float32 for broadcasting over NHWC."""
  return jnp.asarray(table)[t][:, None, None, None]


def q_sample(diff: Diffusion, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·eps (docs/sdm.md §3.2). x0, eps [B,H,W,C] float32; t [B] respaced index."""
  return _at(diff.sqrt_alphas_cumprod, t) * x0 + _at(diff.sqrt_one_minus_alphas_cumprod, t) * eps


def q_posterior(diff: Diffusion, x0: jax.Array, x_t: jax.Array, t: jax.Array):
  """Mean, variance and clipped log-variance of q(x_{t−1} | x_t, x0) (docs/sdm.md §3.2).

  Returns:
    (mean [B,H,W,C], variance [B,1,1,1], log_variance [B,1,1,1]) float32.
  """
  mean = _at(diff.posterior_mean_coef1, t) * x0 + _at(diff.posterior_mean_coef2, t) * x_t
  return mean, _at(diff.posterior_variance, t), _at(diff.posterior_log_variance_clipped, t)


def predict_x0_from_eps(diff: Diffusion, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """x̂0 = √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·eps (docs/sdm.md §3.2)."""
  return _at(diff.sqrt_recip_alphas_cumprod, t) * x_t - _at(diff.sqrt_recipm1_alphas_cumprod, t) * eps


def predict_eps_from_x0(diff: Diffusion, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
  """eps = (√(1/ᾱ_t)·x_t − x̂0) / √(1/ᾱ_t − 1) (docs/sdm.md §3.2)."""
  return ((_at(diff.sqrt_recip_alphas_cumprod, t) * x_t - x0)
          / _at(diff.sqrt_recipm1_alphas_cumprod, t))


def learned_range_variance(diff: Diffusion, v: jax.Array, t: jax.Array):
  """log σ² = frac·log β_t + (1−frac)·log β̃_t(clipped), frac = (v+1)/2, v unclamped (docs/sdm.md §3.3).

  Returns:
    (variance, log_variance), both shaped like v, float32.
  """
  frac = (v + 1.0) / 2.0
  log_var = frac * _at(diff.log_betas, t) + (1.0 - frac) * _at(diff.posterior_log_variance_clipped, t)
  return jnp.exp(log_var), log_var


def model_timesteps(diff: Diffusion, t: jax.Array) -> jax.Array:
  """Respaced index k → original τ_k handed to the network (docs/sdm.md §3.7; docs/differences.md §1.13)."""
  return jnp.asarray(diff.timestep_map)[t]


def _check_learned_sigma(out: jax.Array, x_t: jax.Array) -> None:
  if out.shape[-1] != 2 * x_t.shape[-1]:
    raise ValueError(f'model output has {out.shape[-1]} channels; the learned-range variance needs '
                     f'{2 * x_t.shape[-1]} (ε̂ ‖ v, diffusion.model.learn_sigma=True)')


def p_mean_variance_from_output(diff: Diffusion, out: jax.Array, x_t: jax.Array, t: jax.Array,
                                clip_denoised: bool) -> dict[str, jax.Array]:
  """p(x_{t−1}|x_t) from a 6-channel model output (docs/sdm.md §3.4).

  Args:
    out: [B,H,W,6] float32 (ε̂ ‖ v).
    x_t: [B,H,W,3] float32.
    t: [B] int32 respaced index.
    clip_denoised: clamp x̂0 to [−1, 1].

  Returns:
    dict with mean, variance, log_variance, pred_xstart [B,H,W,3] and eps [B,H,W,3] (raw ε̂).
  """
  _check_learned_sigma(out, x_t)
  eps, v = jnp.split(out.astype(jnp.float32), 2, axis=-1)
  var, log_var = learned_range_variance(diff, v, t)
  x0 = predict_x0_from_eps(diff, x_t, t, eps)
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
  mean, _, _ = q_posterior(diff, x0, x_t, t)
  return dict(mean=mean, variance=var, log_variance=log_var, pred_xstart=x0, eps=eps)


def p_mean_variance(diff: Diffusion, model_fn: ModelFn, x_t: jax.Array, t: jax.Array, y: jax.Array,
                    clip_denoised: bool = True) -> dict[str, jax.Array]:
  """Runs model_fn at the original timestep τ_t and interprets its output (docs/sdm.md §3.4).

  Guidance is a property of `model_fn` (see samplers.guided_model_fn). Shapes as
  `p_mean_variance_from_output`; y [B,H,W,Cy].
  """
  out = model_fn(x_t, model_timesteps(diff, t), y)
  return p_mean_variance_from_output(diff, out, x_t, t, clip_denoised)


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
  """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, nats (docs/sdm.md §3.5)."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
  """Φ(z) ≈ ½(1 + tanh(√(2/π)(z + 0.044715 z³))) (docs/sdm.md §3.5)."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x0: jax.Array, means: jax.Array,
                                        log_scales: jax.Array) -> jax.Array:
  """log-probability of the 1/255-wide bin around x0 ∈ [−1, 1] under N(means, e^{2·log_scales}).

  Tails for x0 < −0.999 / > 0.999, probabilities floored at 1e-12 (docs/sdm.md §3.5). Elementwise, nats.
  """
  centered = x0 - means
  inv_std = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x0 < -0.999, log_cdf_plus,
                   jnp.where(x0 > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def vb_terms_bpd(diff: Diffusion, out: jax.Array, x0: jax.Array, x_t: jax.Array,
                 t: jax.Array) -> jax.Array:
  """KL(q‖p) for t > 0, decoder NLL for t = 0, bits/dim, per sample (docs/sdm.md §3.5).

  Args:
    out: [B,H,W,6] model output (callers stop the gradient of the ε̂ half).
    x0, x_t: [B,H,W,3] float32.
    t: [B] respaced index.

  Returns:
    [B] float32.
  """
  true_mean, _, true_logvar = q_posterior(diff, x0, x_t, t)
  p = p_mean_variance_from_output(diff, out, x_t, t, clip_denoised=False)
  kl = _mean_flat(normal_kl(true_mean, true_logvar, p['mean'], p['log_variance'])) / math.log(2.0)
  nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, p['mean'], 0.5 * p['log_variance']))
  return jnp.where(t == 0, nll / math.log(2.0), kl)


def training_losses(diff: Diffusion, model_fn: ModelFn, x0: jax.Array, t: jax.Array, y: jax.Array,
                    noise: jax.Array) -> dict[str, jax.Array]:
  """Hybrid loss mse + vb with vb on stop-gradient ε̂ (docs/sdm.md §3.5; docs/differences.md §1.15).

  Args:
    model_fn: the network (receives original timesteps).
    x0: [B,H,W,3] float32 in [−1, 1].
    t: [B] int32 respaced index (= original t without respacing).
    y: [B,H,W,Cy] condition (already label-dropped).
    noise: [B,H,W,3] float32 ε.

  Returns:
    dict of [B] float32: loss, mse, vb.
  """
  x_t = q_sample(diff, x0, t, noise)
  out = model_fn(x_t, model_timesteps(diff, t), y).astype(jnp.float32)
  _check_learned_sigma(out, x_t)
  eps, v = jnp.split(out, 2, axis=-1)
  frozen = jnp.concatenate([jax.lax.stop_gradient(eps), v], axis=-1)
  vb = vb_terms_bpd(diff, frozen, x0, x_t, t)
  mse = _mean_flat(jnp.square(noise - eps))
  return dict(loss=mse + vb, mse=mse, vb=vb)
