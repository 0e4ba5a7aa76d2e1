"""The only module that names mesh axes: distributed start-up, the mesh, shardings, global batches.

One `data` axis over all devices of all hosts (docs/design.md §5). Batches are sharded on their leading
axis; params and EMA are replicated; Adam moments and EMA can be sharded over `data` to save memory.
"""

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

DATA = 'data'


def initialize_distributed(mesh_config: ml_collections.ConfigDict) -> None:
  """`jax.distributed.initialize` from `config.mesh`; call it before any other JAX call.

  CPU processes talk through gloo, whose rendezvous for a collective gives up after 30 s. The
  persistent compilation cache keys differ between CPU processes (they hash each process's own
  devices) and only process 0 writes the cache, so with a warm cache process 0 would skip compiling
  while the others compile and make it wait past that limit. On CPU the cache is therefore switched
  off: every process compiles alike and reaches each collective at the same time.
  """
  m = mesh_config
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU-only runs need it.
  jax.distributed.initialize(
      coordinator_address=m.coordinator_address or None,
      num_processes=m.num_processes if m.num_processes > 0 else None,
      process_id=m.process_id if m.process_id >= 0 else None,
      initialization_timeout=m.initialization_timeout,
      heartbeat_timeout_seconds=m.heartbeat_timeout)
  if jax.default_backend() == 'cpu' and jax.process_count() > 1:
    jax.config.update('jax_enable_compilation_cache', False)


def create_mesh(mesh_config: ml_collections.ConfigDict) -> Mesh:
  """A 1-D mesh over `mesh_config.data` devices (-1 = all), with Auto axis types.

  Raises:
    ValueError: when more devices are asked for than exist (names config.mesh.data).
  """
  devices = jax.devices()
  n = len(devices) if mesh_config.data == -1 else mesh_config.data
  if not 1 <= n <= len(devices) or (jax.process_count() > 1 and n != len(devices)):
    raise ValueError(f'config.mesh.data={mesh_config.data}: {len(devices)} devices exist '
                     f'({jax.process_count()} processes); use -1 for all of them')
  return Mesh(np.asarray(devices[:n]), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def check_batch(global_batch: int, mesh: Mesh, field: str) -> None:
  """Raises ValueError naming `field` when the batch is not divisible by the device count."""
  n = mesh.shape[DATA]
  if global_batch % n:
    raise ValueError(f'config.{field}={global_batch} is not divisible by the {n} devices of the '
                     f'mesh; use a multiple of {n}')


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Assembles each process's slice of the batch into global arrays sharded over `data`.

  Args:
    local: dict of NumPy arrays [b, ...], this process's rows of the global batch.
    mesh: the mesh.

  Returns:
    dict of jax.Array [b * process_count, ...] sharded on the leading axis.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def put_global(tree, shardings):
  """Host arrays, the same on every process, as global jax.Arrays placed by `shardings` (a tree of
  the same structure); each process fills only its addressable shards."""
  return jax.tree.map(lambda x, sh: jax.make_array_from_callback(
      np.shape(x), sh, lambda idx: np.asarray(x)[idx]), tree, shardings)


def _shard_largest_axis(leaf, mesh: Mesh) -> NamedSharding:
  n = mesh.shape[DATA]
  shape = getattr(leaf, 'shape', ())
  for axis in np.argsort(shape)[::-1]:
    if shape[axis] % n == 0 and shape[axis] >= n:
      spec = [None] * len(shape)
      spec[axis] = DATA
      return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def state_shardings(abstract_state, mesh: Mesh, shard_opt_state: bool):
  """Shardings for a train state with fields `params`, `ema`, `opt_state` (and scalars).

  Everything is replicated, except, when `shard_opt_state`, each EMA and optimizer-moment leaf is split
  over `data` along its largest divisible axis (ZeRO-1 style; XLA inserts the gathers).
  """
  rep = replicated(mesh)
  out = jax.tree.map(lambda _: rep, abstract_state)
  if not shard_opt_state:
    return out
  split = lambda tree: jax.tree.map(lambda leaf: _shard_largest_axis(leaf, mesh), tree)
  return out.replace(ema=split(abstract_state.ema), opt_state=split(abstract_state.opt_state))


def coordination_client():
  """The coordination-service client `jax.distributed.initialize` started, or None without one.

  JAX has no public accessor for it (jax.distributed offers initialize, is_initialized and shutdown
  only), so this is the project's one use of a private JAX name; tests/core/sharding_test.py fails
  when the name moves.
  """
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


def barrier(name: str, timeout_s: float = 3600.0) -> None:
  """Waits until every process reaches `name` (a no-op with one process).

  Through the coordination service's barrier, not a gloo collective: gloo's rendezvous gives up
  after 30 s, so a process that has more tiles to predict, or a host-only stage that process 0
  runs alone, would make the waiting processes fail. A process that dies is still noticed through
  the heartbeats (config.mesh.heartbeat_timeout). `name` must be unique within a run.
  """
  if jax.process_count() == 1:
    return
  client = coordination_client()
  if client is None:  # Not started through jax.distributed: fall back to a collective.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(name, int(timeout_s * 1000))

