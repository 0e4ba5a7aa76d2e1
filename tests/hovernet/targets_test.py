"""Tests of the HoVer-Net targets, patch extraction (docs/hovernet.md §2.4, §6.3) and augmentation (§2.2-3)."""

import numpy as np
import pytest

from diffmix_jax.hovernet import augment as hovernet_augment
from diffmix_jax.hovernet import targets as hovernet_targets


def _disk(shape, centre, radius):
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def _two_disks():
  inst = np.zeros((80, 80), np.int32)
  inst[_disk(inst.shape, (30, 25), 9)] = 1
  inst[_disk(inst.shape, (45, 52), 11)] = 2
  return inst


def test_hv_range_background_and_sign_change_at_centres():
  inst = _two_disks()
  hv = hovernet_targets.hv_map(inst, 80)
  assert hv.shape == (80, 80, 2) and hv.dtype == np.float32
  assert hv.min() >= -1 and hv.max() <= 1
  assert np.all(hv[inst == 0] == 0)
  for inst_id, (cy, cx) in ((1, (30, 25)), (2, (45, 52))):
    m = inst == inst_id
    x, y = hv[..., 0], hv[..., 1]
    assert x[m].min() == -1 and x[m].max() == 1 and y[m].min() == -1 and y[m].max() == 1
    # The zero lies one pixel up-left of the centroid: x < 0 left of it, x > 0 right of it.
    assert x[cy, cx - 2] < 0 and x[cy, cx - 1] == 0 and x[cy, cx] > 0
    assert y[cy - 2, cx] < 0 and y[cy - 1, cx] == 0 and y[cy, cx] > 0


def test_hv_of_a_disk_matches_hand_values():
  inst = np.zeros((40, 40), np.int32)
  inst[_disk(inst.shape, (20, 20), 5)] = 7
  x = hovernet_targets.hv_map(inst, 40)[..., 0]
  # Columns 15..25, zero at column 19: negatives -4..-1 scaled by 4, positives 1..6 by 6.
  np.testing.assert_allclose(x[20, 15:26], [-1, -.75, -.5, -.25, 0, 1 / 6, 2 / 6, .5, 4 / 6,
                                            5 / 6, 1], rtol=1e-6)


def test_hv_small_and_top_edge_instances_get_zero():
  inst = np.zeros((60, 60), np.int32)
  inst[20:25, 20:25] = 1  # 25 px < 30: no HV values.
  inst[1:8, 30:40] = 2  # bbox starts at row 1: border quirk, no HV values.
  inst[30:40, 30:40] = 3
  hv = hovernet_targets.hv_map(inst, 60)
  assert np.all(hv[inst == 1] == 0) and np.all(hv[inst == 2] == 0)
  assert np.abs(hv[inst == 3]).max() == 1
  inst[20:26, 20:25] = 1  # Exactly 30 px is kept (pinned scikit-image rule, docs/differences.md §2.8).
  assert np.abs(hovernet_targets.hv_map(inst, 60)[inst == 1]).max() == 1


def test_hv_only_counts_pixels_inside_the_output_crop():
  inst = np.zeros((60, 60), np.int32)
  inst[2:12, 20:30] = 1  # 100 px, all outside the 20x20 centre crop.
  assert np.all(hovernet_targets.hv_map(inst, 20) == 0)


def test_mirror_fix_splits_duplicate_ids():
  inst = np.zeros((20, 20), np.int32)
  inst[2:5, 2:5] = 1
  inst[10:13, 10:13] = 1  # Same id, disconnected (a mirror duplicate).
  inst[15:18, 2:5] = 2
  inst[5, 5] = 1  # Diagonal contact only: separate under 4-connectivity.
  fixed = hovernet_targets.fix_mirror_padding(inst)
  assert set(np.unique(fixed[inst == 1])) == {1, 4, 5}  # max id 2 + part index 2, 3.
  assert np.all(fixed[inst == 2] == 2)


def test_targets_shapes_and_values():
  inst = _two_disks()
  types = (inst > 0).astype(np.int32) * 3
  t = hovernet_targets.targets(inst, types, 40)
  assert t['np'].shape == (40, 40) and t['tp'].shape == (40, 40) and t['hv'].shape == (40, 40, 2)
  np.testing.assert_array_equal(t['np'], (inst[20:60, 20:60] > 0).astype(np.int32))
  np.testing.assert_array_equal(t['hv'], hovernet_targets.hv_map(inst, 40)[20:60, 20:60])
  assert set(np.unique(t['tp'])) == {0, 3}


def test_49_mirror_patches_per_1000_tile_in_official_order():
  yy, xx = np.mgrid[:1000, :1000]
  tile = np.stack([yy, xx], axis=-1).astype(np.int32)
  patches = hovernet_targets.extract_patches(tile, 540, 164)
  assert patches.shape == (49, 540, 540, 2)
  # The central 164x164 region of each patch sits at these tile offsets, regular grid row-major,
  # then the bottom row, the right column and the corner (docs/hovernet.md §6.3).
  regular = [0, 164, 328, 492, 656, 820]
  expected = ([(r, c) for r in regular for c in regular] + [(836, c) for c in regular] +
              [(r, 836) for r in regular] + [(836, 836)])
  centres = [(int(p[188, 188, 0]), int(p[188, 188, 1])) for p in patches]
  assert centres == expected
  # Reflect padding without edge repetition: row -1 mirrors row 1.
  assert patches[0][187, 188, 0] == 1
  covered = np.zeros((1000, 1000), bool)
  for r, c in centres:
    covered[r:r + 164, c:c + 164] = True
  assert covered.all()
  assert len(hovernet_targets.extract_patches(tile, 256, 256)) == 16


