"""Tests of diffmix_jax.metrics.postprocess: the §4.1 watershed steps and the §4.2 per-instance info."""

import importlib

import numpy as np
from scipy import ndimage
import pytest

from configs import common
from diffmix_jax.metrics import postprocess
from tfds_builders.demo_nuclei import generate as demo_tiles

# docs/hovernet.md §4.1 step 4, typed from the spec: ksize-21 derivative and binomial smoothing C(20, i).
_DERIV_HALF = [1, 18, 152, 798, 2907, 7752, 15504, 23256, 25194, 16796]
_DERIV = np.array([-d for d in _DERIV_HALF] + [0] + _DERIV_HALF[::-1], np.float64)
_SMOOTH = np.array([1, 20, 190, 1140, 4845, 15504, 38760, 77520, 125970, 167960, 184756, 167960,
                    125970, 77520, 38760, 15504, 4845, 1140, 190, 20, 1], np.float64)


def exact_hv(label: np.ndarray) -> np.ndarray:
  """Exact HV map of a label image (docs/hovernet.md §2.4): offsets from each instance's centre of mass.

  Per instance and axis, negative offsets are divided by |min| and positive ones by max.

  Returns:
    [H, W, 2] float32, channel 0 = x (horizontal), 1 = y (vertical); 0 outside instances.
  """
  label = np.asarray(label)
  ids = np.unique(label)
  ids = ids[ids > 0]
  hv = np.zeros(label.shape + (2,), np.float32)
  if not len(ids):
    return hv
  rows, cols = np.indices(label.shape).astype(np.float64)
  for ch, coord in enumerate((cols, rows)):
    mean = np.zeros(label.max() + 1)
    mean[ids] = ndimage.mean(coord, label, ids)
    off = coord - mean[label]
    lo = np.ones(label.max() + 1)  # Divisors; 1 where a side is empty (its values are then 0).
    hi = np.ones(label.max() + 1)
    lo[ids] = np.maximum(-ndimage.minimum(off, label, ids), 1e-12)
    hi[ids] = np.maximum(ndimage.maximum(off, label, ids), 1e-12)
    hv[..., ch] = np.where(label > 0, np.where(off < 0, off / lo[label], off / hi[label]), 0)
  return hv


def pred_map_from_labels(label: np.ndarray, type_map: np.ndarray | None = None) -> np.ndarray:
  """[H, W, 4] float32 [tp, np, h, v] with exact NP (0/1) and HV maps of `label`."""
  fg = (label > 0).astype(np.float32)
  tp = fg if type_map is None else type_map.astype(np.float32)
  return np.dstack([tp, fg, exact_hv(label)]).astype(np.float32)


def random_labels(rng: np.random.Generator, size: int = 256) -> np.ndarray:
  """Touching convex nuclei: each pixel goes to its nearest seed if within that seed's radius.

  Seeds are at least 12 px apart, radii 6..13 px; ids are shuffled and non-contiguous.
  """
  seeds = []
  for _ in range(2000):
    p = rng.uniform(8, size - 8, 2)
    if all(np.hypot(*(p - q)) >= 12 for q in seeds):
      seeds.append(p)
  seeds = np.array(seeds)
  radii = rng.uniform(6, 13, len(seeds))
  rows, cols = np.indices((size, size))
  d2 = (rows[None] - seeds[:, 0, None, None]) ** 2 + (cols[None] - seeds[:, 1, None, None]) ** 2
  nearest = np.argmin(d2, axis=0)
  inside = np.take_along_axis(d2, nearest[None], 0)[0] <= radii[nearest] ** 2
  ids = rng.choice(np.arange(1, 10 * len(seeds)), len(seeds), replace=False)
  return np.where(inside, ids[nearest], 0).astype(np.int32)


def disc(shape, centre, radius) -> np.ndarray:
  rows, cols = np.indices(shape)
  return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2


def iou(a: np.ndarray, b: np.ndarray) -> float:
  return (a & b).sum() / (a | b).sum()


