"""The built-in demo set's tiles (NumPy only): deterministic, imbalanced, H&E-like (docs/datasets.md §4).

Classes follow CoNSeP's merged ids: 1 other (rare, irregular, mid-dark, speckled), 2 inflammatory
(small, round, very dark), 3 epithelial (large, pale, round, in gland-like clusters), 4 spindle-shaped
(elongated, oriented with the stroma fibres). Stroma is a pink fibrous texture. Every tile is a pure
function of (seed, split, index), so the set is identical on every machine and in any order.
"""

import numpy as np
from scipy import ndimage

SEED = 0  # The demo set is always generated from this seed.
TILE_SIZE = 256
NUM_TILES = {'train': 32, 'test': 8}
CLASS_NAMES = ('background', 'other', 'inflammatory', 'epithelial', 'spindle')
# Rare "other" nuclei per split: (share of tiles that hold any, fewest and most per such tile). Train is
# imbalanced like CoNSeP (~1.6 % of its nuclei); the test split is enriched in the rare class (every
# tile, 8-10 each: ~80 of ~450 nuclei) so that its F_c can be measured, as rare-class performance
# usually is. The splits use separate random streams, so nothing of the test split leaks into train.
RARE = {'train': (0.35, 1, 2), 'test': (1.0, 8, 10)}

# Per class: (mean RGB of the nucleus, semi-axes range a, b in px, boundary irregularity, texture).
_STYLE = {
    1: ((135, 72, 150), (7.0, 9.5), (5.5, 7.5), 0.2, 30.0),
    2: ((58, 28, 95), (3.8, 5.0), (3.4, 4.6), 0.05, 10.0),
    3: ((150, 110, 185), (8.5, 11.5), (7.0, 9.5), 0.08, 18.0),
    4: ((95, 55, 140), (9.0, 14.0), (2.6, 3.6), 0.06, 12.0),
}


def _stroma(rng: np.random.Generator, size: int, angle: float) -> np.ndarray:
  """Pink stroma: low-frequency colour drift plus fibres along `angle`. float32 [S, S, 3] in 0..255."""
  base = np.array([236, 190, 212], np.float32)
  drift = ndimage.gaussian_filter(rng.normal(size=(size, size)), 24) * 60
  # Fibres: white noise filtered in the Fourier domain by a Gaussian that is narrow along the fibre
  # direction and wide across it (periodic, so no seams).
  f = np.fft.fftfreq(size)
  fy, fx = np.meshgrid(f, f, indexing='ij')
  along = fx * np.cos(angle) + fy * np.sin(angle)
  across = -fx * np.sin(angle) + fy * np.cos(angle)
  gain = np.exp(-(along / 0.012) ** 2 - (across / 0.12) ** 2)
  fibres = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(size, size))) * gain))
  fibres = fibres / (fibres.std() + 1e-6)
  img = base + drift[..., None] * np.array([0.2, 0.6, 0.3], np.float32)
  img = img + fibres[..., None] * np.array([4.0, 12.0, 7.0], np.float32)
  return img


def _nucleus_mask(rng: np.random.Generator, cls: int, angle: float
                  ) -> tuple[np.ndarray, np.ndarray]:
  """A slightly irregular filled ellipse. Returns (bool mask [h, w], centre offset (cy, cx))."""
  _, (a0, a1), (b0, b1), irregular, _ = _STYLE[cls]
  a, b = rng.uniform(a0, a1), rng.uniform(b0, b1)
  r = int(np.ceil(a * (1 + 2 * irregular))) + 1
  yy, xx = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float32)
  ca, sa = np.cos(angle), np.sin(angle)
  u, v = xx * ca + yy * sa, -xx * sa + yy * ca
  theta = np.arctan2(v / b, u / a)
  phases = rng.uniform(0, 2 * np.pi, 3)
  amps = rng.normal(0, irregular, 3)
  wobble = 1 + sum(amps[k] * np.cos((k + 2) * theta + phases[k]) for k in range(3))
  mask = (u / a) ** 2 + (v / b) ** 2 <= np.maximum(wobble, 0.3) ** 2
  return mask, np.array([r, r])


