"""Tests of labels.py against hand-computed small cases."""

import numpy as np
import pytest

from diffmix_jax.data import labels
from tfds_builders import raw_folders


def test_edge_map_touching_instances_border_and_background():
  inst = np.array([
      [1, 1, 2, 2],
      [1, 1, 2, 2],
      [0, 0, 0, 0],
      [0, 3, 0, 0],
  ])
  # Hand-computed: a pixel is an edge when any existing 4-neighbour differs. The image border itself
  # is not an edge (pixel (0, 0) has neighbours 1 and 1 only).
  expected = np.array([
      [0, 1, 1, 0],
      [1, 1, 1, 1],
      [1, 1, 1, 1],
      [1, 1, 1, 0],
  ], bool)
  np.testing.assert_array_equal(labels.edge_map(inst), expected)


def test_edge_map_single_instance_filling_the_image_has_no_edges():
  assert not labels.edge_map(np.full((3, 5), 7)).any()


def test_edge_map_batched_equals_per_image():
  rng = np.random.default_rng(0)
  inst = rng.integers(0, 3, (4, 6, 5))
  got = labels.edge_map(inst)
  for b in range(4):
    np.testing.assert_array_equal(got[b], labels.edge_map(inst[b]))


def test_condition_one_hot_with_background_and_edge_channel():
  types = np.array([[0, 3], [3, 4]])
  inst = np.array([[0, 1], [1, 2]])
  y = labels.condition(types, inst, num_classes=5)
  assert y.shape == (2, 2, 6) and y.dtype == np.float32
  one_hot = np.zeros((2, 2, 5), np.float32)
  one_hot[0, 0, 0] = one_hot[0, 1, 3] = one_hot[1, 0, 3] = one_hot[1, 1, 4] = 1
  np.testing.assert_array_equal(y[..., :5], one_hot)
  # Every pixel touches a different id: (0,0) bg next to 1; (0,1) 1 next to 0; (1,0) 1 next to 2;
  # (1,1) 2 next to 1.
  np.testing.assert_array_equal(y[..., 5], np.ones((2, 2)))
  assert labels.condition(types, inst, 5, no_instance=True).shape == (2, 2, 5)


def test_condition_rejects_unknown_class_ids():
  with pytest.raises(ValueError, match=r'0\.\.4; found \[5\]'):
    labels.condition(np.array([[5]]), np.array([[1]]), num_classes=5)


def test_drop_labels_zeroes_whole_condition_of_dropped_samples():
  y = np.ones((3, 2, 2, 6), np.float32)
  out = labels.drop_labels(y, np.array([True, False, True]))
  np.testing.assert_array_equal(out[1], 0)  # Edge channel included.
  np.testing.assert_array_equal(out[[0, 2]], 1)
  assert out.dtype == np.float32


def test_downsample_takes_top_left_pixel_of_each_cell():
  y = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  np.testing.assert_array_equal(labels.downsample(y, 2)[0, ..., 0], [[0, 2], [8, 10]])
  np.testing.assert_array_equal(labels.downsample(y, 4)[0, ..., 0], [[0]])
  np.testing.assert_array_equal(labels.downsample(y, 1), y)
  with pytest.raises(ValueError):
    labels.downsample(y, 3)


def test_consep_merge():
  raw = np.arange(8).reshape(2, 4)
  np.testing.assert_array_equal(raw_folders.merge_classes(raw, 'consep'), [[0, 1, 2, 3], [3, 4, 4, 4]])


def test_glysac_merge():
  raw = np.arange(11)
  np.testing.assert_array_equal(raw_folders.merge_classes(raw, 'glysac'),
                                [0, 1, 1, 3, 2, 2, 2, 2, 3, 1, 1])


def test_merge_rejects_ids_outside_raw_scheme():
  with pytest.raises(ValueError, match=r'0\.\.7; found \[8, 9\]'):
    raw_folders.merge_classes(np.array([1, 8, 9]), 'consep')


def test_one_class_palette_for_every_figure():
  """Training previews, the mixing preview's colormap and the demo preview colour a class alike."""
  # pylint: disable=g-import-not-at-top
  from diffmix_jax.data import demo as demo_data
  from tfds_builders.demo_nuclei import generate as demo_tiles
  from diffmix_jax.stages import mix_labels
  ids = np.arange(5)
  want = np.array([[0, 0, 0], [255, 200, 0], [220, 30, 30], [30, 120, 255], [40, 200, 80]])
  np.testing.assert_array_equal(labels.colour_labels(ids[None])[0], want)
  cmap = mix_labels._class_cmap(5)  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.round([np.array(cmap(k)[:3]) * 255 for k in ids]), want)
  image, inst, types = demo_tiles.make_tile(demo_tiles.SEED, 'test', 0, size=64)
  label_row = demo_data.preview([(image, inst, types)])[64:]
  interior = (types > 0) & ~labels.edge_map(inst)
  np.testing.assert_array_equal(label_row[interior], want[types[interior]])
  assert labels.class_colours(np.array([7, 10])).tolist() == [[0, 200, 200], [150, 150, 150]]