def test_remove_small_objects_drops_strictly_less_than_min_size():
  label = np.zeros((20, 20), np.int32)
  label[0, :9] = 4  # 9 px: removed.
  label[2, :10] = 9  # 10 px: kept.
  label[4, :11] = 2  # 11 px: kept.
  out = postprocess.remove_small_objects(label, 10)
  np.testing.assert_array_equal(np.unique(out), [0, 2, 9])
  assert (out == 9).sum() == 10 and (out == 2).sum() == 11
  assert (label == 4).sum() == 9  # The input is not modified.


def test_sobel_edges_equal_spec_kernels_with_reflect101():
  rng = np.random.default_rng(0)
  h = ndimage.gaussian_filter(rng.normal(size=(40, 53)), 3).astype(np.float32) * 5 - 1
  v = ndimage.gaussian_filter(rng.normal(size=(40, 53)), 3).astype(np.float32) * 3 + 2

  def reference(x, axis):
    x = (x - x.min()) / (x.max() - x.min())
    padded = np.pad(x.astype(np.float64), 10, mode='reflect')  # numpy 'reflect' = reflect-101.
    along = _DERIV if axis == 1 else _SMOOTH
    across = _SMOOTH if axis == 1 else _DERIV
    out = sum(along[k] * padded[:, k:k + x.shape[1]] for k in range(21))
    out = sum(across[k] * out[k:k + x.shape[0], :] for k in range(21))
    return 1 - (out - out.min()) / (out.max() - out.min())

  sh, sv = postprocess.sobel_edges(h, v)
  assert sh.dtype == np.float32 and sv.dtype == np.float32
  np.testing.assert_allclose(sh, reference(h, axis=1), atol=2e-6)
  np.testing.assert_allclose(sv, reference(v, axis=0), atol=2e-6)


def test_single_disc_is_one_instance_equal_to_the_disc():
  label = disc((48, 48), (24, 20), 9).astype(np.int32) * 5
  inst_map = postprocess.separate_instances(*np.moveaxis(pred_map_from_labels(label)[..., 1:], -1, 0))
  assert inst_map.dtype == np.int32
  ids = np.unique(inst_map)[1:]
  assert len(ids) == 1
  np.testing.assert_array_equal(inst_map > 0, label > 0)


def test_np_threshold_is_inclusive_at_one_half():
  label = disc((48, 48), (24, 24), 9).astype(np.int32)
  pred = pred_map_from_labels(label)
  pred[..., 1] *= 0.5
  assert postprocess.separate_instances(pred[..., 1], pred[..., 2], pred[..., 3]).max() > 0
  pred[..., 1] = np.where(label > 0, np.float32(np.nextafter(np.float32(0.5), np.float32(0))), 0)
  assert postprocess.separate_instances(pred[..., 1], pred[..., 2], pred[..., 3]).max() == 0


def test_markers_use_the_5x5_ellipse_opening_with_opencv_borders():
  ellipse = np.array([[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1],
                      [0, 0, 1, 0, 0]])
  blb = np.zeros((30, 40), np.int32)
  blb[10:15, 2:7] = ellipse  # 21 px: the opening keeps it whole.
  blb[10:13, 12:24] = 1  # 3 x 12 bar (36 px) inside the image: the 5-tall ellipse never fits.
  blb[0:3, 26:38] = 1  # The same bar on the top border: OpenCV's border never erodes, so it stays.
  blb[20:24, 20:24] = 1  # 4 x 4 square: the 5-wide ellipse never fits.
  out = postprocess.markers(blb, np.zeros(blb.shape))
  assert out.dtype == np.int32
  np.testing.assert_array_equal(out[10:15, 2:7] > 0, ellipse > 0)
  assert out[10:13, 12:24].max() == 0 and out[20:24, 20:24].max() == 0
  assert (out[0:3, 26:38] > 0).sum() >= 20
  # E >= 0.4 is removed before the opening (inclusive); holes are filled first.
  disk = disc((30, 40), (15, 20), 6).astype(np.int32)
  plain = postprocess.markers(disk, np.zeros(disk.shape))
  assert (plain > 0).sum() > 90
  edge = np.where(disk > 0, 0.39, 0.0)
  np.testing.assert_array_equal(postprocess.markers(disk, edge), plain)
  assert postprocess.markers(disk, np.where(disk > 0, 0.4, 0.0)).max() == 0
  edge[15, 20] = 0.9  # One interior edge pixel makes a hole that is filled again.
  np.testing.assert_array_equal(postprocess.markers(disk, edge), plain)


