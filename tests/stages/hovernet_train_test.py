"""Tests of HoVer-Net phase 1, the encoder file, the training and evaluate stages (docs/hovernet.md §3)."""

import json

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import io as sio

from configs import tiny
from conftest import file_snapshot
from conftest import rescore_from_files
from diffmix_jax import workdir as wdir
from diffmix_jax.hovernet import torch_import as convert_hovernet
from tfds_builders.demo_nuclei import generate as demo_tiles
from diffmix_jax.stages import evaluate
from diffmix_jax.metrics import records
from diffmix_jax.hovernet import patches as hovernet_data
from diffmix_jax.hovernet import infer as hovernet_infer
from diffmix_jax.hovernet import losses as hovernet_losses
from diffmix_jax.hovernet import targets as hovernet_targets
from diffmix_jax.stages import hovernet_train
from diffmix_jax.hovernet import training as hovernet_training
from diffmix_jax.data import input_pipeline
from diffmix_jax.core import sharding
from diffmix_jax.core import loop as loop_lib
from diffmix_jax.core import writers
from diffmix_jax.hovernet import model as hovernet


def _tiny_config(**train):
  c = tiny.get_config()
  c.mesh.data = 2
  c.hovernet.model.width = 16
  c.hovernet.model.encoder_units = (1, 1, 1, 1)
  h = c.hovernet.train
  h.runs = ('baseline',)
  h.phase1_batch_size = h.phase2_batch_size = 2
  h.patch_step = 164  # 4 windows per 256-px demo tile.
  h.phase1_epochs = 1  # Both phases (configs/tiny.py trains phase 2 only).
  for k, v in train.items():
    h[k] = v
  c.eval.batch_size = 8
  return c


def _encoder_file(config, path, seed=0) -> dict:
  """An ImageNet-style encoder file at the config's width: conv0, d0-d3 with the PyTorch names,
  random values (BN variances positive), as `.npz`; returns its state dict."""
  abstract = hovernet.abstract_variables(hovernet.create_hovernet(**config.hovernet.model))
  rng = np.random.default_rng(seed)
  values = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), abstract)
  sd = convert_hovernet.state_dict_from_variables(values, with_buffers=False)
  sd = {k: v for k, v in sd.items() if k.split('.')[0] in convert_hovernet.ENCODER_MODULES}
  np.savez(path, **sd)
  return sd


def _crops(tile, size):
  """Two size-px label crops of a tile with their images, ids renumbered 1..n."""
  out = []
  for r, c in ((0, 0), (100, 60)):
    inst = tile['inst_map'][r:r + size, c:c + size]
    _, inst = np.unique(inst, return_inverse=True)
    out.append({'image': tile['image'][r:r + size, c:c + size], 'type_map':
                tile['type_map'][r:r + size, c:c + size], 'inst_map': inst.reshape(size, size)})
  return out


def _synthetic_patches(tile, folder, size):
  """A synthetic set in the sample stage's CoNSeP layout: crops of a real tile named syn_<k>."""
  import cv2  # pylint: disable=g-import-not-at-top
  (folder / 'Images').mkdir(parents=True)
  (folder / 'Labels').mkdir()
  for k, p in enumerate(_crops(tile, size)):
    cv2.imwrite(str(folder / 'Images' / f'syn_{k}.png'), p['image'][..., ::-1])
    sio.savemat(folder / 'Labels' / f'syn_{k}.mat', {'inst_map': p['inst_map'].astype(np.int32),
                                                     'type_map': p['type_map'].astype(np.int32)})


def _tiles(n, split='train'):
  out = []
  for i in range(n):
    image, inst, types = demo_tiles.make_tile(0, split, i)
    out.append({'name': f'{split}_{i}', 'image': image, 'inst_map': inst, 'type_map': types})
  return out


def _batch(module, n=2, seed=0):
  size, out = module.patch_shapes
  tile = _tiles(1)[0]
  patches = hovernet_data.PatchSet([tile], size, out)
  rng = np.random.default_rng(seed)
  exs = [hovernet_data.make_example(patches[i], rng, size, out, True) for i in range(n)]
  return {k: np.stack([e[k] for e in exs]) for k in exs[0]}


