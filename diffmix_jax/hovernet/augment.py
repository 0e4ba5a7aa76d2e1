"""HoVer-Net training augmentation (docs/hovernet.md §2.1-§2.3), seeded NumPy/OpenCV, no JAX.

Shape augmentation (affine, centre crop, flips) uses one random draw for the image and both label maps;
intensity augmentation touches the image only. Same distributions as the reference, not imgaug's stream.
"""

import cv2
import numpy as np

from diffmix_jax.hovernet import targets as hovernet_targets


def affine_matrix(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A 2x3 matrix of imgaug's Affine as configured in §2.2, about the image centre.

  scale x, y ~ U(0.8, 1.2) independently; translate x, y ~ U(-1 %, 1 %) of the size; shear x, y ~
  U(-5, 5) degrees; rotate ~ U(-179, 179) degrees.
  """
  sx, sy = rng.uniform(0.8, 1.2, size=2)
  tx, ty = rng.uniform(-0.01, 0.01, size=2) * (width, height)
  shx, shy = np.deg2rad(rng.uniform(-5.0, 5.0, size=2))
  rot = np.deg2rad(rng.uniform(-179.0, 179.0))
  cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
  to_origin = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]])
  scale = np.diag([sx, sy, 1.0])
  shear = np.array([[1, np.tan(shx), 0], [np.tan(shy), 1, 0], [0, 0, 1]])
  c, s = np.cos(rot), np.sin(rot)
  rotate = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
  back = np.array([[1, 0, cx + tx], [0, 1, cy + ty], [0, 0, 1]])
  return (back @ rotate @ shear @ scale @ to_origin)[:2].astype(np.float64)


def _warp(a: np.ndarray, m: np.ndarray) -> np.ndarray:
  """Nearest-neighbour warp with zero fill (black image, background labels), docs/differences.md §2.9."""
  h, w = a.shape[:2]
  return cv2.warpAffine(a, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                        borderValue=0)


def shape_augment(rng: np.random.Generator, image: np.ndarray, inst_map: np.ndarray,
                  type_map: np.ndarray, input_size: int, train: bool = True):
  """Affine -> centre crop to the input size -> flip LR (p 0.5) -> flip UD (p 0.5) (§2.1 step 2).

  Args:
    rng: NumPy generator (the draw is shared by the three arrays).
    image: [H, W, 3] uint8.
    inst_map, type_map: [H, W] integer maps.
    input_size: network input side; a smaller patch is zero-padded up to it (deviation: the
      reference breaks on 256-px synthetic patches in original mode, docs/differences.md §2.20).
    train: False applies the centre crop only (validation).

  Returns:
    (image uint8 [I, I, 3], inst_map int32 [I, I], type_map int32 [I, I]).
  """
  labels = np.stack([inst_map, type_map], axis=-1).astype(np.float32)  # Exact below 2**24.
  if train:
    m = affine_matrix(rng, *image.shape[:2])
    image, labels = _warp(image, m), _warp(labels, m)
  image = _pad_to(hovernet_targets.centre_crop(image, input_size), input_size)
  labels = _pad_to(hovernet_targets.centre_crop(labels, input_size), input_size)
  if train:
    if rng.random() < 0.5:
      image, labels = image[:, ::-1], labels[:, ::-1]
    if rng.random() < 0.5:
      image, labels = image[::-1], labels[::-1]
  labels = np.rint(labels).astype(np.int32)
  return np.ascontiguousarray(image), labels[..., 0].copy(), labels[..., 1].copy()


def _pad_to(a: np.ndarray, size: int) -> np.ndarray:
  h, w = a.shape[:2]
  if h >= size and w >= size:
    return a
  ph, pw = max(size - h, 0), max(size - w, 0)
  return np.pad(a, [(ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)] + [(0, 0)] * (a.ndim - 2))


def _gaussian_blur(rng, img):
  kx, ky = rng.choice([1, 3, 5], size=2)
  return cv2.GaussianBlur(img, (int(kx), int(ky)), sigmaX=0, sigmaY=0,
                          borderType=cv2.BORDER_REPLICATE)


def _median_blur(rng, img):
  k = int(rng.choice([1, 3, 5]))
  return img if k == 1 else cv2.medianBlur(img, k)


def _gaussian_noise(rng, img):
  sigma = rng.uniform(0.0, 0.05 * 255)
  shape = img.shape if rng.random() < 0.5 else img.shape[:2] + (1,)
  noise = rng.normal(0.0, sigma, size=shape)
  return np.clip(img.astype(np.float64) + noise, 0, 255).astype(np.uint8)


def _hue(rng, img):
  hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
  shift = rng.uniform(-8, 8)
  hsv[..., 0] = np.mod(hsv[..., 0].astype(np.float64) + shift, 180).astype(np.uint8)
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _saturation(rng, img):
  v = 1.0 + rng.uniform(-0.2, 0.2)
  gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None].astype(np.float64)
  return np.clip(img * v + gray * (1.0 - v), 0, 255).astype(np.uint8)


def _brightness(rng, img):
  return np.clip(img.astype(np.float64) + rng.uniform(-26, 26), 0, 255).astype(np.uint8)


def _contrast(rng, img):
  rng.uniform(0.75, 1.25)  # The reference computes a contrast change and returns the original.
  return img


def intensity_augment(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
  """One of {Gaussian blur, median blur, Gaussian noise}, then hue, saturation, brightness and the
  no-op contrast in random order (docs/hovernet.md §2.3).

  Args:
    rng: NumPy generator.
    image: [H, W, 3] uint8 RGB.

  Returns:
    [H, W, 3] uint8.
  """
  image = np.ascontiguousarray(image, np.uint8)
  first = (_gaussian_blur, _median_blur, _gaussian_noise)[int(rng.integers(3))]
  image = first(rng, image)
  for i in rng.permutation(4):
    image = (_hue, _saturation, _brightness, _contrast)[int(i)](rng, image)
  return np.ascontiguousarray(image, np.uint8)