def test_thirteen_pixel_blob_loses_its_marker_in_the_opening():
  rows, cols = np.indices((40, 60))
  diamond = np.abs(rows - 20) + np.abs(cols - 12) <= 2
  assert diamond.sum() == 13  # Passes the 10-px cut of step 2.
  label = np.where(diamond, 1, 0) + np.where(disc((40, 60), (20, 40), 8), 2, 0)
  inst_map, _ = postprocess.process(pred_map_from_labels(label.astype(np.int32)), 5)
  assert inst_map[diamond].max() == 0  # Dropped: its marker vanished in the 5x5 ellipse opening.
  ids = np.unique(inst_map)[1:]
  assert len(ids) == 1 and iou(inst_map == ids[0], label == 2) > 0.95


def test_params_default_to_the_official_values_and_name_bad_fields():
  assert postprocess.OFFICIAL == postprocess.Params(0.5, 0.4, 10, 21, 5)  # docs/hovernet.md §4.1.
  assert postprocess.params_from(common.base_config().eval.postprocess) == postprocess.OFFICIAL
  fields = postprocess.OFFICIAL._asdict()
  with pytest.raises(ValueError, match=r'config\.eval\.postprocess: expected the fields'):
    postprocess.params_from({k: v for k, v in fields.items() if k != 'min_area'})
  with pytest.raises(ValueError, match=r'config\.eval\.postprocess\.sobel_ksize: expected an odd'):
    postprocess.params_from({**fields, 'sobel_ksize': 33})


def test_a_3px_opening_keeps_the_thirteen_pixel_blob():
  rows, cols = np.indices((40, 60))
  diamond = np.abs(rows - 20) + np.abs(cols - 12) <= 2
  label = np.where(diamond, 1, 0) + np.where(disc((40, 60), (20, 40), 8), 2, 0)
  params = postprocess.Params(sobel_ksize=11, marker_open=3, min_area=5)
  inst_map, _ = postprocess.process(pred_map_from_labels(label.astype(np.int32)), 5, params)
  ids = np.unique(inst_map)[1:]
  assert len(ids) == 2  # The official 5x5 opening drops the diamond (test above); 3x3 keeps it.
  for gt in (1, 2):
    assert max(iou(inst_map == i, label == gt) for i in ids) > 0.9


