"""Tests of the SDM UNet: full-size shapes/counts via eval_shape, layer semantics, tiny-model training."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from diffmix_jax.sdm import torch_import as sdm_torch
from diffmix_jax.sdm import diffusion as gd
from diffmix_jax.sdm import layers
from diffmix_jax.sdm import unet as sdm_unet

# The specs' state-dict table, in ../shared beside the checkout.
TSV = (pathlib.Path(__file__).resolve().parents[3] / 'shared' / 'specs' / 'data' /
       'sdm_consep_state_dict.tsv')
TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
            attention_resolutions=(16,), num_head_channels=32, num_classes=5)


def _random_params(module, seed=0, scale=0.05):
  """Random params (non-zero everywhere) from the abstract tree: no init compile needed."""
  leaves, tree = jax.tree.flatten(sdm_unet.abstract_params(module))
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [rng.normal(0, scale, l.shape).astype(np.float32) for l in leaves])


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('num_classes,want', [(5, 652_256_518), (4, 652_198_918)])
def test_full_size_parameter_counts(num_classes, want):
  params = sdm_unet.abstract_params(sdm_unet.SDMUNet(num_classes=num_classes))
  assert _count(params) == want
  assert len(jax.tree.leaves(params)) == 766
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_abstract_params_traces_once_per_model_and_hands_out_its_own_tree():
  """Equal modules share one trace (the converters ask for the full UNet's tree several times, 2-3
  CPU-s a trace); a caller that edits its tree does not change the next caller's."""
  module = sdm_unet.SDMUNet(**TINY)
  first = sdm_unet.abstract_params(module)
  hits = sdm_unet._abstract_params.cache_info().hits  # pylint: disable=protected-access
  first.pop('out_2')
  second = sdm_unet.abstract_params(sdm_unet.SDMUNet(**TINY))
  assert sdm_unet._abstract_params.cache_info().hits == hits + 1  # pylint: disable=protected-access
  assert 'out_2' in second and set(second) == set(first) | {'out_2'}
  assert jax.tree.map(lambda s: s.shape, second) == jax.tree.map(
      lambda s: s.shape, jax.eval_shape(lambda: module.init(
          jax.random.key(0), *sdm_unet.dummy_inputs(module)))['params'])


def test_parameter_tree_maps_one_to_one_onto_official_keys():
  if not TSV.exists():
    pytest.skip(f'{TSV} not found')
  rows = [line.split('\t') for line in TSV.read_text().splitlines()[1:]]
  official = {k: tuple(json.loads(s)) for k, s in rows}
  assert len(official) == 766
  assert sdm_torch.sdm_expected_shapes(sdm_unet.SDMUNet(num_classes=5)) == official
  glysac = sdm_torch.sdm_expected_shapes(sdm_unet.SDMUNet(num_classes=4))
  diff = {k for k in official if official[k] != glysac[k]}
  assert len(diff) == 50 and all(k.endswith('mlp_shared.0.weight') for k in diff)
  assert all(glysac[k][1] == 5 for k in diff)


def test_create_sdm_from_common_config():
  cfg = common.base_config().diffusion.model
  m = sdm_unet.create_sdm(**cfg)
  assert m.channel_mult == (1, 1, 2, 2, 4, 4) and m.attention_resolutions == (32, 16, 8)
  assert m.dtype == jnp.bfloat16 and m.remat and m.label_channels == 6
  assert _count(sdm_unet.abstract_params(m)) == 652_256_518
  cfg = common.base_config().diffusion.model
  cfg.update(image_size=32, num_channels=32, channel_mult='1,2', attention_resolutions='16',
             dtype='float32')
  assert sdm_unet.create_sdm(**cfg).channel_mult == (1, 2)
  cfg.image_size = 48
  cfg.channel_mult = ''
  with pytest.raises(ValueError, match='channel_mult'):
    sdm_unet.create_sdm(**cfg)


def test_time_embedding_is_cos_then_sin():
  t = np.array([0, 1, 540, 999])
  freqs = np.exp(-math.log(10000) * np.arange(128) / 128)
  arg = t[:, None] * freqs[None]
  want = np.concatenate([np.cos(arg), np.sin(arg)], axis=1)
  np.testing.assert_allclose(layers.timestep_embedding(jnp.asarray(t), 256), want, atol=2e-4)


def test_group_norm_and_spade_label_resize():
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((2, 4, 4, 64)) * 3 + 5).astype(np.float32)
  gn = layers.GroupNorm32(affine=False)
  out = gn.apply({}, x)
  g = x.astype(np.float64).reshape(2, 16, 32, 2)
  want = ((g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + 1e-5))
  np.testing.assert_allclose(out, want.reshape(x.shape), atol=1e-5)
  # SPADE reads only the top-left pixel of every k×k cell of the full-resolution label (docs/differences.md §1.1).
  spade = layers.SPADEGroupNorm(64)
  y = rng.uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
  v = spade.init(jax.random.key(0), x, y)
  y2 = y.copy()
  y2[:, 1::4, :, :] = 7.0
  y2[:, :, 3::4, :] = -7.0
  np.testing.assert_array_equal(spade.apply(v, x, y), spade.apply(v, x, y2))
  y2[:, 0, 0, 0] = 3.0
  assert not np.array_equal(spade.apply(v, x, y), spade.apply(v, x, y2))


