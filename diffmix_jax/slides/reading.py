"""Whole-slide reading: levels, µm/px, and regions of the slide resampled to the model's µm/px.

Two readers share one interface: OpenSlide (`openslide-python` + the `openslide-bin` wheel, the `[wsi]`
extra) for every format it detects (Aperio SVS, pyramidal tiled TIFF, NDPI, MRXS, ...), reading regions
on demand; and a whole-image reader for what OpenSlide does not open (plain TIFF through tifffile, PNG
and JPEG through OpenCV), decoded once into memory. The "work image" is the chosen level resampled to the
model's µm/px (`Geometry`); `read_work` returns any rectangle of it, reflect-padded beyond its edges
exactly as tile mode pads a tile (`np.pad(mode='reflect')`), so windows read from a slide equal those
tile mode cuts from the same image. Host NumPy/OpenCV only (no JAX).
"""

import dataclasses
import pathlib

import cv2
import numpy as np

SLIDE_SUFFIXES = ('.svs', '.tif', '.tiff', '.ndpi', '.mrxs', '.scn', '.vms', '.vmu', '.bif', '.svslide',
                  '.png', '.jpg', '.jpeg')


class SlideReader:
  """A slide's levels (level 0 = full resolution) and region reads.

  Attributes:
    path: the file.
    mpp: level-0 µm per pixel from the file's metadata, or None.
    dims: [(width, height)] per level.
    downsamples: level-0 pixels per level pixel, per level.
    magnification: the objective power the file states, or None.
  """
  path: pathlib.Path
  mpp: float | None
  dims: list[tuple[int, int]]
  downsamples: list[float]
  magnification: float | None = None

  def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    """RGB uint8 [h, w, 3] of `level` at level pixel (x, y); the rectangle lies inside the level."""
    raise NotImplementedError


class OpenSlideReader(SlideReader):
  """A slide through OpenSlide; regions are decoded on demand."""

  def __init__(self, path: pathlib.Path):
    import openslide  # pylint: disable=g-import-not-at-top
    self.path, self._slide = path, openslide.OpenSlide(str(path))
    props = self._slide.properties
    mpp_x, mpp_y = props.get(openslide.PROPERTY_NAME_MPP_X), props.get(openslide.PROPERTY_NAME_MPP_Y)
    self.mpp = (float(mpp_x) + float(mpp_y or mpp_x)) / 2 if mpp_x else None
    power = props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
    self.magnification = float(power) if power else None
    self.dims = [tuple(int(v) for v in d) for d in self._slide.level_dimensions]
    self.downsamples = [float(d) for d in self._slide.level_downsamples]

  def read(self, level, x, y, w, h):
    d = self.downsamples[level]  # OpenSlide takes the top-left corner in level-0 pixels.
    import openslide  # pylint: disable=g-import-not-at-top
    try:
      region = self._slide.read_region((int(round(x * d)), int(round(y * d))), level, (w, h))
    except openslide.OpenSlideError as e:
      raise ValueError(f'{self.path}: unreadable at level {level}, ({x}, {y}) + {w}x{h} px: {e} '
                       '(a truncated or damaged file?)') from None
    return np.asarray(region.convert('RGB'))


class ImageReader(SlideReader):
  """One image, one level: an uncompressed plain TIFF memory-mapped (tifffile), any other plain
  TIFF, PNG or JPEG decoded whole."""

  def __init__(self, path: pathlib.Path):
    self.path, self.mpp = path, None
    if path.suffix.lower() in ('.tif', '.tiff'):
      image, self.mpp = _read_tiff(path)
    else:
      image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
      if image is None:
        raise ValueError(f'{path}: not a readable slide or image')
      if image.ndim == 3:
        image = cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2RGB)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] < 3:
      raise ValueError(f'{path}: {image.dtype} image of shape {image.shape}; expected 8-bit RGB')
    self._image = image if image.shape[2] == 3 else image[..., :3]  # A view: a map stays a map.
    self.dims, self.downsamples = [(image.shape[1], image.shape[0])], [1.0]

  def read(self, level, x, y, w, h):
    return self._image[y:y + h, x:x + w]


def _read_tiff(path: pathlib.Path) -> tuple[np.ndarray, float | None]:
  """The first page of a TIFF and its µm/px from the resolution tags (None without a unit)."""
  import tifffile  # pylint: disable=g-import-not-at-top
  try:
    with tifffile.TiffFile(path) as tif:
      page = tif.pages.first
      # An uncompressed, contiguous TIFF is mapped, not read: windows are paged in on demand, so a
      # plain image larger than memory still streams. Compressed ones are decoded whole.
      image = tifffile.memmap(path, page=0, mode='r') if page.is_memmappable else page.asarray()
      tags, mpp = page.tags, None
      unit = tags.get('ResolutionUnit')
      if 'XResolution' in tags and unit is not None and int(unit.value) in (2, 3):
        num, den = tags['XResolution'].value
        per_um = num / den / (25400.0 if int(unit.value) == 2 else 10000.0)  # inch | cm.
        mpp = 1.0 / per_um if per_um > 0 else None
  except Exception as e:  # pylint: disable=broad-except  (tifffile raises many kinds on bad files)
    raise ValueError(f'{path}: not a readable TIFF ({type(e).__name__}: {e})') from None
  return image, mpp


