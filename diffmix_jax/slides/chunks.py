"""Chunks of the work image and the rule that writes every nucleus once and whole across their edges.

The window grid is tile mode's over the whole work image (docs/hovernet.md §7): window (r, c) predicts
output rows r*S..r*S+S from the input rows r*S-p..r*S-p+I. A chunk is k x k of these output blocks
(its *core*); it is post-processed on its *extent*, the core plus a margin of m blocks on each side
(clipped to the image), so a nucleus near the core's edge is seen whole. Network outputs of a pixel are
the same in every extent (same windows, same inputs), so only the post-processing can differ between
two extents, and only by its region-wide normalisations and its borders.

Writing rule, chunks in raster order (docs/slides.md §3): a chunk keeps a nucleus of its
extent when (1) the nucleus does not touch an extent edge that is not an image edge (it would be cut),
(2) its centroid lies in the core extended forward (right and down) by half the margin, and (3) it
overlaps no nucleus kept by an earlier chunk. (2) makes the earliest chunk that sees a nucleus whole
decide it; (3) makes the written nuclei disjoint. Both only look at earlier chunks, whose kept nuclei
are on disk, so a resumed run decides exactly as an uninterrupted one. Host NumPy/OpenCV only.
"""

import dataclasses

import cv2
import numpy as np


