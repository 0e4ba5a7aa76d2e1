"""Official HoVer-Net state dicts <-> Flax variables (docs/hovernet.md §1.6), and the loaders of a whole
checkpoint (`load_hovernet`) and of an ImageNet encoder file (`load_hovernet_encoder`).

A state dict is a flat dict of NumPy arrays keyed by the PyTorch names (`conv0./.weight`,
`d0.units.1.preact/bn.running_mean`, ...); reading the pickle (torch.load(weights_only=True), the
`desc` wrapper) is `core/torch_files.py`'s, the only place that imports torch.
"""

import os
from typing import Any

import numpy as np
from flax import traverse_util

from diffmix_jax.core import torch_files
from diffmix_jax.hovernet import model as hovernet

# Key segments containing '/' and their Flax module names (docs/differences.md §2.22).
SEGMENT_NAMES = {'/': 'conv', 'conv1/bn': 'conv1_bn', 'conv2/bn': 'conv2_bn', 'preact/bn': 'preact_bn',
                 'preact_bna/bn': 'preact_bna_bn'}
_SEGMENT_KEYS = {v: k for k, v in SEGMENT_NAMES.items() if k != '/'}
# Tensors that carry no Flax variable: BN step counters and the constant upsampling matrix.
IGNORED_SUFFIXES = ('.num_batches_tracked',)
IGNORED_KEYS = ('upsample2x.unpool_mat',)


def strip_module_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
  """Removes a DataParallel `module.` prefix from every key that has it."""
  return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in state_dict.items()}


def flax_location(key: str) -> tuple[str, tuple[str, ...], str]:
  """Where a state-dict key lives in Flax.

  Args:
    key: a PyTorch key, e.g. `decoder.np.u3.dense.units.2.conv1/bn.weight`.

  Returns:
    (collection 'params' or 'batch_stats', module path tuple, torch leaf name 'weight', 'bias',
    'running_mean' or 'running_var').
  """
  *mods, leaf = key.split('.')
  path = []
  for seg in mods:
    if seg.isdigit() and path:
      path[-1] = f'{path[-1]}_{seg}'
    else:
      path.append(SEGMENT_NAMES.get(seg, seg))
  collection = 'batch_stats' if leaf.startswith('running_') else 'params'
  return collection, tuple(path), leaf


def _is_bn(path: tuple[str, ...]) -> bool:
  return path[-1] in ('bn', 'conv1_bn', 'conv2_bn', 'preact_bn', 'preact_bna_bn')


def _flax_leaf(path: tuple[str, ...], leaf: str) -> str:
  if _is_bn(path):
    return {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'}[leaf]
  return {'weight': 'kernel', 'bias': 'bias'}[leaf]


def torch_key(collection: str, path: tuple[str, ...]) -> str:
  """The PyTorch key of a Flax variable path (module names + leaf), inverse of `flax_location`."""
  *mods, leaf = path
  segs = []
  for i, name in enumerate(mods):
    if i == 1 and name == 'conv' and mods[0] == 'conv0':
      segs.append('/')
    elif name in _SEGMENT_KEYS:
      segs.append(_SEGMENT_KEYS[name])
    elif name.startswith('units_'):
      segs += ['units', name[len('units_'):]]
    else:
      segs.append(name)
  torch_leaf = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                'var': 'running_var'}[leaf]
  del collection
  return '.'.join(segs + [torch_leaf])


def _to_flax(value: np.ndarray, leaf: str) -> np.ndarray:
  """Conv weight [O, I/g, kh, kw] -> kernel [kh, kw, I/g, O]; vectors unchanged."""
  value = np.asarray(value)
  return value.transpose(2, 3, 1, 0) if leaf == 'kernel' else value


def _to_torch(value: np.ndarray, leaf: str) -> np.ndarray:
  value = np.asarray(value)
  return value.transpose(3, 2, 0, 1) if leaf == 'kernel' else value


def infer_config(state_dict: dict[str, Any]) -> tuple[str, int | None]:
  """(mode, nr_types) read from the tensors (docs/hovernet.md §1.6)."""
  key = 'decoder.np.u3.conva.weight'
  if key not in state_dict:
    raise ValueError(f'state dict has no {key!r}: not a HoVer-Net checkpoint')
  k = np.shape(state_dict[key])[-1]
  if k not in (3, 5):
    raise ValueError(f'{key} has kernel size {k}; expected 5 (original) or 3 (fast)')
  tp = 'decoder.tp.u0.conv.weight'
  return ('original' if k == 5 else 'fast'), (int(np.shape(state_dict[tp])[0])
                                               if tp in state_dict else None)