def open_slide(path: pathlib.Path) -> SlideReader:
  """The reader for `path`: OpenSlide when installed and it detects the format, else the whole image.

  Raises:
    ValueError: naming the file, when neither can read it.
  """
  try:
    import openslide  # pylint: disable=g-import-not-at-top
  except ImportError:
    openslide = None
  if openslide is not None and path.suffix.lower() not in ('.png', '.jpg', '.jpeg'):
    if openslide.OpenSlide.detect_format(str(path)):
      try:
        reader = OpenSlideReader(path)
        reader.read(len(reader.dims) - 1, 0, 0, 1, 1)  # A truncated file fails here, not mid-run.
        return reader
      except openslide.OpenSlideError as e:
        raise ValueError(f'{path}: OpenSlide cannot read it ({e})') from None
  return ImageReader(path)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """The work image: `level` of the slide scaled by `scale` (work px per level px).

  Attributes:
    level: the slide level read.
    scale: work pixels per level pixel (1.0: no resampling).
    width, height: the work image size in pixels.
    mpp: µm per work pixel (the model's, or the level's when within the tolerance).
    level0_per_px: level-0 pixels per work pixel (output coordinates are level-0 pixels).
  """
  level: int
  scale: float
  width: int
  height: int
  mpp: float
  level0_per_px: float


def choose_level(slide: SlideReader, model_mpp: float, mpp_override: float | None,
                 tolerance: float) -> Geometry:
  """The level and resampling that give the model's µm/px.

  The coarsest level whose µm/px is at most model_mpp * (1 + tolerance) is read; it is used as it is
  when its µm/px is within `tolerance` (relative) of the model's, else resampled to exactly the model's.

  Raises:
    ValueError: naming the slide and --mpp, when the slide has no µm/px and no override is given.
  """
  mpp0 = mpp_override or slide.mpp
  if not mpp0:
    raise ValueError(f'{slide.path}: the slide states no µm/px (resolution); give it with --mpp '
                     f'(the model expects {model_mpp} µm/px)')
  mpps = [mpp0 * d for d in slide.downsamples]
  fine = [k for k, m in enumerate(mpps) if m <= model_mpp * (1 + tolerance)] or [0]
  level = max(fine, key=lambda k: mpps[k])
  scale = 1.0 if abs(mpps[level] / model_mpp - 1) <= tolerance else mpps[level] / model_mpp
  w, h = slide.dims[level]
  return Geometry(level, scale, max(1, int(round(w * scale))), max(1, int(round(h * scale))),
                  mpps[level] / scale, slide.downsamples[level] / scale)


def reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
  """Indices mapped into [0, n) as `np.pad(mode='reflect')` maps them (edge not repeated)."""
  if n == 1:
    return np.zeros_like(idx)
  period = 2 * (n - 1)
  idx = np.mod(idx, period)
  return np.where(idx >= n, period - idx, idx)


def read_work(slide: SlideReader, geom: Geometry, y0: int, x0: int, h: int, w: int) -> np.ndarray:
  """Rows y0..y0+h and columns x0..x0+w of the work image, reflect-padded beyond its edges.

  Returns:
    uint8 [h, w, 3] RGB.
  """
  rows = reflect_index(np.arange(y0, y0 + h), geom.height)
  cols = reflect_index(np.arange(x0, x0 + w), geom.width)
  r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
  if geom.scale == 1.0:
    block = slide.read(geom.level, c0, r0, c1 - c0, r1 - r0)
  else:  # Bilinear at the level coordinates of the work pixel centres: the same for any split.
    lw, lh = slide.dims[geom.level]
    ys = (np.arange(r0, r1) + 0.5) / geom.scale - 0.5
    xs = (np.arange(c0, c1) + 0.5) / geom.scale - 0.5
    ly0, lx0 = max(0, int(np.floor(ys[0]))), max(0, int(np.floor(xs[0])))
    ly1, lx1 = min(lh, int(np.floor(ys[-1])) + 2), min(lw, int(np.floor(xs[-1])) + 2)
    src = slide.read(geom.level, lx0, ly0, lx1 - lx0, ly1 - ly0)
    map_x, map_y = np.meshgrid((xs - lx0).astype(np.float32), (ys - ly0).astype(np.float32))
    block = cv2.remap(src, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
  return block[(rows - r0)[:, None], (cols - c0)[None, :]]


def read_level(slide: SlideReader, max_side: int) -> tuple[np.ndarray, int]:
  """The coarsest level whose longer side is at least `max_side` (else level 0), scaled down to at
  most `max_side`: for the tissue mask and the thumbnail.

  Returns:
    (RGB uint8 [h, w, 3], the level read).
  """
  big = [k for k, (w, h) in enumerate(slide.dims) if max(w, h) >= max_side] or [0]
  level = max(big, key=lambda k: slide.downsamples[k])
  w, h = slide.dims[level]
  image = slide.read(level, 0, 0, w, h)
  f = max_side / max(w, h)
  if f < 1:
    image = cv2.resize(image, (max(1, round(w * f)), max(1, round(h * f))),
                       interpolation=cv2.INTER_AREA)
  return np.ascontiguousarray(image), level
