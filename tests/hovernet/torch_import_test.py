"""Tests of the torch-free HoVer-Net state-dict <-> Flax mapping (docs/hovernet.md §1.6)."""

import json
import pathlib
import re

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmix_jax.hovernet import torch_import as convert_hovernet
from diffmix_jax.hovernet import model as hovernet

# The specs' state-dict tables, in ../shared beside the checkout.
SPEC_DATA = pathlib.Path(__file__).resolve().parents[3] / 'shared' / 'specs' / 'data'
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
  variables = hovernet.abstract_variables(module)
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
  # The converted variables fit the module's own tree exactly (traced here, not by the converter's
  # `abstract_variables`).
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
  variables = hovernet.abstract_variables(module)
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


def _encoder_keys(shapes: dict) -> dict:
  return {k: v for k, v in shapes.items() if k.split('.')[0] in convert_hovernet.ENCODER_MODULES}


def _full_size_variables(mode='original', fill=7.0):
  """Full-size HoVer-Net variables, every leaf `fill` (so an untouched leaf is recognisable)."""
  module = hovernet.HoVerNet(mode=mode, nr_types=5)
  abstract = hovernet.abstract_variables(module)
  return jax.tree.map(lambda s: np.full(s.shape, fill, np.float32), abstract)


def _check_encoder_loaded(got, sd, variables):
  """Every encoder leaf equals the file's tensor (Flax layout); every other leaf is unchanged."""
  flat_got = traverse_util.flatten_dict(got)
  for fpath, old in traverse_util.flatten_dict(variables).items():
    key = convert_hovernet.torch_key(fpath[0], fpath[1:])
    if fpath[1] in convert_hovernet.ENCODER_MODULES:
      want = sd[key].transpose(2, 3, 1, 0) if fpath[-1] == 'kernel' else sd[key]
      np.testing.assert_array_equal(flat_got[fpath], want, err_msg=key)
    else:
      np.testing.assert_array_equal(flat_got[fpath], old, err_msg=key)


def test_imagenet_encoder_files_load_by_name(tmp_path):
  """`.npz` and the official `.tar` ({'desc': ...}) with the spec's encoder
  keys (random values) fill conv0 and d0-d3, params and BN statistics; the decoders keep theirs."""
  from diffmix_jax import convert_torch  # pylint: disable=g-import-not-at-top
  shapes = _encoder_keys(_tsv('original'))
  assert len(shapes) == 298  # conv0 and d0-d3 of the official table, BN counters included.
  sd = _random_state_dict(shapes, seed=1)
  sd['linear.weight'] = np.ones((1000, 2048), np.float32)  # ImageNet classifier: not HoVer-Net's.
  variables = _full_size_variables()
  np.savez(tmp_path / 'encoder.npz', **sd)
  got, report = convert_torch.load_hovernet_encoder(str(tmp_path / 'encoder.npz'), variables)
  _check_encoder_loaded(got, sd, variables)
  loaded = sorted(k for k in shapes if not k.endswith('num_batches_tracked'))
  assert report == {'loaded': loaded, 'missing': [], 'unexpected': ['linear.weight']}
  assert len(loaded) == 249
  torch = pytest.importorskip('torch')
  torch.save({'desc': {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, 'epoch': 90},
             tmp_path / 'encoder.tar')
  got_tar, report_tar = convert_torch.load_hovernet_encoder(str(tmp_path / 'encoder.tar'),
                                                            variables)
  assert report_tar == report
  for a, b in zip(jax.tree.leaves(got_tar), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)


def test_encoder_load_reports_missing_and_rejects_bad_files(tmp_path):
  from diffmix_jax import convert_torch  # pylint: disable=g-import-not-at-top
  module, shapes = _tiny_shapes('fast')  # Any width: the loader reads shapes from the variables.
  sd = _random_state_dict(_encoder_keys(shapes), seed=2)
  variables = jax.tree.map(lambda s: np.full(s.shape, 3.0, np.float32),
                           hovernet.abstract_variables(module))
  dropped = 'd3.units.0.conv2.weight'
  del sd[dropped]
  got, report = convert_hovernet.encoder_from_state_dict(
      {f'module.{k}': v for k, v in sd.items()}, variables)  # DataParallel prefix stripped.
  assert report['missing'] == [dropped] and report['unexpected'] == []
  sd[dropped] = np.full(shapes[dropped], 3.0, np.float32)  # Missing: the leaf keeps its init.
  _check_encoder_loaded(got, sd, variables)
  wrong = dict(sd, **{'d1.units.0.conv1.weight': np.zeros((7, 3, 1, 1), np.float32)})
  np.savez(tmp_path / 'wrong.npz', **wrong)
  want = list(shapes['d1.units.0.conv1.weight'])
  with pytest.raises(ValueError, match=re.escape(
      f'd1.units.0.conv1.weight has shape [7, 3, 1, 1]; this HoVer-Net expects {want}')):
    convert_torch.load_hovernet_encoder(str(tmp_path / 'wrong.npz'), variables)
  np.savez(tmp_path / 'decoder_only.npz', **{'conv_bot.weight': np.zeros((64, 128, 1, 1))})
  with pytest.raises(ValueError, match='no encoder key'):
    convert_torch.load_hovernet_encoder(str(tmp_path / 'decoder_only.npz'), variables)
  with pytest.raises(FileNotFoundError, match='absent.npz'):
    convert_torch.load_hovernet_encoder(str(tmp_path / 'absent.npz'), variables)