@pytest.mark.slow
def test_phase1_is_a_gradient_path_rule():
  module = hovernet.HoVerNet(mode='fast', nr_types=5, encoder_units=(2, 1, 1, 1),
                             decoder_units=(1, 1), width=16)
  batch = _batch(module, n=1)
  variables = loop_lib.jit_init(module.init)(jax.random.key(0), jnp.zeros((1, 256, 256, 3)))

  def grads(params, freeze: bool):
    def loss(p):
      out, _ = module.apply({'params': p, 'batch_stats': variables['batch_stats']},
                            jnp.asarray(batch['image'], jnp.float32), train=True, freeze=freeze,
                            mutable=['batch_stats'])
      return hovernet_losses.compute_losses(out, batch, 5, 1.0)['loss']
    return jax.grad(loss)(params)

  g1 = jax.jit(lambda p: grads(p, True))(variables['params'])
  for path, g in jax.tree_util.tree_flatten_with_path(g1)[0]:
    names = [k.key for k in path]
    if hovernet.is_frozen_in_phase1(names):
      assert not np.any(np.asarray(g)), names  # stop_gradient alone, no optimizer mask.
    else:
      assert np.any(np.asarray(g)), names  # conv0, d0 shortcut/blk_bna, conv_bot, decoders.


def test_step_lr_per_phase_and_adam_direction_equal_optax_adam():
  """StepLR per phase (§3.2: lr for lr_step_epochs epochs of that phase, then lr * gamma) and the
  step's `-lr * ADAM` update, which must equal optax.adam(lr) bit for bit over a few steps."""
  config = _tiny_config(lr=1e-3, lr_step_epochs=2, lr_gamma=0.1)
  trainer = hovernet_training.create_trainer(config, sharding.create_mesh(config.mesh), (3, 5))
  assert [trainer.lr(0, k) for k in (0, 5, 6, 40)] == [np.float32(v) for v in
                                                       (1e-3, 1e-3, 1e-4, 1e-4)]
  assert [trainer.lr(1, k) for k in (0, 9, 10)] == [np.float32(v) for v in (1e-3, 1e-3, 1e-4)]
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.standard_normal((4, 3)), jnp.float32), 'b': jnp.zeros(3)}
  ref_tx = optax.adam(1e-3, b1=0.9, b2=0.999, eps=1e-8)
  ref, ref_state = params, ref_tx.init(params)
  ours, our_state = params, hovernet_training.ADAM.init(params)
  lr = trainer.lr(0, 0)
  for k in range(3):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    upd, ref_state = ref_tx.update(grads, ref_state, ref)
    ref = optax.apply_updates(ref, upd)
    upd, our_state = hovernet_training.ADAM.update(grads, our_state, ours)
    ours = optax.apply_updates(ours, jax.tree.map(lambda u: -lr * u, upd))
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(ours)):
      np.testing.assert_array_equal(a, b, err_msg=f'step {k}')


@pytest.mark.slow
@pytest.mark.parametrize('freeze_bn_stats', [True, False])
def test_phase1_step_leaves_frozen_encoder_unchanged(freeze_bn_stats, tmp_path):
  """Acceptance 4. With phase1_freeze_bn_stats (True) every frozen encoder parameter and BN
  statistic is bit-identical after a step; by default (the reference, docs/differences.md §2.1) the frozen layers'
  BatchNorms stay in training mode and their running statistics move, parameters do not."""
  config = _tiny_config(phase1_freeze_bn_stats=freeze_bn_stats)
  # The reference Kaiming heads: zero heads would pass no gradient upstream on this first step.
  config.hovernet.model.head_init = 'kaiming'
  mesh = sharding.create_mesh(config.mesh)
  trainer = hovernet_training.create_trainer(config, mesh, (2, 2))
  # Phase 1 starts from an ImageNet-style encoder file, generated here at this width.
  encoder = _encoder_file(config, tmp_path / 'encoder.npz')
  state = hovernet_training.load_pretrained(trainer, trainer.init(jax.random.key(0)),
                                         str(tmp_path / 'encoder.npz'))
  before = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  for (collection, *path), value in traverse_util.flatten_dict(before).items():
    if path[0] in convert_hovernet.ENCODER_MODULES:  # Loaded: the file's tensors, Flax layout.
      want = encoder[convert_hovernet.torch_key(collection, tuple(path))]
      np.testing.assert_array_equal(value, want.transpose(2, 3, 1, 0) if want.ndim == 4 else want)
  bias = before['params']['decoder']['hv']['u0']['conv']['bias']
  assert np.all(np.abs(bias) <= 0.125) and np.any(bias != 0)  # PyTorch default U(+-1/8), §1.4.
  state, metrics = trainer.steps[0](state, sharding.global_batch(_batch(trainer.module), mesh),
                                    trainer.lr(0, 0))
  after = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  assert np.isfinite(float(metrics['loss']))
  for collection in ('params', 'batch_stats'):
    for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(before[collection])[0],
                                jax.tree.leaves(after[collection])):
      names = [k.key for k in path]
      if hovernet.is_frozen_in_phase1(names):
        if collection == 'params' or freeze_bn_stats:
          np.testing.assert_array_equal(old, new, err_msg=str(names))
        else:
          assert not np.array_equal(old, new), names
      elif names[0] == 'decoder' or collection == 'params':
        assert not np.array_equal(old, new), names  # Decoders, conv0, d0 shortcut/blk_bna move.
  # Phase 2 starts from these weights with a fresh Adam (official `pretrained: -1`, §3.2): the
  # reset keeps every weight and statistic and zeroes the moments and the step count.
  assert int(jax.device_get(state.opt_state.count)) == 1
  fresh = trainer.reset_optimizer(state)
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(
      jax.device_get({'params': fresh.params, 'batch_stats': fresh.batch_stats}))):
    np.testing.assert_array_equal(a, b)
  adam = jax.device_get(fresh.opt_state)
  assert int(adam.count) == 0
  assert not any(np.any(x) for x in jax.tree.leaves((adam.mu, adam.nu)))


