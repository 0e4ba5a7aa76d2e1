"""Tests of the HoVer-Net network (docs/hovernet.md §0-§1) and the tiled-inference geometry (§7)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from diffmix_jax.hovernet import torch_import as convert_hovernet
from diffmix_jax.hovernet import infer as hovernet_infer
from diffmix_jax.hovernet import targets as hovernet_targets
from diffmix_jax.core import loop as loop_lib
from diffmix_jax.hovernet import layers as hovernet_layers
from diffmix_jax.hovernet import model as hovernet

# The specs' state-dict tables, in ../shared beside the checkout.
SPEC_DATA = pathlib.Path(__file__).resolve().parents[3] / 'shared' / 'specs' / 'data'


_abstract = hovernet.abstract_variables


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize('mode,nr_types,expected', [
    ('original', 5, 54_744_457), ('fast', 5, 37_639_561), ('original', 4, 54_744_392),
    ('fast', 6, 37_639_626), ('original', None, 45_028_676), ('fast', None, 33_625_412)])
def test_full_size_parameter_counts(mode, nr_types, expected):
  variables = _abstract(hovernet.HoVerNet(mode=mode, nr_types=nr_types))
  assert _count(variables['params']) == expected
  # 130 BN layers (49 encoder + 27 per branch) with mean and var, fewer without the TP branch.
  assert len(jax.tree.leaves(variables['batch_stats'])) == 2 * (49 + 27 * (3 if nr_types else 2))


def test_encoder_and_branch_sizes():
  params = _abstract(hovernet.HoVerNet(mode='original'))['params']
  encoder = sum(_count(params[k]) for k in ('conv0', 'd0', 'd1', 'd2', 'd3', 'conv_bot'))
  assert encoder == 25_597_504
  assert _count(params['decoder']['np']) == 9_715_586
  assert _count(params['decoder']['tp']) == 9_715_781
  frozen = sum(int(np.prod(x.shape)) for p, x in
               jax.tree_util.tree_flatten_with_path(params)[0]
               if hovernet.is_frozen_in_phase1([k.key for k in p]))
  assert frozen == 23_473_920  # docs/hovernet.md §0: frozen parameters in phase 1.


@pytest.mark.parametrize('mode', ['original', 'fast'])
def test_variables_map_one_to_one_onto_the_official_tsv(mode):
  rows = (SPEC_DATA / f'hovernet_state_dict_{mode}.tsv').read_text().splitlines()[1:]
  tsv = {k: tuple(json.loads(s)) for k, s in (r.split('\t') for r in rows)}
  assert len(tsv) == 798
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                           _abstract(hovernet.HoVerNet(mode=mode, nr_types=5)))
  state_dict = convert_hovernet.state_dict_from_variables(variables, mode)
  assert {k: tuple(v.shape) for k, v in state_dict.items()} == tsv


def test_abstract_variables_are_traced_once_and_not_shared():
  """A second equal module reuses the first trace; editing a returned tree leaves the next intact."""
  got = _abstract(hovernet.HoVerNet(mode='fast', nr_types=5, width=16))
  cache_info = hovernet._abstract_variables.cache_info  # pylint: disable=protected-access
  misses = cache_info().misses
  del got['batch_stats']
  again = _abstract(hovernet.HoVerNet(mode='fast', nr_types=5, width=16))
  assert cache_info().misses == misses
  assert set(again) == {'params', 'batch_stats'}


@pytest.mark.parametrize('mode,size,out', [('original', 270, 80), ('fast', 256, 164)])
def test_full_size_output_geometry(mode, size, out):
  module = hovernet.HoVerNet(mode=mode, nr_types=5)
  variables = _abstract(module)
  outs = jax.eval_shape(lambda v: module.apply(v, jnp.zeros((2, size, size, 3))), variables)
  assert {k: v.shape for k, v in outs.items()} == {
      'tp': (2, out, out, 5), 'np': (2, out, out, 2), 'hv': (2, out, out, 2)}
  assert module.patch_shapes == (size, out)
  with pytest.raises(ValueError, match='expects'):
    jax.eval_shape(lambda v: module.apply(v, jnp.zeros((1, size + 2, size + 2, 3))), variables)


@pytest.mark.parametrize('mode,size,out', [('original', 270, 80), ('fast', 256, 164)])
def test_shallow_decoder_keeps_the_official_geometry(mode, size, out):
  """decoder_units=(1, 1): one dense unit per level, the missing units' valid-conv borders cropped
  instead, so outputs and skip sums keep the official sides; the official units then differ only
  in the dense blocks' unit lists."""
  shallow = hovernet.HoVerNet(mode=mode, nr_types=5, decoder_units=(1, 1), width=16)
  variables = _abstract(shallow)
  outs = jax.eval_shape(lambda v: shallow.apply(v, jnp.zeros((1, size, size, 3))), variables)
  assert {k: v.shape for k, v in outs.items()} == {
      'tp': (1, out, out, 5), 'np': (1, out, out, 2), 'hv': (1, out, out, 2)}
  full = _abstract(hovernet.HoVerNet(mode=mode, nr_types=5, width=16))
  for level, units in (('u3', 8), ('u2', 4)):
    dense = lambda v: set(v['params']['decoder']['np'][level]['dense'])
    assert dense(variables) == {'units_0', 'blk_bna'}
    assert dense(full) == {f'units_{j}' for j in range(units)} | {'blk_bna'}
  for bad in ((0, 1), (9, 4), (8, 5), (1,)):
    with pytest.raises(ValueError, match='decoder_units'):
      _abstract(hovernet.HoVerNet(mode=mode, decoder_units=bad, width=16))


