"""Reading PyTorch state dicts into NumPy and checking them against a model's keys (the `[torch]`
extra, imported only when a file is read)."""

from typing import Any, Mapping

import numpy as np


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