def test_demo_nuclei_are_separated_with_the_demo_postprocessing():
  """Exact NP/HV maps of 8 demo train tiles: the share of each class's nuclei recovered (a predicted
  instance with IoU > 0.5). The demo's nuclei are half CoNSeP's size; the official opening erases
  the markers of many small ones (0.83 / 0.38 / 0.99 / 0.59 of other / inflammatory / epithelial /
  spindle); configs/demo.py's halved kernels recover 1.0 / 0.83 / 1.0 / 0.94."""
  demo = importlib.import_module('configs.demo').get_config()
  shares = {}
  for name, params in (('official', postprocess.OFFICIAL),
                       ('demo', postprocess.params_from(demo.eval.postprocess))):
    found, total = np.zeros(5), np.zeros(5)
    for i in range(8):
      _, inst, types = demo_tiles.make_tile(demo_tiles.SEED, 'train', i)
      hv = exact_hv(inst)
      pred = postprocess.separate_instances((inst > 0).astype(np.float32), hv[..., 0], hv[..., 1],
                                            params)
      n_t, n_p = inst.max() + 1, pred.max() + 1
      inter = np.bincount(inst.ravel() * n_p + pred.ravel(), minlength=n_t * n_p).reshape(n_t, n_p)
      ious = inter / (inter.sum(1)[:, None] + inter.sum(0)[None] - inter)
      for t in range(1, n_t):
        c = np.bincount(types[inst == t]).argmax()
        total[c] += 1
        found[c] += (ious[t, 1:] > 0.5).any()
    assert total[1:].min() >= 6
    shares[name] = found[1:] / total[1:]
  # Measured (NumPy/OpenCV, the same on every machine): official 5/6, 39/103, 90/91, 67/113;
  # demo 6/6, 86/103, 91/91, 106/113. Margin: 2 % of a class's nuclei either way (the official
  # port is the reference: it must neither lose nor gain nuclei); the demo's kernels never do worse.
  np.testing.assert_allclose(shares['official'], [5 / 6, 39 / 103, 90 / 91, 67 / 113], atol=0.02)
  np.testing.assert_allclose(shares['demo'], [1.0, 86 / 103, 1.0, 106 / 113], atol=0.02)
  assert np.all(shares['demo'] >= shares['official']), shares


def test_two_touching_radius_10_discs_are_split():
  shape = (64, 72)
  rows, cols = np.indices(shape)
  d_left = (rows - 32) ** 2 + (cols - 25) ** 2
  d_right = (rows - 32) ** 2 + (cols - 45) ** 2
  label = np.where((d_left <= 100) & (d_left <= d_right), 3, 0)
  label = np.where((d_right <= 100) & (d_right < d_left), 8, label).astype(np.int32)
  assert label[32, 35] == 3 and label[32, 36] == 8  # They touch.
  inst_map, info = postprocess.process(pred_map_from_labels(label), 5)
  ids = np.unique(inst_map)[1:]
  assert len(ids) == 2 and len(info) == 2
  for gt in (3, 8):
    assert max(iou(inst_map == i, label == gt) for i in ids) > 0.95


def test_exact_maps_of_random_labels_recover_at_least_95_percent():
  rng = np.random.default_rng(1234)
  matched = total = 0
  for _ in range(3):
    label = random_labels(rng)
    inst_map = postprocess.separate_instances(*np.moveaxis(pred_map_from_labels(label)[..., 1:], -1, 0))
    # Pairwise intersections via one contingency table.
    t_ids, t_inv = np.unique(label, return_inverse=True)
    p_ids, p_inv = np.unique(inst_map, return_inverse=True)
    table = np.bincount(t_inv.ravel() * len(p_ids) + p_inv.ravel(),
                        minlength=len(t_ids) * len(p_ids)).reshape(len(t_ids), len(p_ids))
    t_area, p_area = table.sum(1), table.sum(0)
    for i in range(1, len(t_ids)):
      if t_area[i] < 30:
        continue
      total += 1
      ious = table[i, 1:] / (t_area[i] + p_area[1:] - table[i, 1:])
      matched += bool(len(ious) and ious.max() > 0.9)
  assert total > 150
  assert matched / total >= 0.95, (matched, total)


