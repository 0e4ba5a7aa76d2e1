"""The only module importing orbax: checkpoint manager, save, restore with fallback to older steps.

A checkpoint holds the train state (params, EMA, optimizer, step, RNG key) and, as JSON, the grain
iterator state, so a resumed run continues bit for bit. Saves are asynchronous; a half-written step is
ignored by orbax, and a finished step that fails to restore (corrupt files) falls back to the previous.
"""

import logging
import os

import jax
import orbax.checkpoint as ocp


def quiet_orbax_logs() -> None:
  """Orbax logs every save at INFO through absl; keep only its warnings and errors."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= logging.WARNING or '/orbax/' not in r.pathname)


def create_manager(directory: str, keep: int) -> ocp.CheckpointManager:
  """An async manager keeping the newest `keep` steps under `directory`."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict) -> None:
  """Starts an async save of `state` (a pytree of jax.Arrays) and `data_state` (JSON) at `step`."""
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=ocp.args.JsonSave(data_state)), force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
  """Restores the newest readable step, falling back to older ones when a step is corrupt.

  Args:
    manager: the manager.
    abstract_state: pytree of jax.ShapeDtypeStruct with shardings (the restore target).

  Returns:
    (step, state, data_state), or None when no step could be restored.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many types on bad files)
      logging.warning('checkpoint step %d in %s cannot be restored (%s: %s); trying the previous',
                      step, manager.directory, type(e).__name__, e)
      continue
    return step, restored['state'], restored['data']
  return None


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until pending async saves are on disk."""
  manager.wait_until_finished()


def abstract(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or structs) carrying `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def save_tree(path: os.PathLike, tree) -> None:
  """Writes a pytree of arrays (params, EMA, HoVer-Net variables) as flax msgpack, atomically."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  from diffmix_jax import workdir as wdir  # pylint: disable=g-import-not-at-top
  wdir.atomic_write(path, serialization.msgpack_serialize(jax.device_get(tree)))


def load_tree(path: os.PathLike, abstract, what: str):
  """Reads a `save_tree` file that must fit `abstract` (a jax.eval_shape tree of the model).

  Args:
    path: the msgpack file.
    abstract: the expected tree of ShapeDtypeStructs.
    what: the config field or stage the file comes from, for the errors.

  Returns:
    The tree of np.ndarray.

  Raises:
    FileNotFoundError: no file (naming `what`); ValueError: it does not fit the model (the first
      differing paths and shapes).
  """
  from flax import serialization  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: {what}')
  with open(path, 'rb') as f:
    try:
      tree = serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several types for a damaged file.
      raise ValueError(f'{path}: not a parameter file ({e})') from e
  shapes = lambda t: {jax.tree_util.keystr(k): tuple(getattr(v, 'shape', ())) for k, v in
                      jax.tree_util.tree_flatten_with_path(t)[0]}
  got, want = shapes(tree), shapes(abstract)
  if got != want:
    bad = sorted(set(got.items()) ^ set(want.items()))[:6]
    raise ValueError(f'{path}: does not fit the configured model; first differences (path, shape): '
                     f'{bad}')
  return tree
