"""Slide reading at the model's µm/px, the tissue mask and the windows it selects (hand-computed
cases)."""

import pathlib

import numpy as np
import pytest
import tifffile

from diffmix_jax.slides import reading
from diffmix_jax.slides import tissue
import slide_files


class FakeSlide(reading.SlideReader):
  """Levels of a random image, level k = every d-th pixel."""

  def __init__(self, mpp, downsamples=(1,), size=(300, 200)):
    self.path, self.mpp = pathlib.Path('fake.svs'), mpp
    self.downsamples = [float(d) for d in downsamples]
    self.image = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), np.uint8)
    self.dims = [(size[0] // d, size[1] // d) for d in downsamples]

  def read(self, level, x, y, w, h):
    d = int(self.downsamples[level])
    return self.image[::d, ::d][y:y + h, x:x + w]


@pytest.mark.parametrize('mpp, downsamples, override, want_level, want_scale, want_mpp', [
    (0.263, (1, 4), None, 0, 1.0, 0.263),  # Within 10 %: read as it is (hover_next #16).
    (0.5, (1,), None, 0, 2.0, 0.25),  # Coarser than the model: upsampled.
    (0.125, (1, 2, 8), None, 1, 1.0, 0.25),  # A level at the model's µm/px.
    (0.1, (1, 4), None, 0, 0.4, 0.25),  # Level 1 (0.4) too coarse: level 0 downsampled.
    (None, (1,), 0.25, 0, 1.0, 0.25),  # --mpp for a slide without metadata.
])
def test_choose_level(mpp, downsamples, override, want_level, want_scale, want_mpp):
  geom = reading.choose_level(FakeSlide(mpp, downsamples), 0.25, override, 0.1)
  assert (geom.level, geom.scale) == (want_level, pytest.approx(want_scale))
  assert geom.mpp == pytest.approx(want_mpp)
  assert geom.level0_per_px == pytest.approx(want_mpp / (mpp or override))


def test_no_mpp_is_an_error_naming_the_slide_and_the_flag():
  with pytest.raises(ValueError, match=r'fake\.svs: the slide states no µm/px.*--mpp'):
    reading.choose_level(FakeSlide(None), 0.25, None, 0.1)


@pytest.mark.parametrize('mpp', [0.25, 0.5, 0.1])
def test_read_work_is_the_same_however_the_image_is_split(mpp):
  slide = FakeSlide(mpp)
  geom = reading.choose_level(slide, 0.25, None, 0.1)
  whole = reading.read_work(slide, geom, -7, -5, geom.height + 20, geom.width + 11)
  y, x = 13, 29
  part = reading.read_work(slide, geom, y - 7, x - 5, 40, 50)
  np.testing.assert_array_equal(part, whole[y:y + 40, x:x + 50])
  if mpp == 0.25:  # No resampling: the level's pixels, reflect-padded as np.pad does.
    np.testing.assert_array_equal(whole, np.pad(slide.image, ((7, 13), (5, 6), (0, 0)), 'reflect'))


def test_file_formats_state_their_mpp(tmp_path):
  image = slide_files.mosaic(1, 2)[0]
  slide_files.write_svs(tmp_path / 'a.svs', image, 0.252)
  slide_files.write_tiff(tmp_path / 'b.tif', image, 0.5)
  tifffile.imwrite(tmp_path / 'c.tif', image, resolution=(1e4 / 0.3, 1e4 / 0.3),
                   resolutionunit='CENTIMETER')  # Plain (stripped) TIFF: the whole-image reader.
  a, b, c = (reading.open_slide(tmp_path / n) for n in ('a.svs', 'b.tif', 'c.tif'))
  assert isinstance(a, reading.OpenSlideReader) and a.mpp == pytest.approx(0.252)
  assert a.dims == [(512, 256), (128, 64)] and a.downsamples == [1.0, 4.0]
  assert isinstance(b, reading.OpenSlideReader) and b.mpp == pytest.approx(0.5)
  assert isinstance(c, reading.ImageReader) and c.mpp == pytest.approx(0.3)
  for s in (a, b, c):
    np.testing.assert_array_equal(s.read(0, 100, 50, 30, 20), image[50:70, 100:130])
  (tmp_path / 'd.svs').write_bytes((tmp_path / 'a.svs').read_bytes()[:3000])
  with pytest.raises(ValueError, match='d.svs'):
    reading.open_slide(tmp_path / 'd.svs')


def test_plain_tiff_is_mapped_when_uncompressed_and_decoded_when_not(tmp_path):
  """An uncompressed strip TIFF streams from a memory map (so a plain image larger than memory
  still goes through the slide path); a zlib one is decoded whole; both read the same pixels, and
  the resolution tags give the µm/px (40,000 px/cm = 0.25 µm/px)."""
  image = np.random.default_rng(1).integers(0, 256, (300, 400, 3), np.uint8)
  kinds = {}
  for name, compression in (('plain', None), ('zlib', 'zlib')):
    path = tmp_path / f'{name}.tif'
    tifffile.imwrite(path, image, photometric='rgb', compression=compression,
                     resolution=(40000, 40000), resolutionunit='CENTIMETER')
    slide = reading.open_slide(path)
    assert slide.mpp == pytest.approx(0.25) and slide.dims == [(400, 300)]
    np.testing.assert_array_equal(slide.read(0, 17, 29, 50, 40), image[29:69, 17:67])
    kinds[name] = isinstance(slide._image, np.memmap)  # pylint: disable=protected-access
  assert kinds == {'plain': True, 'zlib': False}


def test_otsu_mask_finds_the_tissue_on_glass():
  image = slide_files.mosaic(1, 1, border=64)[0]
  mask = tissue.otsu_mask(image)
  assert mask[64:-64, 64:-64].mean() > 0.99 and not mask[:60].any() and not mask[:, -60:].any()
  assert tissue.otsu_mask(image[64:-64, 64:-64]).all()  # Tissue from edge to edge stays whole.
  assert not tissue.otsu_mask(np.full((100, 100, 3), 240, np.uint8)).any()  # Blank glass.


def test_window_tissue_by_hand():
  # Work image 400 x 400, fast windows (I 256, S 164, p 46): 3 x 3 windows. Mask at 1/4 resolution
  # with one tissue pixel at mask (20, 90) = work rows 80..83, cols 360..363. Window r reads rows
  # r*164 - 46 .. r*164 + 210 (exclusive): rows 80..83 only in r = 0 (r = 1 starts at 118); cols
  # 360..363 in c = 1 (118..374) and c = 2 (282..538).
  mask = np.zeros((100, 100), bool)
  mask[20, 90] = True
  got = tissue.window_tissue(mask, (400, 400), (3, 3), 256, 164)
  want = np.zeros((3, 3), bool)
  want[0, 1] = want[0, 2] = True
  np.testing.assert_array_equal(got, want)


def test_masks_folder_selects_the_windows(tmp_path):
  """--masks: a mask of another size (the slide's aspect ratio) decides which windows run."""
  import types  # pylint: disable=g-import-not-at-top
  import cv2  # pylint: disable=g-import-not-at-top
  from diffmix_jax.slides import pipeline  # pylint: disable=g-import-not-at-top
  slide_files.write_tiff(tmp_path / 'm.tif', slide_files.mosaic(2, 2)[0], 0.25)  # 512 px: 4 x 4.
  model = types.SimpleNamespace(module=types.SimpleNamespace(patch_shapes=(256, 164)),
                                fingerprint=lambda: 'model')
  (tmp_path / 'masks').mkdir()
  mask = np.zeros((64, 64), np.uint8)
  mask[:, :8] = 255  # Work columns 0..63: windows 0 (-46..210) only.
  cv2.imwrite(str(tmp_path / 'masks' / 'm.png'), mask)
  opts = pipeline.Options(chunk=2, masks=str(tmp_path / 'masks'))
  plan = pipeline.plan_slide(tmp_path / 'm.tif', model, 0.25, opts)
  want = np.zeros((4, 4), bool)
  want[:, 0] = True
  np.testing.assert_array_equal(plan.windows, want)
  cv2.imwrite(str(tmp_path / 'masks' / 'm.png'), mask[:, :32])
  with pytest.raises(ValueError, match=r'm\.png: mask of 32x64 px does not have the slide'):
    pipeline.plan_slide(tmp_path / 'm.tif', model, 0.25, opts)
  (tmp_path / 'masks' / 'm.png').unlink()
  with pytest.raises(FileNotFoundError, match="no mask for slide 'm'"):
    pipeline.plan_slide(tmp_path / 'm.tif', model, 0.25, opts)