def test_shape_augment_moves_image_and_labels_together():
  rng = np.random.default_rng(0)
  inst = np.zeros((120, 120), np.int32)
  inst[_disk(inst.shape, (50, 60), 12)] = 5
  types = (inst > 0).astype(np.int32) * 2
  image = np.where(inst[..., None] > 0, 200, 40).astype(np.uint8).repeat(3, axis=-1)
  for seed in range(5):
    img, ins, typ = hovernet_augment.shape_augment(np.random.default_rng(seed), image, inst,
                                                   types, 80)
    assert img.shape == (80, 80, 3) and ins.shape == (80, 80) and ins.dtype == np.int32
    assert set(np.unique(ins)) <= {0, 5} and set(np.unique(typ)) <= {0, 2}
    np.testing.assert_array_equal(ins > 0, typ > 0)
    np.testing.assert_array_equal(ins > 0, img[..., 0] == 200)  # Same warp, nearest sampling.
  # Validation: centre crop only, deterministic.
  img, ins, _ = hovernet_augment.shape_augment(rng, image, inst, types, 80, train=False)
  np.testing.assert_array_equal(ins, inst[20:100, 20:100])
  # A patch smaller than the input is zero-padded (256-px synthetic patches in original mode).
  img, ins, _ = hovernet_augment.shape_augment(rng, image[:60, :60], inst[:60, :60],
                                               types[:60, :60], 80, train=False)
  assert img.shape == (80, 80, 3) and np.all(img[:10] == 0)


def test_intensity_augment_is_seeded_and_keeps_dtype():
  image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  a = hovernet_augment.intensity_augment(np.random.default_rng(3), image)
  b = hovernet_augment.intensity_augment(np.random.default_rng(3), image)
  assert a.dtype == np.uint8 and a.shape == image.shape
  np.testing.assert_array_equal(a, b)
  outs = [hovernet_augment.intensity_augment(np.random.default_rng(s), image) for s in range(6)]
  assert any(not np.array_equal(o, image) for o in outs)


@pytest.mark.parametrize('length', [1000, 256, 300])
def test_patch_offsets_cover_every_pixel(length):
  window, step = 540, 164
  padded = length + (window - step)
  covered = np.zeros(length, bool)
  for r, _ in hovernet_targets.patch_offsets((padded, padded), window, step):
    covered[r:r + step] = True
  assert covered.all()


def test_real_consep_tile_patches_and_targets(consep_dir):
  import cv2  # pylint: disable=g-import-not-at-top
  from scipy import io as sio  # pylint: disable=g-import-not-at-top
  image = cv2.cvtColor(cv2.imread(str(consep_dir / 'Train' / 'Images' / 'train_1.png')),
                       cv2.COLOR_BGR2RGB)
  mat = sio.loadmat(consep_dir / 'Train' / 'Labels' / 'train_1.mat')
  tile = np.concatenate([image.astype(np.int32), mat['inst_map'][..., None].astype(np.int32),
                         mat['type_map'][..., None].astype(np.int32)], axis=-1)
  patches = hovernet_targets.extract_patches(tile, 540, 164)
  assert patches.shape == (49, 540, 540, 5)
  p = patches[24]
  img, inst, typ = hovernet_augment.shape_augment(np.random.default_rng(0), p[..., :3].astype(
      np.uint8), p[..., 3], p[..., 4], 270)
  t = hovernet_targets.targets(inst, typ, 80)
  assert t['hv'].shape == (80, 80, 2) and np.abs(t['hv']).max() <= 1
  assert np.all(t['hv'][t['np'] == 0] == 0) and set(np.unique(t['tp'])) <= set(range(5))
  assert (t['np'] > 0).mean() > 0.01  # train_1 has 850 nuclei.


def test_median_frequency_tp_class_weights_by_hand():
  # Pixel counts 6, 1, 3, 0 of classes 0..3 over two maps: shares .6, .1, .3; median .3.
  maps = [np.array([[0, 0, 0], [0, 2, 2]]), np.array([[0, 0, 1, 2]])]
  got = hovernet_targets.tp_class_weights([(maps, 2)], 4, 'median_frequency')
  np.testing.assert_allclose(got, [0.5, 3.0, 1.0, 1.0], rtol=1e-6)  # Absent class 3: weight 1.
  assert got.dtype == np.float32
  # A second set (shares .25, 0, 0, .75) giving 1 row to the first's 2: f = (2 f_1 + f_2) / 3 =
  # (.48333, .06667, .2, .25), median .225.
  got = hovernet_targets.tp_class_weights([(maps, 2), ([np.array([[0, 3], [3, 3]])], 1)], 4,
                                          'median_frequency')
  np.testing.assert_allclose(got, [0.225 / (1.45 / 3), 3.375, 1.125, 0.9], rtol=1e-6)
  assert hovernet_targets.tp_class_weights([(maps, 1)], 4, 'none') is None
  with pytest.raises(ValueError, match='tp_class_weighting'):
    hovernet_targets.tp_class_weights([(maps, 1)], 4, 'inverse')
  with pytest.raises(ValueError, match='rows must be > 0; got 0'):
    hovernet_targets.tp_class_weights([(maps, 0)], 4, 'median_frequency')
  with pytest.raises(ValueError, match=r'training type map 1: ids 0\.\.4 outside \[0, 4\)'):
    hovernet_targets.tp_class_weights([([maps[0], np.array([[0, 4]])], 1)], 4, 'median_frequency')