@pytest.mark.parametrize('split', [True, False])
def test_grouped_conv_equals_flax_grouped_conv(split):
  """GroupedConv holds nn.Conv(feature_group_count=4)'s kernel (same path, shape and initial values)
  and computes the same outputs and gradients, whether split into per-group convs or not."""
  ref = nn.Conv(8, (3, 3), padding='VALID', feature_group_count=4, use_bias=False,
                kernel_init=hovernet_layers.conv_init)
  mine = hovernet_layers.GroupedConv(8, 3, 4, split)
  x = jax.random.normal(jax.random.key(1), (2, 9, 9, 16))
  v_ref, v_mine = ref.init(jax.random.key(0), x), mine.init(jax.random.key(0), x)
  assert v_mine['params']['kernel'].shape == (3, 3, 4, 8)
  np.testing.assert_array_equal(v_mine['params']['kernel'], v_ref['params']['kernel'])
  np.testing.assert_allclose(mine.apply(v_mine, x), ref.apply(v_ref, x), rtol=1e-5, atol=1e-5)
  loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))
  g_mine = jax.grad(loss(mine), argnums=(0, 1))(v_mine, x)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(v_ref, x)
  for a, b in zip(jax.tree.leaves(g_mine), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='not multiples of 4 groups'):
    mine.init(jax.random.key(0), jnp.zeros((1, 9, 9, 6)))


@pytest.mark.slow
def test_zero_head_init_starts_each_output_at_its_bias():
  """head_init='zeros': same tree as the official init, zero output kernels, official biases; so the
  untrained HV map is the constant bias instead of noise of std ~sqrt(C/2)."""
  kw = dict(mode='fast', nr_types=5, encoder_units=(1, 1, 1, 1), decoder_units=(1, 1), width=16)
  x = jax.random.uniform(jax.random.key(1), (1, 256, 256, 3), maxval=255.0)
  official = hovernet.HoVerNet(**kw)
  zeros = hovernet.HoVerNet(**kw, head_init='zeros')
  v_off, v_zero = (loop_lib.jit_init(m.init)(jax.random.key(0), x) for m in (official, zeros))
  assert jax.tree.structure(v_off) == jax.tree.structure(v_zero)
  for branch in ('tp', 'np', 'hv'):
    head_off = v_off['params']['decoder'][branch]['u0']['conv']
    head_zero = v_zero['params']['decoder'][branch]['u0']['conv']
    assert not np.any(head_zero['kernel']) and np.std(head_off['kernel']) > 0.5
    np.testing.assert_array_equal(head_zero['bias'], head_off['bias'])
  out = jax.jit(zeros.apply)(v_zero, x)
  bias = np.asarray(v_zero['params']['decoder']['hv']['u0']['conv']['bias'])
  np.testing.assert_allclose(out['hv'], np.broadcast_to(bias, out['hv'].shape), atol=1e-6)
  assert float(np.std(jax.jit(official.apply)(v_off, x)['hv'])) > 0.5
  with pytest.raises(ValueError, match="head_init='normal'"):
    hovernet.HoVerNet(**kw, head_init='normal').init(jax.random.key(0), x)


def test_upsample_is_nearest_neighbour():
  x = jnp.arange(4.0).reshape(1, 2, 2, 1)
  up = np.asarray(hovernet_layers.upsample2x(x))[0, ..., 0]
  np.testing.assert_array_equal(up, [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])


@pytest.mark.parametrize('mode,n,last,before,after,patches', [
    ('original', 13, 1040, 95, 310, 169), ('fast', 7, 1148, 46, 404, 49)])
def test_tile_geometry_for_1000(mode, n, last, before, after, patches):
  size, out = hovernet.PATCH_SHAPES[mode]
  g = hovernet_targets.tile_geometry(1000, size, out)
  assert (g['n'], g['last'], g['pad_before'], g['pad_after']) == (n, last, before, after)
  image = np.zeros((1000, 1000, 3), np.uint8)
  tiles = hovernet_infer.tile_patches(image, size, out)
  assert tiles.shape == (patches, size, size, 3)


@pytest.mark.parametrize('mode', ['original', 'fast'])
def test_stitched_output_covers_the_tile_exactly(mode):
  """A fake network that outputs the centre of its input maps the tile onto itself."""
  size, out = hovernet.PATCH_SHAPES[mode]
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
  patches = hovernet_infer.tile_patches(image, size, out)
  border = (size - out) // 2
  centre = patches[:, border:border + out, border:border + out]
  np.testing.assert_array_equal(hovernet_infer.stitch(centre, (1000, 1000)), image)
