"""Official SDM PyTorch checkpoints <-> Flax params (docs/sdm.md §2.12): key and layout mapping, import,
export."""

import re
from typing import Mapping

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from diffmix_jax.core import torch_files
from diffmix_jax.sdm import unet as sdm_unet

# Flax Dense layers that are kernel-1 Conv1d in the official model ([O, I, 1] weights, docs/sdm.md §2.12).
_CONV1D_NAMES = ('qkv', 'proj_out')


def _sdm_torch_key(path: tuple[str, ...]) -> str:
  """Flax path ('output_blocks_2_0', 'in_norm', 'mlp_shared_0', 'kernel') → torch key."""
  *mods, leaf = path
  name = '.'.join(re.sub(r'_(\d+)', r'.\1', m) for m in mods)
  return f'{name}.{"bias" if leaf == "bias" else "weight"}'


def _sdm_to_torch(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
  """Flax leaf → torch tensor layout (NHWC kernels → OIHW, Dense → [O, I] or Conv1d [O, I, 1])."""
  if path[-1] != 'kernel':
    return x
  if x.ndim == 4:
    return np.transpose(x, (3, 2, 0, 1))
  if path[-2] in _CONV1D_NAMES:
    return np.transpose(x)[:, :, None]
  return np.transpose(x)


def _sdm_from_torch(path: tuple[str, ...], w: np.ndarray) -> np.ndarray:
  """Inverse of `_sdm_to_torch` (legacy qkv rows are kept: no permutation, docs/sdm.md §2.7)."""
  if path[-1] != 'kernel':
    return w
  if w.ndim == 4:
    return np.transpose(w, (2, 3, 1, 0))
  if w.ndim == 3:
    return np.transpose(w[:, :, 0])
  return np.transpose(w)


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  return _sdm_to_torch(path, np.empty(shape, np.uint8)).shape


def sdm_expected_shapes(module: sdm_unet.SDMUNet) -> dict[str, tuple[int, ...]]:
  """{torch key: torch shape} of the official state dict for this model (via jax.eval_shape)."""
  flat = traverse_util.flatten_dict(sdm_unet.abstract_params(module))
  return {_sdm_torch_key(p): _torch_shape(p, tuple(v.shape)) for p, v in flat.items()}


def sdm_params_from_state_dict(state_dict: Mapping[str, np.ndarray], module: sdm_unet.SDMUNet,
                               source: str = 'state dict') -> dict:
  """Converts an official SDM state dict (NumPy) to the Flax 'params' tree of `module`.

  Args:
    state_dict: {torch key: array}, docs/sdm.md §2.12 layout.
    module: the target UNet (its fields fix the expected key set and shapes).
    source: name used in error messages (the checkpoint path).

  Returns:
    Nested dict of float32 np.ndarrays.

  Raises:
    CheckpointMismatchError: listing missing / unexpected keys and shape mismatches.
  """
  flat = traverse_util.flatten_dict(sdm_unet.abstract_params(module))
  expected = {_sdm_torch_key(p): _torch_shape(p, tuple(v.shape)) for p, v in flat.items()}
  torch_files.check_state_dict_keys(state_dict, expected, source)
  out = {p: np.asarray(_sdm_from_torch(p, np.asarray(state_dict[_sdm_torch_key(p)])), np.float32)
         for p in flat}
  return traverse_util.unflatten_dict(out)


def export_sdm(params) -> dict[str, np.ndarray]:
  """Flax SDM params → official torch-layout state dict {key: np.ndarray} (inverse of the import)."""
  flat = traverse_util.flatten_dict(jax.device_get(params))
  return {_sdm_torch_key(p): np.ascontiguousarray(_sdm_to_torch(p, np.asarray(v)))
          for p, v in flat.items()}


def load_sdm(path: str, model_config: ml_collections.ConfigDict):
  """Loads an official SDM checkpoint (e.g. ema_0.9999_010000.pt) for `model_config`.

  Args:
    path: PyTorch state dict file.
    model_config: a `diffusion.model` ConfigDict (configs/common.py).

  Returns:
    (module, params): `module.apply({'params': params}, x_t, t, y)` with x_t [B,H,W,3] float32,
    t [B] int on 0…999 and y [B,H,W,num_classes+1] returns [B,H,W,6] like the official forward.
  """
  module = sdm_unet.create_sdm(**model_config)
  return module, sdm_params_from_state_dict(torch_files.load_torch_state_dict(path), module, source=path)