def test_instance_info_type_vote_centroid_bbox_with_non_contiguous_ids():
  inst = np.zeros((30, 40), np.int32)
  tp = np.zeros((30, 40), np.int64)
  inst[2:6, 3:8] = 7  # 20 px: tp {0: 10, 2: 5, 3: 5} -> background yields, tie 2/3 -> 2.
  tp[2:6, 3:8].flat[:] = [0] * 10 + [3] * 5 + [2] * 5
  inst[10:14, 20:25] = 3  # 20 px: {0: 6, 1: 7, 3: 7} -> tie 1/3 -> 1.
  tp[10:14, 20:25].flat[:] = [3] * 7 + [0] * 6 + [1] * 7
  inst[20:24, 30:35] = 12  # 20 px, all background -> type 0.
  inst[20:25, 2:6] = 40  # 20 px: {4: 12, 0: 8} -> 4.
  tp[20:25, 2:6].flat[:] = [4] * 12 + [0] * 8
  info = postprocess.instance_info(inst, tp)
  assert list(info) == [3, 7, 12, 40]
  assert [info[i]['type'] for i in (7, 3, 12, 40)] == [2, 1, 0, 4]
  assert info[7]['type_prob'] == pytest.approx(5 / (20 + 1e-6), rel=1e-12)
  assert info[3]['type_prob'] == pytest.approx(7 / (20 + 1e-6), rel=1e-12)
  assert info[12]['type_prob'] == pytest.approx(20 / (20 + 1e-6), rel=1e-12)
  assert info[40]['type_prob'] == pytest.approx(12 / (20 + 1e-6), rel=1e-12)
  np.testing.assert_array_equal(info[7]['bbox'], [[2, 3], [6, 8]])  # [[rmin, cmin], [rmax, cmax]].
  np.testing.assert_allclose(info[7]['centroid'], [5.0, 3.5])  # (x, y).
  np.testing.assert_allclose(info[40]['centroid'], [3.5, 22.0])
  assert info[7]['contour'].shape[1] == 2 and info[7]['contour'][:, 0].min() == 3


def test_instance_with_fewer_than_3_contour_points_stays_in_map_only():
  inst = np.zeros((20, 20), np.int32)
  inst[5, 2:12] = 4  # A 1-px line: CHAIN_APPROX_SIMPLE gives 2 contour points.
  inst[10:15, 10:15] = 6
  info = postprocess.instance_info(inst, np.ones_like(inst))
  assert list(info) == [6]


def test_process_recovers_types_and_centroids_of_exact_maps():
  shape = (80, 80)
  label = np.zeros(shape, np.int32)
  types = {5: 1, 9: 2, 2: 4}
  for (cy, cx), i in zip([(20, 20), (20, 55), (58, 40)], types):
    label[disc(shape, (cy, cx), 9)] = i
  type_map = np.vectorize(lambda i: types.get(i, 0))(label)
  type_map[18:22, 18:30] = 3  # A minority of the first nucleus has another type.
  inst_map, info = postprocess.process(pred_map_from_labels(label, type_map), 5)
  assert len(info) == 3
  for gt_id, gt_type in types.items():
    (pred_id,) = np.unique(inst_map[label == gt_id])
    np.testing.assert_array_equal(inst_map == pred_id, label == gt_id)
    assert info[pred_id]['type'] == gt_type
    rows, cols = np.nonzero(label == gt_id)
    np.testing.assert_allclose(info[pred_id]['centroid'], [cols.mean(), rows.mean()], atol=1e-9)
  record = postprocess.to_record(inst_map, info)
  assert record['inst_map'].dtype == np.int32 and record['inst_centroid'].shape == (3, 2)
  np.testing.assert_array_equal(record['inst_uid'], sorted(info))
  np.testing.assert_array_equal(record['inst_type'], [info[i]['type'] for i in sorted(info)])


def test_empty_prediction_gives_empty_outputs():
  inst_map, info = postprocess.process(np.zeros((32, 32, 4), np.float32), 5)
  assert inst_map.shape == (32, 32) and inst_map.max() == 0 and info == {}
  record = postprocess.to_record(inst_map, info)
  assert record['inst_type'].shape == (0,) and record['inst_centroid'].shape == (0, 2)


@pytest.mark.parametrize('bad, match', [
    (np.zeros((8, 8, 3), np.float32), r'\[H, W, 4\]'),
    (np.full((8, 8, 4), 5, np.float32), 'integer type ids'),
    (np.full((8, 8, 4), 0.5, np.float32), 'integer type ids'),
    (np.full((8, 8, 4), np.nan, np.float32), 'non-finite'),
])
def test_process_rejects_bad_input(bad, match):
  with pytest.raises(ValueError, match=match):
    postprocess.process(bad, 5)