@dataclasses.dataclass(frozen=True)
class Grid:
  """Chunks of `chunk` x `chunk` output blocks of side `out_size` over a `height` x `width` work image.

  Attributes:
    height, width: work image size (px).
    in_size, out_size: network input I and output S (256/164 fast, 270/80 original).
    chunk: output blocks per chunk side (k).
    margin: output blocks of margin per side (m).
  """
  height: int
  width: int
  in_size: int
  out_size: int
  chunk: int
  margin: int

  @property
  def blocks(self) -> tuple[int, int]:
    """Window grid (rows, cols): n = ceil((L - S) / S) + 1 per side, as tile mode."""
    s = self.out_size
    return (max(1, -(-(self.height - s) // s) + 1), max(1, -(-(self.width - s) // s) + 1))

  @property
  def chunks(self) -> tuple[int, int]:
    rows, cols = self.blocks
    return -(-rows // self.chunk), -(-cols // self.chunk)

  def order(self) -> list[tuple[int, int]]:
    """Chunk indices in raster order (the writing order)."""
    rows, cols = self.chunks
    return [(i, j) for i in range(rows) for j in range(cols)]

  def core_blocks(self, i: int, j: int) -> tuple[int, int, int, int]:
    """Block rows b0..b1 and cols c0..c1 (exclusive) of chunk (i, j)'s core."""
    rows, cols = self.blocks
    k = self.chunk
    return i * k, min(rows, (i + 1) * k), j * k, min(cols, (j + 1) * k)

  def extent_blocks(self, i: int, j: int) -> tuple[int, int, int, int]:
    rows, cols = self.blocks
    b0, b1, c0, c1 = self.core_blocks(i, j)
    m = self.margin
    return max(0, b0 - m), min(rows, b1 + m), max(0, c0 - m), min(cols, c1 + m)

  def to_px(self, b0: int, b1: int, c0: int, c1: int) -> tuple[int, int, int, int]:
    """Block ranges to work pixel rows y0..y1 and cols x0..x1, clipped to the image."""
    s = self.out_size
    return (min(b0 * s, self.height), min(b1 * s, self.height), min(c0 * s, self.width),
            min(c1 * s, self.width))

  def earlier_neighbours(self, i: int, j: int) -> list[tuple[int, int]]:
    """Earlier chunks (raster order) whose extent meets chunk (i, j)'s: the only ones whose nuclei
    can overlap its own."""
    y0, y1, x0, x1 = self.to_px(*self.extent_blocks(i, j))
    d = -(-2 * self.margin // self.chunk) + 1  # Chunks further than d apart have disjoint extents.
    cols = self.chunks[1]
    out = []
    for a in range(max(0, i - d), i + 1):
      for b in range(max(0, j - d), min(cols, j + d + 1)):
        if (a, b) >= (i, j):
          break
        v0, v1, u0, u1 = self.to_px(*self.extent_blocks(a, b))
        if v0 < y1 and y0 < v1 and u0 < x1 and x0 < u1:
          out.append((a, b))
    return out


def contour_mask(bbox: np.ndarray, contour: np.ndarray) -> np.ndarray:
  """The filled contour in its bbox: bool [rmax - rmin, cmax - cmin] (bbox [rmin, cmin, rmax, cmax])."""
  rmin, cmin, rmax, cmax = (int(v) for v in bbox)
  mask = np.zeros((rmax - rmin, cmax - cmin), np.uint8)
  cv2.fillPoly(mask, [np.asarray(contour, np.int32) - np.array([cmin, rmin], np.int32)], 1)
  return mask.astype(bool)


def overlaps(bbox: np.ndarray, contour: np.ndarray, bboxes: np.ndarray, contours: list) -> bool:
  """Whether a nucleus (bbox [4], contour [K, 2] x, y) shares a pixel with any of others."""
  if not len(bboxes):
    return False
  hit = ((bboxes[:, 0] < bbox[2]) & (bbox[0] < bboxes[:, 2]) & (bboxes[:, 1] < bbox[3])
         & (bbox[1] < bboxes[:, 3]))
  if not hit.any():
    return False
  mine = contour_mask(bbox, contour)
  for k in np.flatnonzero(hit):
    other = contour_mask(bboxes[k], contours[k])
    r0, c0 = max(bbox[0], bboxes[k][0]), max(bbox[1], bboxes[k][1])
    r1, c1 = min(bbox[2], bboxes[k][2]), min(bbox[3], bboxes[k][3])
    a = mine[r0 - bbox[0]:r1 - bbox[0], c0 - bbox[1]:c1 - bbox[1]]
    b = other[r0 - bboxes[k][0]:r1 - bboxes[k][0], c0 - bboxes[k][1]:c1 - bboxes[k][1]]
    if np.any(a & b):
      return True
  return False


def select(grid: Grid, i: int, j: int, nuclei: dict, earlier: dict) -> np.ndarray:
  """The nuclei chunk (i, j) writes (the rule of the module docstring).

  Args:
    grid: the chunk grid.
    i, j: the chunk.
    nuclei: its extent's nuclei in work pixels, `records.Nuclei`-like dict of arrays: `bbox`
      [N, 4] int64 (rmin, cmin, rmax, cmax; exclusive max), `centroid` [N, 2] float64 (x, y),
      `contours` list of [K, 2] int32 (x, y).
    earlier: the nuclei kept by `grid.earlier_neighbours(i, j)`, same fields.

  Returns:
    int64 [M] indices into `nuclei`, ascending.
  """
  ey0, ey1, ex0, ex1 = grid.to_px(*grid.extent_blocks(i, j))
  cy0, cy1, cx0, cx1 = grid.to_px(*grid.core_blocks(i, j))
  ahead = grid.margin * grid.out_size // 2
  keep = []
  for n, (bbox, (x, y)) in enumerate(zip(nuclei['bbox'], nuclei['centroid'])):
    cut = ((bbox[0] <= ey0 and ey0 > 0) or (bbox[2] >= ey1 and ey1 < grid.height)
           or (bbox[1] <= ex0 and ex0 > 0) or (bbox[3] >= ex1 and ex1 < grid.width))
    if cut or not (cy0 <= y < cy1 + ahead and cx0 <= x < cx1 + ahead):
      continue
    if overlaps(bbox, nuclei['contours'][n], earlier['bbox'], earlier['contours']):
      continue
    keep.append(n)
  return np.asarray(keep, np.int64)
