"""Tests of diffmix_jax.core.sharding on the suite's 8 simulated CPU devices (tests/conftest.py)."""

import jax
import ml_collections
import numpy as np
import pytest

from diffmix_jax.core import sharding


def _mesh(n: int):
  return sharding.create_mesh(ml_collections.ConfigDict({'data': n}))


def test_the_suite_has_eight_devices():
  assert len(jax.devices()) == 8 and jax.process_count() == 1


@pytest.mark.parametrize('n', [1, 2, 8])
def test_batch_rows_go_to_devices_in_contiguous_blocks(n):
  """Device k of the mesh holds rows [k * 16 / n, (k + 1) * 16 / n) of a 16-row batch, whole."""
  mesh = _mesh(n)
  assert mesh.shape == {sharding.DATA: n} and list(mesh.devices) == jax.devices()[:n]
  local = {'image': np.arange(16 * 3 * 2, dtype=np.float32).reshape(16, 3, 2),
           'label': np.arange(16, dtype=np.int32)}
  batch = sharding.global_batch(local, mesh)
  rows = 16 // n
  for key, value in batch.items():
    assert value.shape == local[key].shape and value.dtype == local[key].dtype
    shards = sorted(value.addressable_shards, key=lambda s: s.device.id)
    assert [s.device for s in shards] == jax.devices()[:n]
    for k, shard in enumerate(shards):
      assert range(*shard.index[0].indices(16)) == range(k * rows, (k + 1) * rows)
      assert all(i == slice(None) for i in shard.index[1:])  # Every other axis whole.
      np.testing.assert_array_equal(shard.data, local[key][k * rows:(k + 1) * rows])
    np.testing.assert_array_equal(np.asarray(value), local[key])


def test_a_batch_the_devices_do_not_divide_names_the_field():
  sharding.check_batch(16, _mesh(8), 'hovernet.train.phase2_batch_size')
  with pytest.raises(ValueError, match=r'config\.hovernet\.train\.phase2_batch_size=12 is not '
                     r'divisible by the 8 devices of the mesh; use a multiple of 8'):
    sharding.check_batch(12, _mesh(8), 'hovernet.train.phase2_batch_size')


def test_mesh_of_all_devices_and_too_many_named():
  assert _mesh(-1).shape[sharding.DATA] == 8
  for bad in (0, 9):
    with pytest.raises(ValueError, match=rf'config\.mesh\.data={bad}: 8 devices exist \(1 '
                       r'processes\); use -1'):
      _mesh(bad)


def test_put_global_places_the_same_values_by_each_sharding():
  mesh = _mesh(8)
  tree = {'w': np.arange(24, dtype=np.float32).reshape(8, 3), 'b': np.float32(2.5)}
  shardings = {'w': sharding.batch_sharding(mesh), 'b': sharding.replicated(mesh)}
  out = sharding.put_global(tree, shardings)
  assert out['w'].sharding == shardings['w'] and out['b'].sharding == shardings['b']
  for k, shard in enumerate(sorted(out['w'].addressable_shards, key=lambda s: s.device.id)):
    np.testing.assert_array_equal(shard.data, tree['w'][k:k + 1])
  assert len(out['b'].addressable_shards) == 8 and float(out['b']) == 2.5


def test_state_shardings_split_ema_and_moments_on_their_largest_divisible_axis():
  import flax.struct  # pylint: disable=g-import-not-at-top

  @flax.struct.dataclass
  class State:
    step: object
    params: dict
    ema: dict
    opt_state: dict

  leaf = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32)
  weights = {'kernel': leaf(3, 3, 4, 16), 'bias': leaf(16), 'odd': leaf(5, 3), 'wide': leaf(8, 24)}
  state = State(step=leaf(), params=weights, ema=weights, opt_state={'mu': weights})
  mesh = _mesh(8)
  plain = sharding.state_shardings(state, mesh, shard_opt_state=False)
  assert all(s == sharding.replicated(mesh) for s in jax.tree.leaves(plain))
  split = sharding.state_shardings(state, mesh, shard_opt_state=True)
  spec = lambda s: tuple(s.spec)
  # The largest axis divisible by 8: 16 (last) of the kernel, 24 of `wide`; `odd` has none.
  want = {'kernel': (None, None, None, 'data'), 'bias': ('data',), 'odd': (), 'wide': (None, 'data')}
  assert {k: spec(v) for k, v in split.ema.items()} == want
  assert {k: spec(v) for k, v in split.opt_state['mu'].items()} == want
  assert all(spec(s) == () for s in jax.tree.leaves((split.params, split.step)))


def test_barrier_with_one_process_returns_and_the_private_client_name_exists():
  sharding.barrier('one process: nothing to wait for')
  # The one private JAX name the project uses: moved or renamed, this fails (ImportError or
  # AttributeError) before a multi-process run would.
  assert sharding.coordination_client() is None  # jax.distributed was not started here.
