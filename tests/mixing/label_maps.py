"""Label maps with known answers for the mixing tests (docs/method.md §8): disks, lobed nuclei."""

import numpy as np
from scipy import ndimage
from skimage import morphology

from diffmix_jax.mixing import tiles as mixing_tiles

CROSS = ndimage.generate_binary_structure(2, 1)


def paint(inst, types, shape_mask, top, left, i, cls):
  h, w = shape_mask.shape
  inst[top:top + h, left:left + w][shape_mask] = i
  types[top:top + h, left:left + w][shape_mask] = cls


def disk_at(inst, types, row, col, radius, i, cls):
  d = morphology.disk(radius).astype(bool)
  paint(inst, types, d, row - radius, col - radius, i, cls)


def known_answer_tiles():
  """The two 200x200 tiles of §8 item 6."""
  a_inst, a_type = np.zeros((200, 200), np.int32), np.zeros((200, 200), np.int32)
  for i, (r, c) in enumerate([(50, 50), (50, 100), (50, 150), (100, 50), (100, 100)], start=1):
    disk_at(a_inst, a_type, r, c, 7, i, 2)
  disk_at(a_inst, a_type, 150, 150, 3, 6, 1)
  b_inst, b_type = np.zeros((200, 200), np.int32), np.zeros((200, 200), np.int32)
  for i, (r, c, rad) in enumerate([(60, 60, 4), (60, 140, 5), (140, 60, 6), (20, 140, 3)], start=1):
    disk_at(b_inst, b_type, r, c, rad, i, 1)
  return [mixing_tiles.prepare_tile('tile_a', a_inst, a_type, 5),
          mixing_tiles.prepare_tile('tile_b', b_inst, b_type, 5)]


def random_tile(rng, name, size=200, tries=400, rare_p=0.3):
  """Non-overlapping one-component nuclei: disks with a side lobe (centroid != box centre)."""
  inst, types = np.zeros((size, size), np.int32), np.zeros((size, size), np.int32)
  k = 0
  for _ in range(tries):
    rare = rng.random() < rare_p
    r = int(rng.integers(2, 5) if rare else rng.integers(4, 10))
    m = np.zeros((2 * r + 5, 2 * r + 5), bool)
    m[2:2 * r + 3, 2:2 * r + 3] = morphology.disk(r).astype(bool)
    if rng.random() < 0.6:  # a 3x3 lobe on the rim makes the shape asymmetric
      a = rng.random() * 2 * np.pi
      cy, cx = 2 + r + int(round(r * np.sin(a))), 2 + r + int(round(r * np.cos(a)))
      m[cy - 1:cy + 2, cx - 1:cx + 2] = True
      lab, _ = ndimage.label(m, CROSS)
      m = lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1
    m = m[np.any(m, 1)][:, np.any(m, 0)]
    h, w = m.shape
    top, left = (int(v) for v in rng.integers(0, size - np.array([h, w]) + 1))
    if np.any(inst[top:top + h, left:left + w][m]):
      continue
    k += 1
    paint(inst, types, m, top, left, k, 1 if rare else int(rng.integers(2, 5)))
  return mixing_tiles.prepare_tile(name, inst, types, 5)


def random_tiles(seed, count=4, size=200):
  rng = np.random.default_rng(1000 + seed)
  return [random_tile(rng, f't_{i}', size) for i in range(count)]
