"""Tissue: a mask on a low-resolution level (Otsu on saturation) or a user's mask image, and the windows
of the work image it touches. Host NumPy/OpenCV only.
"""

import pathlib

import cv2
import numpy as np

MASK_SUFFIXES = ('.png', '.tif', '.tiff', '.jpg', '.jpeg', '.bmp')
# Otsu's threshold on the HSV saturation (0-255) is clipped to this range: below it is the glass and
# scanner noise of an empty slide, above it a slide that is tissue from edge to edge would be split
# into "tissue" and "background" halves (the demo tiles' stroma has saturation >= 28).
SATURATION_RANGE = (8, 20)
MIN_OBJECT_FRACTION = 1e-4  # Components smaller than this share of the mask are dropped (dust).


def otsu_mask(image: np.ndarray) -> np.ndarray:
  """Tissue of a low-resolution RGB image: saturation above Otsu's threshold (clipped to
  SATURATION_RANGE), closed and opened with a 3x3 ellipse, small components removed.

  Args:
    image: uint8 [h, w, 3] RGB.

  Returns:
    bool [h, w].
  """
  sat = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[..., 1]
  otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
  mask = (sat > np.clip(otsu, *SATURATION_RANGE)).astype(np.uint8)
  kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
  mask = cv2.morphologyEx(cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel), cv2.MORPH_OPEN, kernel)
  n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
  keep = stats[:, cv2.CC_STAT_AREA] >= max(1, MIN_OBJECT_FRACTION * mask.size)
  keep[0] = False
  return keep[labels] if n > 1 else mask.astype(bool)


def find_mask(masks_dir: str, stem: str) -> pathlib.Path:
  """`masks_dir/<stem>.<suffix>` (MASK_SUFFIXES).

  Raises:
    FileNotFoundError: naming the folder, the slide stem and the suffixes tried.
  """
  for suffix in MASK_SUFFIXES:
    path = pathlib.Path(masks_dir) / f'{stem}{suffix}'
    if path.exists():
      return path
  raise FileNotFoundError(f'{masks_dir}: no mask for slide {stem!r} (--masks expects '
                          f'{stem}{{{",".join(MASK_SUFFIXES)}}}, nonzero = tissue)')


def read_mask(path: pathlib.Path, slide_shape: tuple[int, int]) -> np.ndarray:
  """A mask image (nonzero = tissue, any size with the slide's aspect ratio) as bool [h, w].

  Raises:
    ValueError: naming the file, when unreadable or of another aspect ratio than the slide (h, w).
  """
  mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
  if mask is None:
    raise ValueError(f'{path}: not a readable mask image (--masks)')
  (h, w), (sh, sw) = mask.shape, slide_shape
  if abs(h / w - sh / sw) > 0.02 * sh / sw + 2 / min(h, w):
    raise ValueError(f'{path}: mask of {w}x{h} px does not have the slide\'s aspect ratio '
                     f'({sw}x{sh} px at level 0)')
  return mask > 0


def window_tissue(mask: np.ndarray, work_shape: tuple[int, int], grid_n: tuple[int, int],
                  in_size: int, out_size: int) -> np.ndarray:
  """Which windows touch tissue: window (r, c) reads work rows r*S - p .. r*S - p + I (p = (I - S)/2).

  Args:
    mask: bool [h, w] tissue at any resolution of the work image.
    work_shape: (H, W) of the work image.
    grid_n: (rows, cols) of the window grid.
    in_size: I, the network input side; out_size: S, its output side.

  Returns:
    bool [rows, cols].
  """
  (h, w), (hh, ww) = mask.shape, work_shape
  integral = np.pad(np.cumsum(np.cumsum(mask.astype(np.int64), 0), 1), ((1, 0), (1, 0)))
  pad = (in_size - out_size) // 2

  def bounds(n, side, m):
    lo = np.arange(n) * out_size - pad
    a = np.clip(np.floor(lo * m / side), 0, m - 1).astype(np.int64)
    b = np.clip(np.ceil((lo + in_size) * m / side), a + 1, m).astype(np.int64)
    return a, b

  r0, r1 = bounds(grid_n[0], hh, h)
  c0, c1 = bounds(grid_n[1], ww, w)
  total = (integral[r1][:, c1] - integral[r0][:, c1] - integral[r1][:, c0] + integral[r0][:, c0])
  return total > 0
