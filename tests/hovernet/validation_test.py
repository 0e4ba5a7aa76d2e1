"""Validation during HoVer-Net training: the inference step compiles once however often validation
runs. Two processes (each predicting its share, process 0 scoring all) against one:
tests/stages/hovernet_train_processes_test.py, through the training stage."""

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from tfds_builders.demo_nuclei import generate as demo_tiles
from diffmix_jax.hovernet import infer as hovernet_infer
from diffmix_jax.hovernet import validation as hovernet_validation
from diffmix_jax.hovernet import model as hovernet

MODEL = dict(mode='fast', nr_types=5, width=16, encoder_units=(1, 1, 1, 1), decoder_units=(1, 1))


def setup():
  """(module, variables, 3 demo test tiles, config.eval): random weights whose NP head is biased
  to nuclei, so the post-processing finds instances and the metrics are not all zero."""
  module = hovernet.HoVerNet(**MODEL)
  v = jax.device_get(module.init(jax.random.key(3), jnp.zeros((1, 256, 256, 3))))
  flat = traverse_util.flatten_dict(v['params'])
  flat[('decoder', 'np', 'u0', 'conv', 'bias')] = np.array([-1.0, 1.0], np.float32)
  variables = {'params': traverse_util.unflatten_dict(flat), 'batch_stats': v['batch_stats']}
  tiles = []
  for i in range(3):
    image, inst, types = demo_tiles.make_tile(0, 'test', i)
    tiles.append({'name': f'test_{i}', 'image': image, 'inst_map': inst, 'type_map': types})
  return module, variables, tiles, tiny.get_config().eval


def test_validation_scores_the_tiles_and_compiles_once(tmp_path):
  """The metrics of the three tiles and the overlay of the first (image | truth | prediction); a
  second validation (the next epoch) reuses the jitted step."""
  module, variables, tiles, eval_config = setup()
  one, picture = hovernet_validation.validate(module, variables, tiles, 8, eval_config, tmp_path)
  assert sorted(one) == ['val_acc', 'val_aji', 'val_dice', 'val_f_d', 'val_pq']
  assert one['val_dice'] > 0 and all(0 <= v <= 1 for v in one.values())
  assert picture.shape == (256, 3 * 256, 3)
  np.testing.assert_array_equal(picture[:, :256], tiles[0]['image'])
  hovernet_validation.validate(module, variables, tiles, 8, eval_config, tmp_path)
  assert hovernet_infer._jitted_infer_step(  # pylint: disable=protected-access
      module, hovernet_infer.local_mesh())._cache_size() == 1
