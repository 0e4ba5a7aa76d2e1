"""Label-map functions (NumPy only): the class palette, instance edges, SDM conditioning, label dropping.

Conventions: maps are integer arrays [..., H, W] (leading batch axes allowed); the SDM condition is
NHWC float32 [..., H, W, num_classes + 1] = one-hot over 0..num_classes-1 (background has its own
channel 0) followed by the instance-edge channel (docs/sdm.md §4.6; docs/differences.md §1.10).
"""


import numpy as np

# The one class palette of every figure and preview (uint8 RGB by class id; ids past the end wrap):
# background black, 1 other yellow, 2 inflammatory red, 3 epithelial blue, 4 spindle green, then
# colours for the unmerged ids of CoNSeP (7) and GLySAC (10).
CLASS_COLOURS = np.array([[0, 0, 0], [255, 200, 0], [220, 30, 30], [30, 120, 255], [40, 200, 80],
                          [200, 80, 220], [255, 130, 0], [0, 200, 200], [150, 90, 40],
                          [255, 150, 190], [150, 150, 150]], np.uint8)


def class_colours(type_map: np.ndarray) -> np.ndarray:
  """`CLASS_COLOURS` looked up by class id: int [...] -> uint8 [..., 3]."""
  return CLASS_COLOURS[np.asarray(type_map) % len(CLASS_COLOURS)]


def colour_labels(type_map: np.ndarray, edges: np.ndarray | None = None) -> np.ndarray:
  """Classes in colour (and instance edges in white): int [..., H, W] -> uint8 [..., H, W, 3]."""
  out = class_colours(type_map)
  if edges is not None:
    out = np.where(edges[..., None], np.uint8(255), out)
  return out.astype(np.uint8)


def edge_map(inst_map: np.ndarray) -> np.ndarray:
  """Instance-edge map of docs/sdm.md §4.6.

  A pixel is an edge when its instance id differs from any of its existing 4-neighbours. Both sides of
  every boundary are marked (instance/background and instance/instance); the image border is not an edge.

  Args:
    inst_map: integer [..., H, W] instance ids (0 = background).

  Returns:
    bool [..., H, W].
  """
  inst = np.asarray(inst_map)
  edge = np.zeros(inst.shape, bool)
  dv = inst[..., 1:, :] != inst[..., :-1, :]  # Differs from the pixel below / above.
  dh = inst[..., :, 1:] != inst[..., :, :-1]  # Differs from the pixel right / left.
  edge[..., :-1, :] |= dv
  edge[..., 1:, :] |= dv
  edge[..., :, :-1] |= dh
  edge[..., :, 1:] |= dh
  return edge


def condition(type_map: np.ndarray, inst_map: np.ndarray, num_classes: int,
              no_instance: bool = False) -> np.ndarray:
  """The SDM condition y: one-hot types (background included) and the instance-edge channel.

  Args:
    type_map: integer [..., H, W] merged class ids in 0..num_classes-1.
    inst_map: integer [..., H, W] instance ids.
    num_classes: one-hot width incl. background (CoNSeP 5, GLySAC 4).
    no_instance: drop the edge channel (official flag; DiffMix uses False).

  Returns:
    float32 [..., H, W, num_classes + (0 if no_instance else 1)].

  Raises:
    ValueError: when a class id is outside 0..num_classes-1.
  """
  type_map = np.asarray(type_map)
  if type_map.size and (type_map.min() < 0 or type_map.max() >= num_classes):
    bad = np.unique(type_map[(type_map < 0) | (type_map >= num_classes)])
    raise ValueError(f'class ids must be in 0..{num_classes - 1}; found {bad.tolist()}')
  one_hot = (type_map[..., None] == np.arange(num_classes)).astype(np.float32)
  if no_instance:
    return one_hot
  return np.concatenate([one_hot, edge_map(inst_map)[..., None].astype(np.float32)], axis=-1)


def drop_labels(y, keep):
  """Replaces the whole condition of dropped samples by the all-zero (unconditional) map (docs/sdm.md §4.2).

  NumPy or JAX arrays (the SDM train step calls it on traced ones).

  Args:
    y: float [B, H, W, C] conditions.
    keep: bool [B]; False drops every channel of that sample, the edge channel included.

  Returns:
    float [B, H, W, C], same dtype as y.
  """
  return y * keep.reshape((-1,) + (1,) * (y.ndim - 1)).astype(y.dtype)


def downsample(y, factor: int):
  """Top-left strided down-sampling for SPADE (docs/sdm.md §5; docs/differences.md §1.1): y[..., ::k, ::k, :] (NumPy or JAX).

  PyTorch's nearest interpolation by an integer factor picks the top-left pixel of each k x k cell;
  `jax.image.resize(..., 'nearest')` picks an interior one, so it must not be used.

  Args:
    y: [..., H, W, C] with H and W divisible by `factor`.
    factor: integer k >= 1.

  Returns:
    [..., H // k, W // k, C], same dtype.
  """
  if factor < 1 or y.shape[-3] % factor or y.shape[-2] % factor:
    raise ValueError(f'cannot down-sample {y.shape[-3]}x{y.shape[-2]} by {factor}')
  return y[..., ::factor, ::factor, :]
