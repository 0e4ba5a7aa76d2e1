"""Tests of the torch-free HoVer-Net state-dict <-> Flax mapping (hovernet.md §1.6)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmix_jax import convert_hovernet
from diffmix_jax.models import hovernet

# The specs' state-dict tables, in ../shared beside the checkout.
SPEC_DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'specs' / 'data'
TINY = dict(width=16)  # Narrow but with all 798 official keys.


def _tsv(mode):
  rows = (SPEC_DATA / f'hovernet_state_dict_{mode}.tsv').read_text().splitlines()[1:]
  return {k: tuple(json.loads(s)) for k, s in (r.split('\t') for r in rows)}


def _random_state_dict(shapes: dict, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in shapes.items():
    if key.endswith('num_batches_tracked'):
      out[key] = np.asarray(rng.integers(0, 1000), np.int64)
    elif key.endswith('unpool_mat'):
      out[key] = np.ones(shape, np.float32)
    elif key.endswith('running_var'):
      out[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    else:
      out[key] = rng.standard_normal(shape).astype(np.float32)
  return out


def _tiny_shapes(mode):
  module = hovernet.HoVerNet(mode=mode, nr_types=5, **TINY)
  size = module.patch_shapes[0]
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
  sd = convert_hovernet.state_dict_from_variables(zeros)
  return module, {k: v.shape for k, v in sd.items()}


@pytest.mark.parametrize('mode', ['original', 'fast'])
def test_tiny_round_trip_is_bit_exact(mode):
  module, shapes = _tiny_shapes(mode)
  assert set(shapes) == set(_tsv(mode))  # The tiny variant has the same 798 keys.
  sd = _random_state_dict(shapes)
  got_module, variables = convert_hovernet.variables_from_state_dict(sd, module=module)
  assert got_module is module
  back = convert_hovernet.state_dict_from_variables(variables, mode)
  for key, value in sd.items():
    if key.endswith('num_batches_tracked'):
      continue  # Not tracked in Flax; written as 0.
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  # The converted variables fit the module's own tree exactly.
  size = module.patch_shapes[0]
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  assert jax.tree.structure(abstract) == jax.tree.structure(variables)
  assert all(a.shape == b.shape and b.dtype == np.float32 for a, b in
             zip(jax.tree.leaves(abstract), jax.tree.leaves(variables)))


def test_conv_layout_and_bn_collections():
  module, shapes = _tiny_shapes('fast')
  sd = _random_state_dict(shapes, seed=1)
  _, v = convert_hovernet.variables_from_state_dict(sd, module=module)
  np.testing.assert_array_equal(v['params']['conv0']['conv']['kernel'],
                                sd['conv0./.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      v['params']['decoder']['hv']['u3']['dense']['units_2']['conv2']['kernel'],
      sd['decoder.hv.u3.dense.units.2.conv2.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v['batch_stats']['d1']['units_0']['conv1_bn']['var'],
                                sd['d1.units.0.conv1/bn.running_var'])
  np.testing.assert_array_equal(v['params']['d0']['blk_bna']['bn']['scale'],
                                sd['d0.blk_bna.bn.weight'])


@pytest.mark.parametrize('mode', ['original', 'fast'])
def test_full_size_keys_and_shapes_against_the_tsv(mode):
  """Full-size check without values: every TSV key maps to a Flax leaf of the transposed shape."""
  tsv = _tsv(mode)
  module = hovernet.HoVerNet(mode=mode, nr_types=5)
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(
      (1, module.patch_shapes[0], module.patch_shapes[0], 3))))
  n_mapped = 0
  for key, shape in tsv.items():
    if key.endswith('num_batches_tracked') or key == 'upsample2x.unpool_mat':
      continue
    collection, path, leaf = convert_hovernet.flax_location(key)
    node = variables[collection]
    for name in path:
      node = node[name]
    flax_leaf = convert_hovernet._flax_leaf(path, leaf)  # pylint: disable=protected-access
    want = shape if len(shape) == 1 else (shape[2], shape[3], shape[1], shape[0])
    assert node[flax_leaf].shape == want, key
    n_mapped += 1
  assert n_mapped == 798 - 130 - 1 == len(jax.tree.leaves(variables))
  assert convert_hovernet.infer_config({k: np.zeros(s) for k, s in tsv.items()
                                        if 'conva' in k or 'u0.conv' in k}) == (mode, 5)


def test_errors_list_missing_unexpected_and_mismatched_keys():
  module, shapes = _tiny_shapes('fast')
  sd = _random_state_dict(shapes)
  del sd['d2.units.0.conv3.weight']
  sd['decoder.np.u9.conv.weight'] = np.zeros((1,), np.float32)
  sd['conv_bot.weight'] = np.zeros((3, 3, 1, 1), np.float32)
  with pytest.raises(ValueError) as e:
    convert_hovernet.variables_from_state_dict(sd, module=module)
  msg = str(e.value)
  assert '1 missing keys: d2.units.0.conv3.weight' in msg
  assert '1 unexpected keys: decoder.np.u9.conv.weight' in msg
  assert 'conv_bot.weight: got [3, 3, 1, 1]' in msg


def test_module_prefix_mode_and_type_detection():
  module, shapes = _tiny_shapes('original')
  sd = {f'module.{k}': v for k, v in _random_state_dict(shapes).items()}
  sd = {k: v for k, v in sd.items() if 'num_batches_tracked' not in k}  # TF-converted files.
  _, v = convert_hovernet.variables_from_state_dict(sd, module=module)
  assert 'conv0' in v['params']
  assert convert_hovernet.infer_config(convert_hovernet.strip_module_prefix(sd)) == ('original', 5)
  with pytest.raises(ValueError, match="mode='fast' but the state dict holds a 'original'"):
    convert_hovernet.variables_from_state_dict(convert_hovernet.strip_module_prefix(sd), 'fast')
  with pytest.raises(ValueError, match='nr_types=6'):
    convert_hovernet.variables_from_state_dict(convert_hovernet.strip_module_prefix(sd),
                                               'original', 6)
