"""Image strips and grids the stages write to TensorBoard and the report: titles, class legends,
rows of examples (uint8 RGB, NumPy + PIL only). Classes are coloured by `data.labels`' palette.
"""

import numpy as np

from diffmix_jax.data import labels


def text_strip(width: int, texts, columns: bool = False, height: int = 24) -> np.ndarray:
  """White strip with black text: one line, or with `columns` each text centred over its equal
  share of the width (column titles). uint8 [height, width, 3]."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  img = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(img)
  if columns:
    w = width / len(texts)
    for i, t in enumerate(texts):
      draw.text((i * w + max((w - draw.textlength(t)) / 2, 2), height // 2 - 6), t, fill='black')
  else:
    draw.text((6, height // 2 - 6), '   '.join(texts), fill='black')
  return np.asarray(img)


def legend_strip(width: int, class_names, height: int = 24) -> np.ndarray:
  """White strip naming each class (id 1 on) beside its palette colour: uint8 [height, width, 3]."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  img = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(img)
  x = 6
  for k, name in enumerate(class_names[1:], start=1):
    colour = tuple(int(v) for v in labels.class_colours(np.array(k)))
    draw.rectangle([x, height // 2 - 7, x + 14, height // 2 + 7], fill=colour, outline='black')
    text = f'{k} {name}'
    draw.text((x + 20, height // 2 - 6), text, fill='black')
    x += 36 + int(draw.textlength(text))
  return np.asarray(img)


def to_uint8(x: np.ndarray) -> np.ndarray:
  """[-1, 1] float images -> uint8 (x + 1) * 127.5, rounded and clipped."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(columns: list[np.ndarray]) -> np.ndarray:
  """Rows of examples, one column per kind: each entry uint8 [N, H, W, 3] -> uint8 [N*H, K*W, 3]."""
  rows = np.concatenate(columns, axis=2)  # [N, H, K*W, 3]
  return rows.reshape(-1, *rows.shape[2:])
