"""Slides the slide tests make for themselves: demo test tiles in a mosaic, written as a pyramidal tiled
TIFF (resolution tags, tifffile) or an Aperio-style SVS (ImageDescription with `MPP`), and the tiny
random-weight HoVer-Net of tests/predict_test.py as a converted model folder."""

import json
import pathlib

import cv2
import numpy as np

from diffmix_jax import convert_torch
from diffmix_jax import predict
from diffmix_jax.core import checkpoint
from diffmix_jax.hovernet import model as hovernet
from predict_test import FIELDS
from predict_test import _variables
from tfds_builders.demo_nuclei import generate as demo_tiles


def model_fields() -> dict:
  """predict_test.FIELDS in the types of config.hovernet.model (comma strings or tuples of ints)."""
  from configs import common  # pylint: disable=g-import-not-at-top
  base = common.base_config().hovernet.model
  as_tuple = lambda v: tuple(int(x) for x in v.split(',')) if isinstance(v, str) else tuple(v)
  return {k: as_tuple(v) if isinstance(base[k], tuple) else v for k, v in FIELDS.items()}


def write_model(folder: pathlib.Path, seed: int = 3) -> pathlib.Path:
  """tests/predict_test.py's tiny fast-mode HoVer-Net (NP head biased to nuclei) as a `--model_dir`."""
  fields = predict._model_config(model_fields())  # pylint: disable=protected-access
  module = hovernet.create_hovernet(**fields)
  folder.mkdir(parents=True, exist_ok=True)
  checkpoint.save_tree(str(folder / convert_torch.HOVERNET_VARIABLES), _variables(module, seed))
  (folder / convert_torch.HOVERNET_CONFIG).write_text(
      json.dumps(convert_torch.hovernet_model_fields(module)))
  return folder


def mosaic(rows: int, cols: int, border: int = 0, first: int = 0):
  """Demo test tiles (256 px) row-major from tile `first` (cycling over the 8), on white when
  `border` > 0.

  Returns:
    (image uint8 [H, W, 3] RGB, inst_map int32 [H, W] with ids unique over the mosaic, type_map int32),
    H = rows * 256 + 2 border, W = cols * 256 + 2 border.
  """
  n, tiles, offset = demo_tiles.NUM_TILES['test'], [], 0
  for k in range(rows * cols):
    image, inst, types = demo_tiles.make_tile(demo_tiles.SEED, 'test', (first + k) % n)
    tiles.append((image, np.where(inst > 0, inst + offset, 0), types))
    offset += int(inst.max())
  out = []
  for part, fill in zip(range(3), (255, 0, 0)):
    whole = np.concatenate([np.concatenate([t[part] for t in tiles[r * cols:(r + 1) * cols]], axis=1)
                            for r in range(rows)])
    pad = ((border, border), (border, border)) + (((0, 0),) if whole.ndim == 3 else ())
    out.append(np.pad(whole, pad, constant_values=fill))
  return tuple(out)


def _levels(image: np.ndarray, downsamples):
  for d in downsamples:
    h, w = image.shape[:2]
    yield d, (image if d == 1 else cv2.resize(image, (max(1, w // d), max(1, h // d)),
                                              interpolation=cv2.INTER_AREA))


def write_tiff(path: pathlib.Path, image: np.ndarray, mpp: float | None, downsamples=(1, 4)) -> None:
  """A pyramidal tiled TIFF (zlib, 128 px tiles), µm/px in XResolution/YResolution per centimetre."""
  import tifffile  # pylint: disable=g-import-not-at-top
  with tifffile.TiffWriter(path) as w:
    for k, (d, level) in enumerate(_levels(image, downsamples)):
      res = {} if mpp is None else {'resolution': (1e4 / (mpp * d), 1e4 / (mpp * d)),
                                    'resolutionunit': 'CENTIMETER'}
      w.write(level, tile=(128, 128), photometric='rgb', compression='zlib',
              subfiletype=1 if k else 0, metadata=None, **res)


def write_svs(path: pathlib.Path, image: np.ndarray, mpp: float, downsamples=(1, 4)) -> None:
  """An Aperio-style SVS: tiled TIFF pages whose ImageDescription carries `|MPP = <mpp>`."""
  import tifffile  # pylint: disable=g-import-not-at-top
  h, w = image.shape[:2]
  with tifffile.TiffWriter(path) as tw:
    for d, level in _levels(image, downsamples):
      desc = (f'Aperio Image Library v12.0.0\n{w}x{h} -> {level.shape[1]}x{level.shape[0]} '
              f'(128x128) RGB|AppMag = 40|MPP = {mpp}')
      tw.write(level, tile=(128, 128), photometric='rgb', compression='zlib', description=desc,
               metadata=None)
