"""Tests of diffmix_jax.core.checkpoint: bit-exact round trips, fallback past a damaged step, a
changed model refused with the leaf named, msgpack trees checked against the model."""

import logging
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmix_jax.core import checkpoint


def _state(width: int, seed: int = 0) -> dict:
  """A train-state-like tree: a Dense layer of `width` features, int and key leaves, a step."""
  params = nn.Dense(width).init(jax.random.key(seed), jnp.zeros((1, 3)))['params']
  rng = np.random.default_rng(seed)
  return {'params': params, 'ema': jax.tree.map(lambda x: x * 0.5, params),
          'count': jnp.asarray(rng.integers(-2**31, 2**31 - 1, (5,)), jnp.int32),
          'half': jnp.asarray(rng.normal(size=(2, 3)), jnp.bfloat16),
          'rng': jax.random.key_data(jax.random.key(seed + 7)), 'step': jnp.asarray(seed, jnp.int32)}


def _abstract(tree):
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), tree)


@pytest.fixture
def open_manager():
  """`open_manager(folder)`: a manager of `folder` (keep 5), closed when the test ends (an open one
  leaves orbax's threads and event loop to the garbage collector, which may warn mid-suite)."""
  opened = []

  def open_(folder: pathlib.Path) -> checkpoint.ocp.CheckpointManager:
    opened.append(checkpoint.create_manager(str(folder), keep=5))
    return opened[-1]
  yield open_
  for manager in opened:
    manager.close()


def _saved(open_manager, folder: pathlib.Path, steps=(1, 2)) -> checkpoint.ocp.CheckpointManager:
  manager = open_manager(folder)
  for step in steps:
    checkpoint.save(manager, step, _state(8, seed=step), {'epoch': step, 'order': [3, 1, 2]})
  checkpoint.wait(manager)
  return manager


def _files(folder: pathlib.Path) -> dict:
  return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def test_a_saved_tree_restores_bit_exact(tmp_path, open_manager):
  manager = _saved(open_manager, tmp_path / 'ck')
  step, state, data = checkpoint.restore_latest(manager, _abstract(_state(8)))
  assert step == 2 and data == {'epoch': 2, 'order': [3, 1, 2]}
  want = _state(8, seed=2)
  assert jax.tree.structure(state) == jax.tree.structure(want)
  for got, ref in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    np.testing.assert_array_equal(np.asarray(got).reshape(-1).view(np.uint8),
                                  np.asarray(ref).reshape(-1).view(np.uint8))


def test_no_checkpoint_restores_nothing(tmp_path, open_manager):
  manager = open_manager(tmp_path / 'ck')
  assert checkpoint.restore_latest(manager, _abstract(_state(8))) is None


# What a kill leaves behind, by how far the save of step 3 got: orbax's temporary folder (the kill
# before its rename), a step without its array data, a step without its tree metadata.
def _half_tmp(folder):
  shutil.copytree(folder / '2', folder / '3.orbax-checkpoint-tmp-1234')
  (folder / '3.orbax-checkpoint-tmp-1234' / 'state' / 'manifest.ocdbt').unlink()


def _no_arrays(folder):
  shutil.copytree(folder / '2', folder / '3')
  for path in (folder / '3' / 'state').rglob('*'):
    if path.is_file() and ('ocdbt' in path.name or path.parent.name == 'd'):
      path.unlink()


def _no_metadata(folder):
  shutil.copytree(folder / '2', folder / '3')
  (folder / '3' / 'state' / '_METADATA').unlink()


# Reading the step without array data fails inside tensorstore, whose pending callbacks may then reach
# orbax's already closed asyncio loop: Python prints 'Exception ignored ... Event loop is closed'
# (seen in 2 of 7 suite runs, and in 1 of 3 runs of this test alone). That is orbax's noise after a
# failed read, not ours; the fallback checked here is the behaviour.
_ORBAX_CLOSED_LOOP = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


@pytest.mark.parametrize('damage', [_half_tmp, pytest.param(_no_arrays, marks=_ORBAX_CLOSED_LOOP),
                                    _no_metadata])