@pytest.mark.slow
@pytest.mark.e2e
def test_stages_train_resume_evaluate_and_rerun_as_no_ops(tmp_path, monkeypatch):
  """hovernet_train.run then evaluate.run on one demo tile: files, metrics JSON, DONE, no-op reruns;
  then a run killed after the phase-1 checkpoint (step 2 of 4) resumes to bit-identical weights."""
  config = _tiny_config(augment=True, phase1_freeze_bn_stats=True, log_every_steps=1, val_tiles=1)
  _encoder_file(config, tmp_path / 'encoder.npz')  # Phase 1 from an ImageNet-style encoder file.
  config.hovernet.train.pretrained = str(tmp_path / 'encoder.npz')
  tiles = _tiles(1)
  monkeypatch.setattr(input_pipeline, 'load_split', lambda c, w, split: tiles)
  workdir = str(tmp_path)
  hovernet_train.run(config, workdir)
  out = tmp_path / 'hovernet_baseline'
  assert json.loads((out / 'DONE').read_text()) == {
      'arm': 'baseline', 'seed': 0, 'steps': 4, 'real_windows': 4, 'synthetic_items': 0,
      'synthetic_per_batch': [0, 0]}
  assert (out / wdir.HOVERNET_VARIABLES).exists() and (out / 'checkpoints').is_dir()
  assert list((out / 'tb').iterdir())
  _synthetic_patches(tiles[0], tmp_path / 'synthetic' / 'consep_format', size=48)
  evaluate.run(config, workdir)
  metrics = json.loads((tmp_path / 'eval' / 'baseline.json').read_text())
  want = rescore_from_files(tmp_path / 'eval' / 'baseline')  # NumPy, from the saved .mat files.
  assert metrics['dice'] == pytest.approx(want['dice'], abs=1e-12)
  assert [metrics[k] for k in ('num_images', 'num_true', 'num_pred')] == [
      1, want['num_true'], want['num_pred']]
  assert want['num_true'] == len(np.unique(tiles[0]['inst_map'])) - 1  # The whole tile, scored.
  # The baseline model on each synthetic patch (its own 48 px, padded as tiles are), own labels.
  fidelity = json.loads((tmp_path / 'eval' / 'synthetic_fidelity.json').read_text())
  assert fidelity['num_images'] == 2 and sorted(fidelity['per_image']) == ['syn_0', 'syn_1']
  want = sum(len(np.unique(p['inst_map'])) - 1 for p in _crops(tiles[0], 48))
  assert fidelity['num_true'] == want
  assert (tmp_path / 'eval' / 'baseline' / 'pred' / 'train_0.mat').exists()
  assert (tmp_path / 'eval' / 'DONE').exists()
  before = file_snapshot(tmp_path)
  hovernet_train.run(config, workdir)
  evaluate.run(config, workdir)
  assert file_snapshot(tmp_path) == before  # Both finished: the reruns write nothing at all.
  # Other post-processing values: the run is scored again with them, and they are recorded. Planted
  # stale bytes in the score and a prediction must be replaced by the rescoring.
  assert json.loads((tmp_path / 'eval' / 'postprocess.json').read_text())['marker_open'] == 3
  for stale in (tmp_path / 'eval' / 'baseline.json',
                tmp_path / 'eval' / 'baseline' / 'pred' / 'train_0.mat'):
    stale.write_bytes(b'stale')
  config.eval.postprocess.marker_open = 5
  evaluate.run(config, workdir)
  assert json.loads((tmp_path / 'eval' / 'postprocess.json').read_text())['marker_open'] == 5
  rescored = json.loads((tmp_path / 'eval' / 'baseline.json').read_text())
  assert rescored['dice'] == pytest.approx(
      rescore_from_files(tmp_path / 'eval' / 'baseline')['dice'], abs=1e-12)

  real_progress = writers.create_progress

  def dying_progress(total):
    report = real_progress(total)

    def progress(step):
      report(step)
      if step == 3:
        raise _Interrupt()
    return progress

  killed = tmp_path / 'killed'
  monkeypatch.setattr(writers, 'create_progress', dying_progress)
  with pytest.raises(_Interrupt):
    hovernet_train.run(config, str(killed))
  assert not (killed / 'hovernet_baseline' / 'DONE').exists()
  monkeypatch.setattr(writers, 'create_progress', real_progress)
  hovernet_train.run(config, str(killed))
  read = lambda d: (d / 'hovernet_baseline' / wdir.HOVERNET_VARIABLES).read_bytes()
  assert read(killed) == read(tmp_path)  # Validation does not touch the weights either.

  # A seed added to the finished workdir: only its run trains and is scored; seed 0 is kept.
  config.hovernet.train.seeds = (0, 1)
  kept = {k: v for k, v in file_snapshot(tmp_path).items()
          if k in (out / 'DONE', out / wdir.HOVERNET_VARIABLES, tmp_path / 'eval' / 'baseline.json')}
  hovernet_train.run(config, workdir)
  evaluate.run(config, workdir)
  assert {k: v for k, v in file_snapshot(tmp_path).items() if k in kept} == kept
  assert json.loads((tmp_path / 'hovernet_baseline_s1' / 'DONE').read_text())['seed'] == 1
  assert read(tmp_path) != (tmp_path / 'hovernet_baseline_s1' / wdir.HOVERNET_VARIABLES
                            ).read_bytes()  # Another init, batch order and augmentation.
  assert json.loads((tmp_path / 'eval' / 'baseline_s1.json').read_text())['num_images'] == 1


