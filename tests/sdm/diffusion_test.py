"""Known-answer tests of diffmix_jax.sdm.diffusion against NumPy float64 references (docs/sdm.md §3)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmix_jax.sdm import diffusion as gd

RTOL = 1e-6


def _ref_tables(kept=None):
  """float64 tables from the formulas of docs/sdm.md §3.1/§3.7, written independently of the module."""
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  ac = np.cumprod(1 - betas)
  if kept is not None:
    ac = ac[np.asarray(kept)]
    betas = 1 - ac / np.concatenate([[1.0], ac[:-1]])
  ac_prev = np.concatenate([[1.0], ac[:-1]])
  post_var = betas * (1 - ac_prev) / (1 - ac)
  return dict(betas=betas, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev,
              sqrt_alphas_cumprod=np.sqrt(ac), sqrt_one_minus_alphas_cumprod=np.sqrt(1 - ac),
              sqrt_recip_alphas_cumprod=1 / np.sqrt(ac),
              sqrt_recipm1_alphas_cumprod=np.sqrt(1 / ac - 1), posterior_variance=post_var,
              posterior_log_variance_clipped=np.log(np.concatenate([[post_var[1]], post_var[1:]])),
              posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1 - ac),
              posterior_mean_coef2=(1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac),
              log_betas=np.log(betas))


@pytest.mark.parametrize('respacing', ['', 'ddim100', '100', 'ddim25', '10,5'])
def test_schedule_tables_match_float64_reference(respacing):
  diff = gd.create_diffusion(1000, 'linear', respacing)
  kept = gd.space_timesteps(1000, respacing)
  ref = _ref_tables(None if not respacing else kept)
  assert diff.num_timesteps == len(kept)
  for name, want in ref.items():
    got = getattr(diff, name)
    assert got.dtype == np.float32, name
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=0, err_msg=name)


def test_schedule_reference_values_from_spec():
  d = gd.create_diffusion()
  ac = d.alphas_cumprod
  assert d.betas[0] == np.float32(1e-4) and d.betas[999] == np.float32(0.02)
  np.testing.assert_allclose(d.betas[1], 1.1992e-4, rtol=1e-4)
  for t, want in [(0, 0.9999), (249, 0.52409), (499, 0.078587), (540, 0.051068), (990, 4.8370e-5),
                  (999, 4.0358e-5)]:
    np.testing.assert_allclose(ac[t], want, rtol=1e-4)
  np.testing.assert_allclose(d.posterior_variance[1], 5.4532e-5, rtol=1e-4)
  np.testing.assert_allclose(d.posterior_log_variance_clipped[:2], -9.81673, rtol=1e-5)
  assert d.posterior_variance[0] == 0


def test_respacing_grids():
  assert gd.space_timesteps(1000, 'ddim100') == list(range(0, 1000, 10))  # ends at 990 (docs/differences.md §1.13)
  assert gd.space_timesteps(1000, 'ddim50') == list(range(0, 1000, 20))
  assert gd.space_timesteps(1000, 'ddim25') == list(range(0, 1000, 40))
  assert gd.space_timesteps(1000, 'ddim30') == list(range(0, 1000, 34))  # non-divisor: stride 34
  plain = gd.space_timesteps(1000, '100')
  assert len(plain) == 100 and plain[-3:] == [979, 989, 999] and plain[:3] == [0, 10, 20]
  # Comma list: two sections of 500, fractional striding (size−1)/(count−1) with rounding.
  assert gd.space_timesteps(1000, '3,2') == [0, 250, 499, 500, 999]
  assert gd.space_timesteps(1000, '') == list(range(1000))
  d = gd.create_diffusion(timestep_respacing='ddim100')
  assert d.timestep_map[-1] == 990 and d.timestep_map[54] == 540
  np.testing.assert_allclose(d.betas[[0, 1, 99]], [1.0e-4, 2.0936e-3, 0.18068], rtol=1e-4)
  with pytest.raises(ValueError, match='exactly'):
    gd.space_timesteps(1000, 'ddim999')
  with pytest.raises(ValueError, match='section'):
    gd.space_timesteps(10, '6,6')


def test_q_sample_formula_and_moments():
  d = gd.create_diffusion()
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
  eps = rng.standard_normal((4, 8, 8, 3)).astype(np.float32)
  t = np.array([0, 249, 540, 999])
  ref = _ref_tables()
  want = (np.sqrt(ref['alphas_cumprod'][t])[:, None, None, None] * x0
          + np.sqrt(1 - ref['alphas_cumprod'][t])[:, None, None, None] * eps)
  np.testing.assert_allclose(gd.q_sample(d, x0, jnp.asarray(t), eps), want, rtol=1e-5, atol=1e-6)
  # Moments over many draws: E = √ᾱ·x0, Var = 1−ᾱ.
  n = 200_000
  noise = jax.random.normal(jax.random.key(1), (n, 1, 1, 1))
  xs = gd.q_sample(d, jnp.full((n, 1, 1, 1), 0.5), jnp.full((n,), 249), noise)
  ac = ref['alphas_cumprod'][249]
  np.testing.assert_allclose(float(xs.mean()), 0.5 * math.sqrt(ac), atol=5e-3)
  np.testing.assert_allclose(float(xs.var()), 1 - ac, rtol=1e-2)


def test_posterior_matches_bayes_rule():
  """Mean/variance of q(x_{t−1}|x_t,x0) from Gaussian conditioning (1/β̃ = α_t/β_t + 1/(1−ᾱ_{t−1}))."""
  d = gd.create_diffusion()
  ref = _ref_tables()
  t = np.array([1, 2, 100, 540, 999])
  a, b, ac_prev = 1 - ref['betas'][t], ref['betas'][t], ref['alphas_cumprod_prev'][t]
  var = 1 / (a / b + 1 / (1 - ac_prev))
  rng = np.random.default_rng(1)
  x0 = rng.uniform(-1, 1, (5, 4, 4, 3))
  x_t = rng.standard_normal((5, 4, 4, 3))
  bc = lambda v: v[:, None, None, None]
  mean = bc(var) * (bc(np.sqrt(a) / b) * x_t + bc(np.sqrt(ac_prev) / (1 - ac_prev)) * x0)
  m, v, lv = gd.q_posterior(d, x0.astype(np.float32), x_t.astype(np.float32), jnp.asarray(t))
  np.testing.assert_allclose(m, mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(v[:, 0, 0, 0], var, rtol=RTOL)
  np.testing.assert_allclose(lv[:, 0, 0, 0], np.log(var), rtol=RTOL)


def test_x0_eps_round_trip_and_learned_range():
  d = gd.create_diffusion(timestep_respacing='ddim100')
  ref = _ref_tables(list(range(0, 1000, 10)))
  rng = np.random.default_rng(2)
  t = np.array([0, 5, 54, 99])
  x_t = rng.standard_normal((4, 4, 4, 3)).astype(np.float32)
  eps = rng.standard_normal((4, 4, 4, 3)).astype(np.float32)
  x0 = gd.predict_x0_from_eps(d, x_t, jnp.asarray(t), eps)
  bc = lambda v: v[:, None, None, None]
  want = bc(1 / np.sqrt(ref['alphas_cumprod'][t])) * x_t - bc(
      np.sqrt(1 / ref['alphas_cumprod'][t] - 1)) * eps
  np.testing.assert_allclose(x0, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gd.predict_eps_from_x0(d, x_t, jnp.asarray(t), x0), eps, atol=2e-3)
  v = rng.uniform(-1.5, 1.5, (4, 4, 4, 3)).astype(np.float32)  # unclamped interpolant
  var, log_var = gd.learned_range_variance(d, v, jnp.asarray(t))
  frac = (v.astype(np.float64) + 1) / 2
  want_lv = frac * bc(np.log(ref['betas'][t])) + (1 - frac) * bc(
      ref['posterior_log_variance_clipped'][t])
  np.testing.assert_allclose(log_var, want_lv, rtol=RTOL)
  np.testing.assert_allclose(var, np.exp(want_lv), rtol=1e-5)


def _ref_nll(x0, mean, log_scale):
  cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
  inv = np.exp(-log_scale)
  plus, minus = cdf(inv * (x0 - mean + 1 / 255)), cdf(inv * (x0 - mean - 1 / 255))
  lp = np.where(x0 < -0.999, np.log(np.maximum(plus, 1e-12)),
                np.where(x0 > 0.999, np.log(np.maximum(1 - minus, 1e-12)),
                         np.log(np.maximum(plus - minus, 1e-12))))
  return lp


def test_kl_and_discretized_nll():
  rng = np.random.default_rng(3)
  m1, m2 = rng.standard_normal((2, 1000))
  l1, l2 = rng.uniform(-8, 0, (2, 1000))
  want = 0.5 * (-1 + l2 - l1 + np.exp(l1 - l2) + (m1 - m2) ** 2 * np.exp(-l2))
  got = gd.normal_kl(*(jnp.asarray(v, jnp.float32) for v in (m1, l1, m2, l2)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  x0 = np.concatenate([[-1.0, 1.0, -0.9995, 0.9995], rng.integers(0, 256, 996) / 127.5 - 1])
  mean = x0 + rng.normal(0, 0.02, x0.shape)
  log_scale = rng.uniform(-5, -2, x0.shape)
  got = gd.discretized_gaussian_log_likelihood(*(jnp.asarray(v, jnp.float32)
                                                 for v in (x0, mean, log_scale)))
  want = _ref_nll(x0, mean, log_scale)
  ok = want > -10  # deep tails lose float32 precision (cdf_plus − cdf_min of two numbers ≈ 1)
  assert ok.mean() > 0.9
  np.testing.assert_allclose(np.asarray(got)[ok], want[ok], rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(got)[~ok] < -9)


def test_training_losses_match_reference():
  """Hybrid loss with a known linear model_fn: mse + (KL for t>0 | decoder NLL for t=0) in bits."""
  d = gd.create_diffusion()
  ref = _ref_tables()
  rng = np.random.default_rng(4)
  b = 4
  x0 = (rng.integers(0, 256, (b, 8, 8, 3)) / 127.5 - 1).astype(np.float32)
  y = rng.uniform(0, 1, (b, 8, 8, 2)).astype(np.float32)
  noise = rng.standard_normal((b, 8, 8, 3)).astype(np.float32)
  t = np.array([0, 1, 300, 999])
  seen = []

  def model_fn(x_t, tt, yy):
    seen.append(tt)
    return jnp.concatenate([0.9 * x_t + 0.1 * yy[..., :1], 0.5 * x_t - 0.2], axis=-1)

  out = jax.jit(lambda *a: gd.training_losses(d, model_fn, *a))(x0, jnp.asarray(t), y, noise)
  bc = lambda v: v[:, None, None, None]
  ac = ref['alphas_cumprod'][t]
  x_t = bc(np.sqrt(ac)) * x0 + bc(np.sqrt(1 - ac)) * noise
  eps_hat = 0.9 * x_t + 0.1 * y[..., :1]
  v = 0.5 * x_t - 0.2
  mse = ((noise - eps_hat) ** 2).mean(axis=(1, 2, 3))
  log_var = (v + 1) / 2 * bc(np.log(ref['betas'][t])) + (1 - v) / 2 * bc(
      ref['posterior_log_variance_clipped'][t])
  x0_hat = bc(np.sqrt(1 / ac)) * x_t - bc(np.sqrt(1 / ac - 1)) * eps_hat
  c1, c2 = bc(ref['posterior_mean_coef1'][t]), bc(ref['posterior_mean_coef2'][t])
  mu_p, mu_q = c1 * x0_hat + c2 * x_t, c1 * x0 + c2 * x_t
  lv_q = bc(ref['posterior_log_variance_clipped'][t])
  kl = 0.5 * (-1 + log_var - lv_q + np.exp(lv_q - log_var) + (mu_q - mu_p) ** 2 * np.exp(-log_var))
  nll = -_ref_nll(x0, mu_p, 0.5 * log_var)
  vb = np.where(t == 0, nll.mean(axis=(1, 2, 3)), kl.mean(axis=(1, 2, 3))) / np.log(2)
  np.testing.assert_allclose(out['mse'], mse, rtol=1e-5)
  np.testing.assert_allclose(out['vb'], vb, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out['loss'], mse + vb, rtol=1e-4, atol=1e-6)


def test_vb_stops_gradient_of_eps_and_respaced_model_sees_original_t():
  d = gd.create_diffusion(timestep_respacing='ddim100')
  x0 = jnp.full((2, 4, 4, 3), 0.3)
  noise = jnp.ones((2, 4, 4, 3))
  seen = {}

  def loss(w, key):
    def model_fn(x_t, t, y):
      seen['t'] = t
      return jnp.concatenate([w[0] * x_t, w[1] * x_t], axis=-1)
    return gd.training_losses(d, model_fn, x0, jnp.array([3, 54]), x0, noise)[key].sum()

  g_vb = jax.grad(loss)(jnp.array([0.5, 0.5]), 'vb')
  g_mse = jax.grad(loss)(jnp.array([0.5, 0.5]), 'mse')
  assert g_vb[0] == 0 and g_vb[1] != 0
  assert g_mse[1] == 0 and g_mse[0] != 0
  np.testing.assert_array_equal(seen['t'], [30, 540])