def variables_from_state_dict(state_dict: dict[str, np.ndarray], mode: str | None = None,
                              nr_types: int | None = -1,
                              module: hovernet.HoVerNet | None = None):
  """Flax variables from an official state dict.

  Args:
    state_dict: PyTorch key -> NumPy array (a `module.` prefix is stripped). `num_batches_tracked`
      and `upsample2x.unpool_mat` are ignored if present (TF-converted files lack the former).
    mode: 'original' or 'fast'; None reads it from the decoder kernel size.
    nr_types: type classes incl. background, None for segmentation-only; -1 reads it from the tensors.
    module: the HoVerNet to fill (default: full size with `mode`/`nr_types`); pass a smaller variant
      to convert one of its state dicts.

  Returns:
    (module, variables) with variables {'params': ..., 'batch_stats': ...} of float32 NumPy arrays;
    `module.apply(variables, images, train=False)` reproduces the official eval forward.

  Raises:
    ValueError: listing missing keys, unexpected keys and shape mismatches, or a mode/nr_types that
      disagrees with the tensors.
  """
  sd = strip_module_prefix(state_dict)
  if module is None:
    found_mode, found_types = infer_config(sd)
    if mode is not None and mode != found_mode:
      raise ValueError(f'mode={mode!r} but the state dict holds a {found_mode!r} model '
                       '(decoder.np.u3.conva.weight kernel size)')
    if nr_types != -1 and nr_types != found_types:
      raise ValueError(f'nr_types={nr_types} but the state dict has decoder.tp.u0.conv.weight for '
                       f'{found_types} types')
    module = hovernet.HoVerNet(mode=found_mode, nr_types=found_types)
  target = hovernet.abstract_variables(module)
  flat_target = traverse_util.flatten_dict(target)
  expected = {torch_key(p[0], p[1:]): p for p in flat_target}
  given = {k: v for k, v in sd.items()
           if k not in IGNORED_KEYS and not k.endswith(IGNORED_SUFFIXES)}
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(set(given) - set(expected))
  flat, mismatched = {}, []
  for key in sorted(set(expected) & set(given)):
    fpath = expected[key]
    value = _to_flax(given[key], fpath[-1])
    want = flat_target[fpath].shape
    if value.shape != want:
      mismatched.append(f'{key}: got {list(np.shape(given[key]))}, expected '
                        f'{list(_to_torch(np.zeros(want), fpath[-1]).shape)}')
      continue
    flat[fpath] = np.asarray(value, np.float32)
  if missing or unexpected or mismatched:
    lines = [f'state dict does not fit HoVerNet(mode={module.mode!r}, nr_types={module.nr_types}):']
    for what, items in (('missing keys', missing), ('unexpected keys', unexpected),
                        ('shape mismatches', mismatched)):
      if items:
        lines.append(f'  {len(items)} {what}: ' + ', '.join(items[:20]) +
                     (' ...' if len(items) > 20 else ''))
    raise ValueError('\n'.join(lines))
  return module, traverse_util.unflatten_dict(flat)


