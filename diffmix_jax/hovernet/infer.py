"""HoVer-Net tiled inference (docs/hovernet.md §7): padded patches, jitted sharded batches, stitching, .mat.

Inputs overlap and outputs tile the image (step = output size); the stitched tile goes through the
official post-processing once (docs/differences.md §2.13).
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from diffmix_jax.hovernet import targets as hovernet_targets
from diffmix_jax.metrics import postprocess
from diffmix_jax.core import sharding
from diffmix_jax.core import checkpoint
from diffmix_jax.hovernet import model as hovernet



def tile_patches(image: np.ndarray, input_size: int, output_size: int) -> np.ndarray:
  """Reflect-padded input windows of one tile, row-major (docs/hovernet.md §7).

  Args:
    image: [H, W, 3] uint8 RGB tile.
    input_size: W of the network (270 or 256).
    output_size: S of the network (80 or 164).

  Returns:
    [rows * cols, input_size, input_size, 3] uint8; patch (r, c) predicts output rows r*S..r*S+S.
  """
  h, w = image.shape[:2]
  gh = hovernet_targets.tile_geometry(h, input_size, output_size)
  gw = hovernet_targets.tile_geometry(w, input_size, output_size)
  padded = np.pad(image, [(gh['pad_before'], gh['pad_after']),
                          (gw['pad_before'], gw['pad_after']), (0, 0)], mode='reflect')
  return np.stack([padded[r * output_size:r * output_size + input_size,
                          c * output_size:c * output_size + input_size]
                   for r in range(gh['n']) for c in range(gw['n'])])


def stitch(outputs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Places per-patch outputs [rows * cols, S, S, C] row-major into the tile, cropped to `shape`.

  Returns:
    [H, W, C], same dtype.
  """
  s = outputs.shape[1]
  rows = -(-(shape[0] - s) // s) + 1
  cols = -(-(shape[1] - s) // s) + 1
  if outputs.shape[0] != rows * cols:
    raise ValueError(f'{outputs.shape[0]} patch outputs do not make a {rows}x{cols} grid for a '
                     f'{shape} tile')
  grid = outputs.reshape(rows, cols, s, s, -1).transpose(0, 2, 1, 3, 4)
  return grid.reshape(rows * s, cols * s, -1)[:shape[0], :shape[1]]


def infer_step(variables: Any, images: jax.Array, *, module: hovernet.HoVerNet) -> jax.Array:
  """Eval-mode forward to the post-processing channels (docs/hovernet.md §7 "Per patch").

  Args:
    variables: {'params', 'batch_stats'}.
    images: [B, I, I, 3] RGB in 0..255 (any numeric dtype).

  Returns:
    [B, S, S, 4] float32 = [argmax TP as float, softmax(NP)[1], h, v] (3 channels without TP).
  """
  out = module.apply(variables, images.astype(jnp.float32), train=False)
  chans = [jax.nn.softmax(out['np'], axis=-1)[..., 1:2], out['hv']]
  if 'tp' in out:
    chans.insert(0, jnp.argmax(out['tp'], axis=-1)[..., None].astype(jnp.float32))
  return jnp.concatenate(chans, axis=-1)


def local_mesh() -> Mesh:
  """A mesh over this process's devices: tiles are split by process, so each predicts alone."""
  return Mesh(np.asarray(jax.local_devices()), (sharding.DATA,))


@functools.lru_cache(maxsize=8)
def _jitted_infer_step(module: hovernet.HoVerNet, mesh: Mesh):
  """`infer_step` jitted for (module, mesh): one compile per network and mesh, however many
  predictors (validation every epoch, every run of a stage) are created from it."""
  rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(functools.partial(infer_step, module=module), in_shardings=(rep, batch_sh),
                 out_shardings=batch_sh)


def create_predictor(module: hovernet.HoVerNet, variables: Any, batch_size: int,
                     mesh: Mesh | None = None) -> Callable[[np.ndarray], np.ndarray]:
  """A function patches [P, I, I, 3] uint8 -> outputs [P, S, S, C] float32, batched and sharded.

  Args:
    module: the HoVerNet.
    variables: its variables (host or device arrays); replicated onto the mesh once.
    batch_size: patches per jitted call, a multiple of the mesh size (the last batch is padded).
    mesh: devices to shard the batch over (default: this process's devices).
  """
  mesh = mesh or local_mesh()
  n_dev = mesh.shape[sharding.DATA]
  if batch_size % n_dev:
    raise ValueError(f'config.eval.batch_size={batch_size} is not divisible by the '
                     f'{n_dev} local devices; use a multiple of {n_dev}')
  rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  variables = jax.device_put(variables, rep)
  step = _jitted_infer_step(module, mesh)

  def predict(patches: np.ndarray) -> np.ndarray:
    outs = []
    for i in range(0, len(patches), batch_size):
      chunk = patches[i:i + batch_size]
      pad = batch_size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
      out = np.asarray(jax.device_get(step(variables, jax.device_put(chunk, batch_sh))))
      outs.append(out[:batch_size - pad])
    return np.concatenate(outs)

  return predict


def predict_tile(predict: Callable[[np.ndarray], np.ndarray], module: hovernet.HoVerNet,
                 image: np.ndarray) -> np.ndarray:
  """Stitched prediction map of one tile.

  Args:
    predict: from `create_predictor`.
    module: the HoVerNet (for its patch sizes).
    image: [H, W, 3] uint8 RGB.

  Returns:
    [H, W, 4] float32 [tp, np, h, v], ready for `postprocess.process`.
  """
  input_size, output_size = module.patch_shapes
  outputs = predict(tile_patches(image, input_size, output_size))
  return stitch(outputs, image.shape[:2])


def predict_record(predict, module: hovernet.HoVerNet, image: np.ndarray,
                   params: postprocess.Params = postprocess.OFFICIAL) -> dict[str, np.ndarray]:
  """One tile through inference and post-processing (once per stitched tile, with `params`) to a
  `.mat` record.

  Returns:
    `postprocess.to_record` dict: `inst_map` [H, W] int32, `inst_uid`, `inst_type` [N] int32,
    `inst_centroid` [N, 2] float64 (x, y).
  """
  if not module.nr_types:
    raise ValueError('evaluation needs a HoVerNet with a TP branch (config.hovernet.model.nr_types)')
  pred_map = predict_tile(predict, module, image)
  inst_map, info = postprocess.process(pred_map, module.nr_types, params)
  return postprocess.to_record(inst_map, info)


def load_variables(path: str, module: hovernet.HoVerNet) -> Any:
  """Variables written by `hovernet_train` (`variables.msgpack`) for `module`.

  Raises:
    FileNotFoundError: naming the file and the stage that writes it; ValueError: they do not fit.
  """
  return checkpoint.load_tree(path, hovernet.abstract_variables(module),
                              'run the hovernet_train stage first')
