"""Tests of diffmix_jax.sdm.samplers: percent rule, DDIM / ancestral loops vs NumPy, batched guidance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmix_jax.sdm import diffusion as gd
from diffmix_jax.sdm import samplers
from diffmix_jax.sdm import unet as sdm_unet

B, S = 2, 8


def _linear_model_np(x_t, t, y):
  """A known per-sample model: ε̂ = 0.8·x_t + 0.3·y₀ − 1e-4·t, v = 0.1·x_t."""
  eps = 0.8 * x_t + 0.3 * y[..., :1] - 1e-4 * t[:, None, None, None]
  return np.concatenate([eps, 0.1 * x_t], axis=-1)


def _linear_model(x_t, t, y):
  eps = 0.8 * x_t + 0.3 * y[..., :1] - 1e-4 * t[:, None, None, None].astype(jnp.float32)
  return jnp.concatenate([eps, 0.1 * x_t], axis=-1)


def _ref_tables(kept):
  ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))[np.asarray(kept)]
  betas = 1 - ac / np.concatenate([[1.0], ac[:-1]])
  ac_prev = np.concatenate([[1.0], ac[:-1]])
  post_var = betas * (1 - ac_prev) / (1 - ac)
  return dict(ac=ac, ac_prev=ac_prev, betas=betas,
              lv_clip=np.log(np.concatenate([[post_var[1]], post_var[1:]])),
              c1=betas * np.sqrt(ac_prev) / (1 - ac), c2=(1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac))


def _ref_guided(x, t, y, s):
  out_c = _linear_model_np(x, t, y)
  if s <= 1:
    return out_c
  out_u = _linear_model_np(x, t, np.zeros_like(y))
  return np.concatenate([out_u[..., :3] + s * (out_c[..., :3] - out_u[..., :3]), out_c[..., 3:]], -1)


def _ref_ddim(kept, x, y, first, s):
  """NumPy float64 DDIM η=0 loop of docs/sdm.md §3.8 with ε re-derived from the clipped x̂0."""
  r = _ref_tables(kept)
  for i in range(first, -1, -1):
    t = np.full((x.shape[0],), kept[i], np.float64)
    eps = _ref_guided(x, t, y, s)[..., :3]
    x0 = np.clip(x / np.sqrt(r['ac'][i]) - np.sqrt(1 / r['ac'][i] - 1) * eps, -1, 1)
    eps = (x / np.sqrt(r['ac'][i]) - x0) / np.sqrt(1 / r['ac'][i] - 1)
    x = np.sqrt(r['ac_prev'][i]) * x0 + np.sqrt(1 - r['ac_prev'][i]) * eps
  return x


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x0 = rng.uniform(-1, 1, (B, S, S, 3)).astype(np.float32)
  y = rng.uniform(0, 1, (B, S, S, 3)).astype(np.float32)
  noise = rng.standard_normal((B, S, S, 3)).astype(np.float32)
  return x0, y, noise


def test_start_index_rule():
  d = gd.create_diffusion(timestep_respacing='ddim100')
  i = samplers.start_index(100, 55)
  assert i == 54 and d.timestep_map[i] == 540  # official start t = 540
  assert samplers.start_index(100, 55, official_truncation=True) == 54
  assert samplers.start_index(100, 100) == 99 and d.timestep_map[99] == 990
  # Truncation cases (docs/sdm.md §3.10): official int(N·p·0.01) gives T = 28 / 57, the default rounds.
  assert samplers.start_index(100, 29) == 28 and samplers.start_index(100, 58) == 57
  assert samplers.start_index(100, 29, official_truncation=True) == 27
  assert samplers.start_index(100, 58, official_truncation=True) == 56
  assert samplers.start_index(1000, 29, official_truncation=True) == 289  # no effect at 1000 steps
  assert samplers.start_index(100, 0) == -1 and samplers.start_index(100, 0.2) == -1  # No steps.
  with pytest.raises(ValueError, match='percent'):
    samplers.start_index(100, 101)


def test_partial_noise_at_zero_percent_returns_x0_unchanged():
  d = gd.create_diffusion(timestep_respacing='ddim100')
  x0, y, noise = _inputs(1)
  got = samplers.diffmix_sample(d, _linear_model, x0, y, noise, percent=0, guidance=1.5)
  np.testing.assert_array_equal(got, x0)


@pytest.mark.parametrize('s', [1.0, 1.5])
def test_full_ddim_matches_numpy_reference(s):
  respacing = 'ddim25'
  d = gd.create_diffusion(timestep_respacing=respacing)
  kept = gd.space_timesteps(1000, respacing)
  _, y, noise = _inputs()
  got = jax.jit(lambda n, y: samplers.ddim_sample_loop(d, _linear_model, n, y, guidance=s))(noise, y)
  want = _ref_ddim(kept, noise.astype(np.float64), y.astype(np.float64), len(kept) - 1, s)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
  assert np.abs(np.asarray(got)).max() <= 1.0


@pytest.mark.parametrize('percent,official', [(55, False), (29, True), (29, False),
                                              (100, False)])
def test_diffmix_partial_noise_matches_reference(percent, official):
  d = gd.create_diffusion(timestep_respacing='ddim100')
  kept = gd.space_timesteps(1000, 'ddim100')
  x0, y, noise = _inputs(1)
  got = jax.jit(lambda x0, y, n: samplers.diffmix_sample(
      d, _linear_model, x0, y, n, percent=percent, guidance=1.5, official_truncation=official))(
          x0, y, noise)
  first = samplers.start_index(100, percent, official)
  assert percent != 100 or first == 99  # 100 % starts at index N - 1 (t = 990).
  ac = _ref_tables(kept)['ac'][first]
  x_start = np.sqrt(ac) * x0.astype(np.float64) + np.sqrt(1 - ac) * noise
  want = _ref_ddim(kept, x_start, y.astype(np.float64), first, 1.5)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_sampler_is_one_loop_and_model_traced_once():
  d = gd.create_diffusion(timestep_respacing='ddim100')
  x0, y, noise = _inputs()
  calls = []

  def model_fn(x_t, t, y):
    calls.append(x_t.shape)
    return _linear_model(x_t, t, y)

  jaxpr = jax.make_jaxpr(lambda *a: samplers.diffmix_sample(d, model_fn, *a))(x0, y, noise)
  text = str(jaxpr)
  assert text.count('scan[') + text.count('while[') == 1  # fori_loop with static bounds → scan
  assert calls == [(2 * B, S, S, 3)]  # cond + uncond in ONE batched call, traced once


def test_guidance_one_is_conditional_pass():
  assert samplers.guided_model_fn(_linear_model, 1.0) is _linear_model
  _, y, noise = _inputs(2)
  t = jnp.array([10, 500])
  out = samplers.guided_model_fn(_linear_model, 1.5)(noise, t, y)
  c, u = _linear_model(noise, t, y), _linear_model(noise, t, jnp.zeros_like(y))
  np.testing.assert_allclose(out[..., :3], u[..., :3] + 1.5 * (c[..., :3] - u[..., :3]), rtol=1e-6)
  np.testing.assert_array_equal(out[..., 3:], c[..., 3:])


def test_batched_cond_uncond_equals_two_forwards_tiny_unet():
  """The concatenated [cond; uncond] UNet forward equals two separate forwards (per-sample norms)."""
  m = sdm_unet.SDMUNet(image_size=16, num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                       attention_resolutions=(8,), num_head_channels=32, num_classes=2,
                       dtype=jnp.float32)
  # Random (non-zero everywhere) params from the abstract tree: no init compile needed.
  leaves, tree = jax.tree.flatten(sdm_unet.abstract_params(m))
  rng = np.random.default_rng(0)
  params = jax.tree.unflatten(tree, [rng.normal(0, 0.05, l.shape).astype(np.float32) for l in leaves])
  rng = np.random.default_rng(3)
  x = rng.standard_normal((B, 16, 16, 3)).astype(np.float32)
  y = rng.integers(0, 2, (B, 16, 16, 3)).astype(np.float32)
  t = jnp.array([5, 900])
  apply = jax.jit(lambda x, t, y: m.apply({'params': params}, x, t, y))
  guided = jax.jit(samplers.guided_model_fn(apply, 2.0))(x, t, y)
  c, u = apply(x, t, y), apply(x, t, np.zeros_like(y))
  np.testing.assert_allclose(guided[..., :3], u[..., :3] + 2.0 * (c[..., :3] - u[..., :3]),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(guided[..., 3:], c[..., 3:], rtol=1e-5, atol=1e-6)


def test_ancestral_matches_reference():
  respacing = '10'
  d = gd.create_diffusion(timestep_respacing=respacing)
  kept = gd.space_timesteps(1000, respacing)
  r = _ref_tables(kept)
  _, y, noise = _inputs(4)
  rng = jax.random.key(7)
  got = jax.jit(lambda n, y: samplers.p_sample_loop(d, _linear_model, n, y, rng))(noise, y)
  x = noise.astype(np.float64)
  for i in range(len(kept) - 1, -1, -1):
    out = _linear_model_np(x, np.full((B,), kept[i], np.float64), y)
    eps, v = out[..., :3], out[..., 3:]
    x0 = np.clip(x / np.sqrt(r['ac'][i]) - np.sqrt(1 / r['ac'][i] - 1) * eps, -1, 1)
    mean = r['c1'][i] * x0 + r['c2'][i] * x
    log_var = (v + 1) / 2 * np.log(r['betas'][i]) + (1 - v) / 2 * r['lv_clip'][i]
    z = np.asarray(jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32))
    x = mean + (i != 0) * np.exp(0.5 * log_var) * z
  np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)