class _Interrupt(Exception):
  pass


def test_tiled_inference_chain_scores_an_oracle_network():
  """Patches -> (oracle outputs from the truth) -> stitch -> post-processing -> metrics.

  NumPy/OpenCV only, so the same on every machine. Measured (2026-12-06, demo test tile 0, official
  post-processing): Dice 0.9956, 43 of 50 nuclei found (F_d 0.925; the official 5x5 opening loses
  7 small ones), all 43 typed right (acc 1.0). Margins: Dice -0.005, two more nuclei lost; a window
  stitched one pixel off costs more than that Dice (the 4 oracle windows must tile the output)."""
  tile = _tiles(1, 'test')[0]
  module = hovernet.HoVerNet(mode='fast', nr_types=5)
  size, out = module.patch_shapes
  hv = hovernet_targets.hv_map(tile['inst_map'], tile['inst_map'].shape[0])
  truth = np.concatenate([tile['type_map'][..., None].astype(np.float32),
                          (tile['inst_map'] > 0)[..., None].astype(np.float32), hv], axis=-1)
  # The oracle "network" returns the centre of each padded window of the truth map.
  windows = hovernet_infer.tile_patches(truth, size, out)
  border = (size - out) // 2
  oracle = windows[:, border:border + out, border:border + out]
  calls = []

  def predict(patches):
    calls.append(patches.shape)
    return oracle

  record = hovernet_infer.predict_record(predict, module, tile['image'])
  assert calls == [(4, size, size, 3)]
  metrics = records.evaluate_arrays(
      [(records.label_record(tile['inst_map'], tile['type_map']), record)])
  assert metrics['dice'] >= 0.99 and metrics['acc'] == 1.0, metrics
  assert metrics['num_true'] == 50 and 41 <= metrics['num_pred'] <= 50, metrics
  assert metrics['f_d'] >= 2 * 41 / (50 + 41), metrics  # No false positive: F_d 2 n / (50 + n).


