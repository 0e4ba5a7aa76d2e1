"""The only module importing orbax: checkpoint manager, save, restore with fallback to older steps.

A checkpoint holds the train state (params, EMA, optimizer, step, RNG key) and, as JSON, the grain
iterator state, so a resumed run continues bit for bit. Saves are asynchronous; a half-written step is
ignored by orbax, and a step that is missing files or cannot be read (what a kill or a full disk
leaves) falls back to the previous one, with a warning. A readable step whose tree does not fit the
model (another width, depth or optimizer: a changed config) is never skipped: it raises
`CheckpointMismatch`, naming the step, the folder and the first leaf that differs, so a run with a
changed config cannot silently restart over a workdir's checkpoints.
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
  # Handlers named up front: a fresh manager (a resumed run) can then read a step's metadata
  # before anything was saved or restored through it.
  handlers = {'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict) -> None:
  """Starts an async save of `state` (a pytree of jax.Arrays) and `data_state` (JSON) at `step`."""
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=ocp.args.JsonSave(data_state)), force=True)


class CheckpointMismatch(ValueError):
  """A readable checkpoint whose tree differs from the model's: the config changed since it was
  written."""


def _key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey.
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_specs(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """`{'params/conv/kernel': (shape, dtype name)}` of every array leaf, whatever the containers
  (a dataclass's fields and a saved dict's keys give the same path)."""
  return {'/'.join(_key_name(k) for k in path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def first_mismatch(saved: dict, wanted: dict) -> str | None:
  """The first leaf (in path order) that `saved` and `wanted` (`leaf_specs`) disagree on, in words,
  or None when they agree."""
  for path in sorted(set(saved) | set(wanted)):
    if path not in saved:
      return f'{path}: missing from the checkpoint (the model has {wanted[path]})'
    if path not in wanted:
      return f'{path}: in the checkpoint {saved[path]}, not in the model'
    if saved[path] != wanted[path]:
      return f'{path}: checkpoint {saved[path]}, model {wanted[path]} (shape, dtype)'
  return None


def _saved_specs(manager: ocp.CheckpointManager, step: int) -> dict:
  """`leaf_specs` of step `step`'s state as its metadata records it; raises what orbax raises
  for a step whose files are missing or unreadable."""
  metadata = manager.item_metadata(step)['state']
  if metadata is None:
    raise FileNotFoundError('no state metadata')
  return leaf_specs(getattr(metadata, 'tree', metadata))


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
  """Restores the newest readable step; an unreadable one falls back to the one before.

  Args:
    manager: the manager.
    abstract_state: pytree of jax.ShapeDtypeStruct with shardings (the restore target).

  Returns:
    (step, state, data_state), or None when no step could be restored.

  Raises:
    CheckpointMismatch: a readable step whose leaves (paths, shapes, dtypes) differ from
      `abstract_state`'s; the message names the step, the folder and the first differing leaf.
      Nothing is written or deleted.
  """
  wanted = leaf_specs(abstract_state)
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      saved = _saved_specs(manager, step)
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many types on bad files)
      _skip(manager, step, e)
      continue
    mismatch = first_mismatch(saved, wanted)
    if mismatch:
      raise CheckpointMismatch(
          f'checkpoint step {step} in {manager.directory} does not fit the configured model: '
          f'{mismatch}. The config changed since it was written: restore the config, or start '
          'in a new workdir (or delete that stage folder)')
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      _skip(manager, step, e)
      continue
    return step, restored['state'], restored['data']
  return None


def _skip(manager: ocp.CheckpointManager, step: int, error: Exception) -> None:
  logging.warning('checkpoint step %d in %s cannot be read (%s: %s); trying the previous step',
                  step, manager.directory, type(error).__name__, str(error)[:300])


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