def test_a_step_a_kill_left_falls_back_to_the_previous_one(tmp_path, damage, caplog,
                                                            open_manager):
  folder = tmp_path / 'ck'
  _saved(open_manager, folder)
  damage(folder)
  manager = open_manager(folder)
  with caplog.at_level(logging.WARNING):
    step, state, data = checkpoint.restore_latest(manager, _abstract(_state(8)))
  assert step == 2 and data['epoch'] == 2
  np.testing.assert_array_equal(state['count'], _state(8, seed=2)['count'])
  if damage is not _half_tmp:  # Orbax never lists a temporary folder: nothing to warn about.
    assert f'checkpoint step 3 in {folder} cannot be read' in caplog.text


def test_a_changed_width_is_an_error_naming_the_leaf_and_nothing_is_overwritten(tmp_path,
                                                                               open_manager):
  folder = tmp_path / 'ck'
  _saved(open_manager, folder)
  before = _files(folder)
  manager = open_manager(folder)
  with pytest.raises(checkpoint.CheckpointMismatch) as err:
    checkpoint.restore_latest(manager, _abstract(_state(16)))
  message = str(err.value)
  assert '\n' not in message
  # Paths in order: ema/... before params/...; the bias is the first leaf of the layer.
  assert message.startswith(
      f'checkpoint step 2 in {folder} does not fit the configured model: ema/bias: checkpoint '
      "((8,), 'float32'), model ((16,), 'float32') (shape, dtype)."), message
  assert _files(folder) == before


def test_other_keys_or_dtype_are_errors_too(tmp_path, open_manager):
  folder = tmp_path / 'ck'
  _saved(open_manager, folder, steps=(1,))
  manager = open_manager(folder)
  renamed = dict(_state(8), mu=jnp.zeros(3))
  with pytest.raises(checkpoint.CheckpointMismatch, match=r'step 1 .* mu: missing from the '
                     r"checkpoint \(the model has \(\(3,\), 'float32'\)\)"):
    checkpoint.restore_latest(manager, _abstract(renamed))
  fewer = {k: v for k, v in _state(8).items() if k != 'half'}
  with pytest.raises(checkpoint.CheckpointMismatch, match=r"half: in the checkpoint \(\(2, 3\), "
                     r"'bfloat16'\), not in the model"):
    checkpoint.restore_latest(manager, _abstract(fewer))
  wider = dict(_state(8), half=jnp.zeros((2, 3), jnp.float32))
  with pytest.raises(checkpoint.CheckpointMismatch, match=r"half: checkpoint \(\(2, 3\), "
                     r"'bfloat16'\), model \(\(2, 3\), 'float32'\)"):
    checkpoint.restore_latest(manager, _abstract(wider))


def test_leaf_specs_name_dataclass_fields_and_dict_keys_alike():
  import flax.struct  # pylint: disable=g-import-not-at-top

  @flax.struct.dataclass
  class State:
    params: dict
    opt_state: tuple

  tree = State(params={'conv': {'kernel': jnp.zeros((3, 3), jnp.float32)}},
               opt_state=(jnp.zeros((), jnp.int32),))
  as_saved = {'opt_state': [np.zeros((), np.int32)], 'params': {'conv': {'kernel': np.zeros((3, 3),
                                                                         np.float32)}}}
  want = {'params/conv/kernel': ((3, 3), 'float32'), 'opt_state/0': ((), 'int32')}
  assert checkpoint.leaf_specs(tree) == want == checkpoint.leaf_specs(as_saved)
  assert checkpoint.first_mismatch(want, want) is None


def test_save_tree_and_load_tree_round_trip_and_refuse_another_model(tmp_path):
  tree = _state(8, seed=3)['params']
  path = tmp_path / 'variables.msgpack'
  checkpoint.save_tree(path, tree)
  loaded = checkpoint.load_tree(path, jax.eval_shape(lambda: tree), 'the test')
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match=r'does not fit the configured model.*kernel'):
    checkpoint.load_tree(path, jax.eval_shape(lambda: _state(16)['params']), 'the test')
  with pytest.raises(FileNotFoundError, match='does not exist: the test'):
    checkpoint.load_tree(tmp_path / 'none.msgpack', tree, 'the test')
  path.write_bytes(b'\x00not msgpack')
  with pytest.raises(ValueError, match='not a parameter file'):
    checkpoint.load_tree(path, tree, 'the test')
