"""Official PyTorch checkpoints → Flax params (SDM; HoVer-Net in issue 8). The only module using torch."""

# CLI:
#   python -m diffmix_jax.convert_torch --model sdm --config configs/consep.py \
#       --checkpoint ema_0.9999_010000.pt --out DIR
# writes DIR/sdm_params.msgpack (flax.serialization msgpack of the float32 'params' tree of
# `sdm_unet.create_sdm(**config.diffusion.model)`, read back with `core.checkpoint.load_tree`) and
# DIR/sdm_model_config.json (the model fields used). Files go to a temporary name, then os.replace.

import json
import os
import re
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from diffmix_jax import workdir as wdir
from diffmix_jax.core import checkpoint as ckpt
from diffmix_jax.sdm import unet as sdm_unet

# Flax Dense layers that are kernel-1 Conv1d in the official model ([O, I, 1] weights, sdm.md §2.12).
_CONV1D_NAMES = ('qkv', 'proj_out')


class CheckpointMismatchError(ValueError):
  """A state dict whose keys or shapes differ from the model's; the message lists every difference."""


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict with `torch.load(map_location='cpu', weights_only=True)` into NumPy.

  Args:
    path: a `.pt` file holding a plain state dict (or a dict with a 'state_dict' entry).

  Returns:
    {key: np.ndarray} in the file's dtypes.
  """
  import torch  # pylint: disable=g-import-not-at-top  # optional dependency, lazily imported

  sd = torch.load(path, map_location='cpu', weights_only=True)
  for wrapper in ('state_dict', 'desc'):  # 'desc': the official HoVer-Net checkpoint dict.
    if isinstance(sd, Mapping) and isinstance(sd.get(wrapper), Mapping):
      sd = sd[wrapper]
  if not isinstance(sd, Mapping):
    raise CheckpointMismatchError(f'{path}: expected a state dict, got {type(sd).__name__}')
  out = {}
  for k, v in sd.items():
    v = v.detach().cpu()
    out[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()  # NumPy has no bfloat16
  return out


# ---- SDM (sdm.md §2.12) ----


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
  """Inverse of `_sdm_to_torch` (legacy qkv rows are kept: no permutation, sdm.md §2.7)."""
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


def check_state_dict_keys(state_dict: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]],
                          source: str) -> None:
  """Raises CheckpointMismatchError naming every missing, unexpected and mis-shaped key."""
  missing = sorted(set(expected) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(expected))
  mismatched = sorted(f'{k}: checkpoint {list(np.shape(state_dict[k]))} vs model {list(expected[k])}'
                      for k in set(expected) & set(state_dict)
                      if tuple(np.shape(state_dict[k])) != tuple(expected[k]))
  if missing or unexpected or mismatched:
    parts = [f'{source} does not match the model ({len(expected)} keys expected):']
    for title, items in (('missing keys', missing), ('unexpected keys', unexpected),
                         ('shape mismatches', mismatched)):
      if items:
        parts.append(f'  {title} ({len(items)}): ' + ', '.join(items))
    raise CheckpointMismatchError('\n'.join(parts))


def sdm_params_from_state_dict(state_dict: Mapping[str, np.ndarray], module: sdm_unet.SDMUNet,
                               source: str = 'state dict') -> dict:
  """Converts an official SDM state dict (NumPy) to the Flax 'params' tree of `module`.

  Args:
    state_dict: {torch key: array}, sdm.md §2.12 layout.
    module: the target UNet (its fields fix the expected key set and shapes).
    source: name used in error messages (the checkpoint path).

  Returns:
    Nested dict of float32 np.ndarrays.

  Raises:
    CheckpointMismatchError: listing missing / unexpected keys and shape mismatches.
  """
  flat = traverse_util.flatten_dict(sdm_unet.abstract_params(module))
  expected = {_sdm_torch_key(p): _torch_shape(p, tuple(v.shape)) for p, v in flat.items()}
  check_state_dict_keys(state_dict, expected, source)
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
  return module, sdm_params_from_state_dict(load_torch_state_dict(path), module, source=path)


# ---- HoVer-Net (hovernet.md §1.6) ----


def load_hovernet(path: str, mode: str | None = None, nr_types: int | None = -1, module=None):
  """Official HoVer-Net PyTorch checkpoint -> (module, variables).

  `module.apply(variables, images, train=False)` with RGB NHWC float32 images in 0..255 returns the
  raw NHWC logits {'np', 'hv', 'tp'} of the official forward.

  Args:
    path: `.tar`/`.pt` file (a state dict, or the official {'desc': state dict} wrapper).
    mode: 'original' | 'fast'; None reads it from the tensors.
    nr_types: type classes incl. background; None for segmentation only; -1 reads it from the tensors.
    module: a HoVerNet variant to fill instead of the full-size one.

  Raises:
    convert_hovernet's mismatch error listing missing/unexpected keys and shape mismatches.
  """
  from diffmix_jax.hovernet import torch_import as convert_hovernet  # pylint: disable=g-import-not-at-top
  return convert_hovernet.variables_from_state_dict(load_torch_state_dict(path), mode, nr_types,
                                                    module=module)


def load_hovernet_encoder(path: str, variables: dict) -> tuple[dict, dict]:
  """An ImageNet encoder file onto HoVer-Net variables (hovernet.md §3.3, `strict=False` by name).

  Args:
    path: `.npz` (arrays named with the PyTorch HoVer-Net keys), or a torch file (`.tar`/`.pth`:
      the official {'desc': state dict} wrapper or a bare state dict), read with
      `torch.load(weights_only=True)` (the `[torch]` extra).
    variables: {'params', 'batch_stats'} of our HoVerNet.

  Returns:
    (variables, report) as `convert_hovernet.encoder_from_state_dict`: `conv0` and `d0`-`d3`
    replaced, decoders unchanged; report lists loaded, missing and unexpected keys.

  Raises:
    FileNotFoundError: naming `path`.
    ValueError: a shape mismatch (naming the key and both shapes) or no encoder key in the file.
  """
  from diffmix_jax.hovernet import torch_import as convert_hovernet  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such encoder file (config.hovernet.train.pretrained)')
  if path.lower().endswith('.npz'):
    with np.load(path, allow_pickle=False) as npz:
      state_dict = {k: npz[k] for k in npz.files}
  else:
    state_dict = load_torch_state_dict(path)
  return convert_hovernet.encoder_from_state_dict(state_dict, variables, source=path)


# ---- saving ----


HOVERNET_VARIABLES = 'hovernet_variables.msgpack'  # What `convert --model hovernet` writes ...
HOVERNET_CONFIG = 'hovernet_model_config.json'  # ... and the model fields that rebuild the module.


def hovernet_model_fields(module) -> dict:
  """The `config.hovernet.model` fields that rebuild `module` (models.hovernet.create_hovernet)."""
  units = lambda t: ','.join(str(u) for u in t)
  return {'mode': module.mode, 'nr_types': module.nr_types or 0,
          'encoder_units': units(module.encoder_units), 'decoder_units': units(module.decoder_units),
          'width': module.width, 'split_grouped_convs': module.split_grouped_convs,
          'head_init': module.head_init}


def convert(model: str, config: ml_collections.ConfigDict, checkpoint: str, out_dir: str) -> str:
  """Converts `checkpoint` for `model` ('sdm' | 'hovernet') into `out_dir`; returns the params path."""
  if model == 'hovernet':
    module, variables = load_hovernet(checkpoint, config.hovernet.model.mode,
                                      config.hovernet.model.nr_types)
    out = os.path.join(out_dir, HOVERNET_VARIABLES)
    ckpt.save_tree(out, variables)
    cfg = json.dumps(hovernet_model_fields(module), indent=2).encode()
    wdir.atomic_write(os.path.join(out_dir, HOVERNET_CONFIG), cfg)
    return out
  if model != 'sdm':
    raise ValueError(f'--model={model!r}; expected sdm or hovernet')
  _, params = load_sdm(checkpoint, config.diffusion.model)
  out = os.path.join(out_dir, 'sdm_params.msgpack')
  ckpt.save_tree(out, params)
  cfg = json.dumps(config.diffusion.model.to_dict(), indent=2, sort_keys=True).encode()
  wdir.atomic_write(os.path.join(out_dir, 'sdm_model_config.json'), cfg)
  return out


def main(argv) -> None:
  """absl entry point (flags defined in the __main__ block)."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  print(f'wrote {convert(f.model, f.config, f.checkpoint, f.out)}')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file('config', None, 'Experiment config file (e.g. configs/consep.py).',
                                  lock_config=True)
  flags.DEFINE_enum('model', 'sdm', ['sdm', 'hovernet'], 'Which network the checkpoint holds.')
  flags.DEFINE_string('checkpoint', None, 'PyTorch checkpoint (.pt state dict).')
  flags.DEFINE_string('out', None, 'Output folder for <model>_params.msgpack and its config JSON.')
  flags.mark_flags_as_required(['config', 'checkpoint', 'out'])
  app.run(main)