def _layout(rng: np.random.Generator, size: int, fibre_angle: float, rare: tuple[int, int]):
  """Draws nucleus (class, centre y, centre x, angle) tuples for one tile; `rare`: (fewest, most)
  rare nuclei, (0, 0) for none."""
  out = []
  for _ in range(rng.integers(0, 3)):  # Gland-like epithelial clusters (rings of large nuclei).
    cy, cx = rng.uniform(30, size - 30, 2)
    radius = rng.uniform(22, 40)
    n = int(2 * np.pi * radius / 17)
    for k in range(n):
      t = 2 * np.pi * k / n + rng.normal(0, 0.05)
      out.append((3, cy + radius * np.sin(t), cx + radius * np.cos(t), t + rng.normal(0, 0.3)))
  for _ in range(rng.integers(1, 4)):  # Inflammatory groups: small dark round cells, often touching.
    cy, cx = rng.uniform(10, size - 10, 2)
    for _ in range(rng.integers(4, 14)):
      out.append((2, cy + rng.normal(0, 12), cx + rng.normal(0, 12), rng.uniform(0, np.pi)))
  for _ in range(rng.integers(8, 22)):  # Spindle cells along the fibres.
    out.append((4, *rng.uniform(0, size, 2), fibre_angle + rng.normal(0, 0.25)))
  if rare[1]:  # Rare "other" nuclei.
    for _ in range(rng.integers(rare[0], rare[1] + 1)):
      out.append((1, *rng.uniform(12, size - 12, 2), rng.uniform(0, np.pi)))
  order = rng.permutation(len(out))
  return [out[i] for i in order]


def make_tile(seed: int, split: str, index: int, size: int = TILE_SIZE):
  """Generates one tile.

  Args:
    seed: dataset seed.
    split: 'train' or 'test' (separate random streams).
    index: tile index within the split.
    size: tile side in pixels.

  Returns:
    (image uint8 [S, S, 3], inst_map int32 [S, S] ids 1..N contiguous, type_map int32 [S, S] in 0..4).
  """
  rng = np.random.default_rng([seed, {'train': 0, 'test': 1}[split], index])
  fibre_angle = rng.uniform(0, np.pi)
  img = _stroma(rng, size, fibre_angle)
  inst = np.zeros((size, size), np.int32)
  types = np.zeros((size, size), np.int32)
  texture = np.zeros((size, size), np.float32)
  share, fewest, most = RARE[split]
  rare = (fewest, most) if rng.random() < share else (0, 0)
  n = 0
  for cls, cy, cx, angle in _layout(rng, size, fibre_angle, rare):
    mask, (oy, ox) = _nucleus_mask(rng, cls, angle)
    y0, x0 = int(round(cy)) - oy, int(round(cx)) - ox
    ys, xs = np.nonzero(mask)
    ys, xs = ys + y0, xs + x0
    keep = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
    ys, xs = ys[keep], xs[keep]
    if ys.size < 6:
      continue
    n += 1
    inst[ys, xs] = n  # Later nuclei occlude earlier ones: touching and overlapping nuclei occur.
    types[ys, xs] = cls
    texture[ys, xs] = _STYLE[cls][4]
  # Drop nuclei that occlusion reduced to slivers, then renumber 1..N.
  sizes = np.bincount(inst.ravel(), minlength=n + 1)
  ids = np.nonzero(sizes >= 6)[0]
  ids = ids[ids > 0]
  lut = np.zeros(n + 1, np.int32)
  lut[ids] = np.arange(1, ids.size + 1)
  inst = lut[inst]
  types[inst == 0] = 0
  # Paint: nucleus colour by class, chromatin speckle, darker rim, slight blur and sensor noise.
  colour = np.zeros((size, size, 3), np.float32)
  for cls in _STYLE:
    colour[types == cls] = _STYLE[cls][0]
  nuc = (inst > 0).astype(np.float32)
  speckle = ndimage.gaussian_filter(rng.normal(size=(size, size)), 0.9) * 2.2
  rim = (nuc - ndimage.gaussian_filter(nuc, 1.2)).clip(0, 1)
  nucleus = colour + (speckle * texture)[..., None] - 60 * rim[..., None]
  soft = ndimage.gaussian_filter(nuc, 0.6)[..., None]
  img = img * (1 - soft) + nucleus * soft
  img = ndimage.gaussian_filter(img, (0.5, 0.5, 0)) + rng.normal(0, 3.0, img.shape)
  return np.clip(np.round(img), 0, 255).astype(np.uint8), inst, types