OVERFIT_EPOCHS = 75  # 150 steps of batch 2 over the tile's 4 windows.


def overfit_setup():
  """(config, [tile]) of the overfitting test: demo tile test_1, the tiny network, no augmentation."""
  config = _tiny_config(augment=False, phase1_epochs=0, phase2_epochs=OVERFIT_EPOCHS, lr=1e-2,
                        lr_step_epochs=10**6, log_every_steps=50, checkpoint_every_epochs=1000,
                        val_tiles=0, tp_class_weighting='median_frequency')
  config.mesh.data = 1  # One device: faster per step than split over two simulated ones.
  config.hovernet.model.head_init = 'zeros'
  return config, _tiles(2, 'test')[1:]


# Trains and evaluates `overfit_setup()` in its own process (argv: workdir, sys.path entries), so
# that XLA optimises the one training program that runs 150 steps (the suite compiles at level 0).
OVERFIT_WORKER = """
import sys
sys.path[:0] = sys.argv[2:]
import hovernet_train_test as t
from diffmix_jax.data import input_pipeline
from diffmix_jax.stages import evaluate
from diffmix_jax.stages import hovernet_train
config, tiles = t.overfit_setup()
input_pipeline.load_split = lambda c, w, split: tiles
hovernet_train.run(config, sys.argv[1])
evaluate.run(config, sys.argv[1])
"""


@pytest.mark.slow
@pytest.mark.e2e
def test_tiny_hovernet_overfits_a_tile_and_learns_every_type(tmp_path):
  """After overfitting one demo tile that holds every class, `evaluate` on it finds the nuclei and
  types them: at least 45 of 52 nuclei, Dice >= 0.95, every paired nucleus's type right (acc >=
  0.95), F_c >= 0.8 for every class.

  Tile test_1 (10 other, 14 inflammatory, 9 epithelial, 19 spindle nuclei), the tiny network
  (width 16, zero-initialised output convs) at lr 1e-2, batch 2, no augmentation, 150 steps over
  its 4 windows, the demo's class-balanced TP loss (median-frequency weights) and post-processing
  (kernels halved for its small nuclei). Measured (2-core CPU, 2026-12-06, XLA's default
  optimisation): 48 of 52 nuclei, Dice 0.995, acc 1.0, F_c (other / inflammatory / epithelial /
  spindle) 0.95 / 0.88 / 1.0 / 1.0 — the same as 300 steps gave (2026-12-04). With the official
  post-processing a 300-step model found 41 of 52 (0.95 / 0.60 / 1.0 / 0.94): the official 5x5
  opening erases the markers of small inflammatory nuclei lying on epithelial ones, so the
  watershed merges them. With the official unweighted TP loss the same 150 steps leave the rare
  types untyped: this test fails on it (see the issue-34 note).
  """
  from conftest import HANG_TIMEOUT  # pylint: disable=g-import-not-at-top
  from conftest import xla_flags  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  _, tiles = overfit_setup()
  counts = np.bincount([np.bincount(tiles[0]['type_map'][tiles[0]['inst_map'] == i]).argmax()
                        for i in range(1, tiles[0]['inst_map'].max() + 1)], minlength=5)
  assert counts[1] >= 5 and counts[2:].min() >= 5, counts  # Every class, >= 5 rare nuclei.
  here = pathlib.Path(__file__).parent
  out = subprocess.run(
      [sys.executable, '-c', OVERFIT_WORKER, str(tmp_path), str(here), str(here.parent)],
      cwd=here.parents[1], capture_output=True, text=True, timeout=HANG_TIMEOUT,
      env=dict(os.environ, XLA_FLAGS=xla_flags(1, optimize=True)))
  assert out.returncode == 0, out.stderr[-3000:]
  metrics = json.loads((tmp_path / 'eval' / 'baseline.json').read_text())
  # Measured 48 of 52 found, Dice 0.995, F_c >= 0.88 (docstring). Margins: 3 nuclei (45 of 52:
  # separated nuclei, not blobs; the official opening's 41 fails), Dice 0.045, F_c 0.08.
  assert metrics['num_true'] == 52 and metrics['num_pred'] >= 45, metrics
  assert metrics['dice'] >= 0.95 and metrics['acc'] >= 0.95, metrics
  f_c = {int(k): v for k, v in metrics['f_c'].items()}
  assert min(f_c[c] for c in range(1, 5)) >= 0.8, f_c