def state_dict_from_variables(variables: dict, mode: str | None = None,
                              with_buffers: bool = True) -> dict[str, np.ndarray]:
  """The official state dict of Flax HoVer-Net variables (inverse of `variables_from_state_dict`).

  Args:
    variables: {'params': ..., 'batch_stats': ...} of a HoVerNet.
    mode: unused except for validation against the kernels ('original' | 'fast' | None).
    with_buffers: also write `num_batches_tracked` (int64 zeros, as the count is not tracked in Flax)
      and `upsample2x.unpool_mat` (ones [2, 2]) so the dict has all 798 official entries.

  Returns:
    PyTorch key -> NumPy array (float32 weights in OIHW).
  """
  out = {}
  for fpath, value in traverse_util.flatten_dict(dict(variables)).items():
    key = torch_key(fpath[0], fpath[1:])
    out[key] = np.asarray(_to_torch(np.asarray(value), fpath[-1]))
    if with_buffers and key.endswith('.running_mean'):
      out[key[:-len('running_mean')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  if with_buffers:
    out['upsample2x.unpool_mat'] = np.ones((2, 2), np.float32)
  if mode is not None:
    found, _ = infer_config(out)
    if found != mode:
      raise ValueError(f'mode={mode!r} but the variables hold a {found!r} model')
  return out


# The encoder of HoVer-Net (docs/hovernet.md §3.3): what an ImageNet pre-activation ResNet-50 file fills.
ENCODER_MODULES = ('conv0', 'd0', 'd1', 'd2', 'd3')


def encoder_from_state_dict(state_dict: dict[str, Any], variables: dict,
                            source: str = 'state dict') -> tuple[dict, dict]:
  """Loads the `conv0` and `d0`-`d3` tensors of a state dict onto HoVer-Net variables, by name.

  The official training's `strict=False` load of the ImageNet encoder (docs/hovernet.md §3.3): params
  and BatchNorm statistics of the encoder are replaced; `conv_bot` and the decoders keep theirs.

  Args:
    state_dict: PyTorch key -> array (a `module.` prefix is stripped; `num_batches_tracked` and
      `upsample2x.unpool_mat` are ignored).
    variables: {'params', 'batch_stats'} of a HoVerNet of any width (NumPy or JAX arrays).
    source: the file name, for messages.

  Returns:
    (variables with the encoder replaced, NumPy float32 leaves where loaded, the rest as given;
    report {'loaded', 'missing', 'unexpected'}: sorted PyTorch keys; missing = encoder keys of the
    model absent from the file, unexpected = keys of the file that are not encoder keys of it).

  Raises:
    ValueError: a loaded key whose shape differs (naming the key and both shapes, PyTorch layout),
      or a file from which no encoder key loads.
  """
  sd = {k: v for k, v in strip_module_prefix(state_dict).items()
        if k not in IGNORED_KEYS and not k.endswith(IGNORED_SUFFIXES)}
  flat = traverse_util.flatten_dict(dict(variables))
  expected = {torch_key(p[0], p[1:]): p for p in flat if p[1] in ENCODER_MODULES}
  loaded = sorted(set(sd) & set(expected))
  for key in loaded:
    fpath = expected[key]
    value = _to_flax(sd[key], fpath[-1])
    want = tuple(np.shape(flat[fpath]))
    if value.shape != want:
      raise ValueError(f'{source}: {key} has shape {list(np.shape(sd[key]))}; this HoVer-Net '
                       f'expects {list(_to_torch(np.zeros(want), fpath[-1]).shape)}')
    flat[fpath] = np.asarray(value, np.float32)
  if not loaded:
    raise ValueError(f'{source}: no encoder key (conv0.*, d0.* ... d3.* with the PyTorch HoVer-Net '
                     f'names, e.g. conv0./.weight) among its {len(sd)} keys; expected an ImageNet '
                     'pre-activation ResNet-50 file such as ImageNet-ResNet50-Preact_pytorch.tar')
  report = {'loaded': loaded, 'missing': sorted(set(expected) - set(sd)),
            'unexpected': sorted(set(sd) - set(expected))}
  return traverse_util.unflatten_dict(flat), report


def describe(report: dict) -> str:
  """One line of an `encoder_from_state_dict` report: counts and the first keys of each list."""
  part = lambda k: f"{len(report[k])} {k}" + (f" ({', '.join(report[k][:3])}, ...)"
                                             if report[k] and k != 'loaded' else '')
  return ', '.join(part(k) for k in ('loaded', 'missing', 'unexpected'))


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
    ValueError listing missing/unexpected keys and shape mismatches.
  """
  return variables_from_state_dict(torch_files.load_torch_state_dict(path), mode, nr_types,
                                   module=module)


def load_hovernet_encoder(path: str, variables: dict) -> tuple[dict, dict]:
  """An ImageNet encoder file onto HoVer-Net variables (docs/hovernet.md §3.3, `strict=False` by name).

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
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such encoder file (config.hovernet.train.pretrained)')
  if path.lower().endswith('.npz'):
    with np.load(path, allow_pickle=False) as npz:
      state_dict = {k: npz[k] for k in npz.files}
  else:
    state_dict = torch_files.load_torch_state_dict(path)
  return encoder_from_state_dict(state_dict, variables, source=path)