def test_attention_block_matches_legacy_reference():
  """Legacy layout: qkv rows [head: q(d), k(d), v(d)], logits (q·d^-¼)ᵀ(k·d^-¼), head-major output."""
  b, h, w, c, heads = 2, 4, 4, 64, 2
  d = c // heads
  block = layers.AttentionBlock(heads, dtype=jnp.float32)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((b, h, w, c)).astype(np.float32)
  v = block.init(jax.random.key(0), x)
  v = jax.tree.map(lambda p: rng.normal(0, 0.2, p.shape).astype(np.float32), v)
  p = v['params']
  xt = x.reshape(b, h * w, c).astype(np.float64)  # [B, T, C]
  g = xt.reshape(b, h * w, 32, 2)
  n = ((g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + 1e-5))
  n = n.reshape(b, h * w, c) * p['norm']['scale'] + p['norm']['bias']
  qkv = (n @ p['qkv']['kernel'] + p['qkv']['bias']).transpose(0, 2, 1)  # torch [B, 3C, T]
  qkv = qkv.reshape(b * heads, 3 * d, h * w)
  q, k, vv = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
  logits = np.einsum('bct,bcs->bts', q * d ** -0.25, k * d ** -0.25)
  wts = np.exp(logits - logits.max(-1, keepdims=True))
  wts /= wts.sum(-1, keepdims=True)
  a = np.einsum('bts,bcs->bct', wts, vv).reshape(b, c, h * w).transpose(0, 2, 1)
  want = xt + a @ p['proj_out']['kernel'] + p['proj_out']['bias']
  np.testing.assert_allclose(block.apply(v, x).reshape(b, h * w, c), want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_tiny_forward_dtypes_and_remat():
  m32 = sdm_unet.SDMUNet(**TINY, dtype=jnp.float32)
  params = _random_params(m32)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 2, (2, 32, 32, 6)).astype(np.float32)
  t = jnp.array([3, 700])

  def loss(p, module):
    return jnp.mean(jnp.square(module.apply({'params': p}, x, t, y)))

  out32 = jax.jit(lambda p: m32.apply({'params': p}, x, t, y))(params)
  assert out32.shape == (2, 32, 32, 6) and out32.dtype == jnp.float32
  m16 = sdm_unet.SDMUNet(**TINY, dtype=jnp.bfloat16)
  out16 = jax.jit(lambda p: m16.apply({'params': p}, x, t, y))(params)
  assert out16.dtype == jnp.float32  # head in fp32
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert rel < 0.05, rel
  g_plain = jax.jit(jax.grad(lambda p: loss(p, m32)))(params)
  g_remat = jax.jit(jax.grad(lambda p: loss(p, sdm_unet.SDMUNet(**TINY, dtype=jnp.float32,
                                                                remat=True))))(params)
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match='channels'):
    m32.apply({'params': params}, x, t, y[..., :5])


@pytest.mark.slow
def test_tiny_unet_zero_init_and_overfits_one_batch():
  """Zero-initialised output layers (TINY, two levels); then the hybrid loss (mse + vb) of a
  one-level 16-px UNet on one fixed batch falls >= 10x within 100 Adam steps."""
  m = sdm_unet.SDMUNet(**TINY, dtype=jnp.float32)
  params = sdm_unet.init_params(m, jax.random.key(0), 1)
  zero = [k for k, v in params.items() if 'out_layers_3' in v or 'out_layers_2' in v or k == 'out_2']
  assert len(zero) == 11  # 3 ResBlocks + 7 SDMResBlocks + head, zero-initialised (docs/sdm.md §2.2)
  for k in zero:
    sub = params[k].get('out_layers_3', params[k].get('out_layers_2', params[k]))
    assert not np.any(np.asarray(sub['kernel'])) and not np.any(np.asarray(sub['bias']))
  assert not np.any(np.asarray(params['input_blocks_3_1']['proj_out']['kernel']))
  # Training: one level (no resampling blocks) at 16 px, a quarter of the compute and half the
  # compile time; resampling is covered by the forward and remat tests above.
  m = sdm_unet.SDMUNet(**dict(TINY, image_size=16, channel_mult=(1,)), dtype=jnp.float32)
  params = sdm_unet.init_params(m, jax.random.key(0), 1)
  diff = gd.create_diffusion()
  rng = np.random.default_rng(3)
  b, s = 2, 16
  x0 = np.clip(rng.normal(0, 0.5, (b, s, s, 3)), -1, 1).astype(np.float32)
  labels = rng.integers(0, 5, (b, s, s))
  y = np.concatenate([np.eye(5)[labels], rng.integers(0, 2, (b, s, s, 1))], -1).astype(np.float32)
  t = jnp.array([30, 500])
  noise = rng.standard_normal((b, s, s, 3)).astype(np.float32)
  opt = optax.adam(2e-3)

  @jax.jit
  def train_step(params, opt_state):
    def loss_fn(p):
      fn = lambda x_t, tt, yy: m.apply({'params': p}, x_t, tt, yy)
      return jnp.mean(gd.training_losses(diff, fn, x0, t, y, noise)['loss'])
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = opt.init(params)
  losses = []
  for _ in range(100):
    params, opt_state, loss = train_step(params, opt_state)
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  assert min(losses[-10:]) * 10 <= losses[0], (losses[0], losses[-10:])
