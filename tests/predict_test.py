"""Tests of `python -m diffmix_jax.predict`: outputs consistent with each other and with `evaluate`,
the three model sources, reruns, and bad input among good."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import cv2
from flax import serialization
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import io as sio

from conftest import HANG_TIMEOUT
from configs import common
from configs import tiny
from diffmix_jax.core import checkpoint
from diffmix_jax import workdir as wdir
from diffmix_jax import convert_torch
from diffmix_jax.data import demo as demo_data
from diffmix_jax.metrics import postprocess
from diffmix_jax.metrics import records
from diffmix_jax import predict
from diffmix_jax.hovernet import model as hovernet

REPO = pathlib.Path(__file__).resolve().parents[1]
FIELDS = {'mode': 'fast', 'nr_types': 5, 'width': 16, 'encoder_units': (1, 1, 1, 1),
          'decoder_units': (1, 1), 'split_grouped_convs': True, 'head_init': 'kaiming'}


def _variables(module, seed=3):
  """Random weights whose NP head is biased to nuclei, so the post-processing finds instances."""
  v = module.init(jax.random.key(seed), jnp.zeros((1, 256, 256, 3)))
  flat = traverse_util.flatten_dict(jax.device_get(v['params']))
  flat[('decoder', 'np', 'u0', 'conv', 'bias')] = np.array([-1.0, 1.0], np.float32)
  return {'params': traverse_util.unflatten_dict(flat), 'batch_stats': v['batch_stats']}


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
  """One model as a `main` workdir and as a converted folder; 3 exported demo test tiles (the
  first as .TIF) and, with DIFFMIX_CONSEP_DIR, a 300x260 crop of a real CoNSeP test tile."""
  root = tmp_path_factory.mktemp('predict')
  module = hovernet.create_hovernet(**predict._model_config(FIELDS))  # pylint: disable=protected-access
  variables = _variables(module)
  config = tiny.get_config()
  config.hovernet.model.update(FIELDS)
  config.eval.postprocess = common.base_config().eval.postprocess  # As a converted model has.
  (root / 'work' / 'hovernet_baseline').mkdir(parents=True)
  (root / 'work' / 'config.json').write_text(config.to_json_best_effort())
  (root / 'work' / 'hovernet_baseline' / wdir.HOVERNET_VARIABLES).write_bytes(
      serialization.to_bytes(variables))
  checkpoint.save_tree(str(root / 'model' / convert_torch.HOVERNET_VARIABLES), variables)
  (root / 'model' / convert_torch.HOVERNET_CONFIG).write_text(
      json.dumps(convert_torch.hovernet_model_fields(module)))
  demo_data.export(str(root / 'demo'))
  images = root / 'images'
  images.mkdir()
  for name in ('test_2', 'test_3'):
    shutil.copy(root / 'demo' / 'Images' / f'{name}.png', images / f'{name}.png')
  cv2.imwrite(str(images / 'test_1.TIF'), cv2.imread(str(root / 'demo' / 'Images' / 'test_1.png')))
  consep = os.environ.get('DIFFMIX_CONSEP_DIR')
  if consep and os.path.isdir(os.path.join(consep, 'Test', 'Images')):
    real = cv2.imread(os.path.join(consep, 'Test', 'Images', 'test_1.png'))
    cv2.imwrite(str(images / 'consep_crop.png'), real[100:400, 200:460])
  return root


def _run(source, images, out):
  model = predict.load_model(**source)
  table = predict.class_table(model.module.nr_types, model.class_names)
  return model, predict.predict_folder(model, str(images), str(out), table)


def test_outputs_agree_with_each_other_and_evaluate_reads_them(sources):
  model, errors = _run({'workdir': str(sources / 'work'), 'run': 'baseline'}, sources / 'images',
                       sources / 'out_work')
  assert errors == [] and model.class_names[1] == 'other'
  out, names = sources / 'out_work', sorted(p.stem for p in (sources / 'images').iterdir())
  found = 0
  for name in names:
    image = predict.read_image(next((sources / 'images').glob(f'{name}.*')))
    mat = sio.loadmat(out / 'mat' / f'{name}.mat')
    nuc = json.loads((out / 'json' / f'{name}.json').read_text())
    geo = json.loads((out / 'qupath' / f'{name}.geojson').read_text())
    assert mat['inst_map'].shape == image.shape[:2] and nuc['mag'] is None
    uids = mat['inst_uid'].ravel().tolist()
    assert [int(k) for k in nuc['nuc']] == uids == [int(f['id']) for f in geo['features']]
    found += len(uids)
    for row, uid in enumerate(uids):
      n, f = nuc['nuc'][str(uid)], geo['features'][row]
      (rmin, cmin), (rmax, cmax) = n['bbox']
      rows, cols = np.nonzero(mat['inst_map'] == uid)
      assert (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1) == (rmin, cmin, rmax, cmax)
      np.testing.assert_allclose(n['centroid'], [cols.mean(), rows.mean()], atol=1e-6)
      np.testing.assert_allclose(mat['inst_centroid'][row], n['centroid'])
      assert mat['inst_type'][row, 0] == n['type']
      # type_prob is the share of this nucleus's own pixels voting for its type: k / (area + 1e-6)
      # for a whole number 1 <= k <= area (the nucleus's area, counted here from inst_map).
      area = rows.size
      votes = n['type_prob'] * (area + 1e-6)
      assert abs(votes - round(votes)) < 1e-6 and 1 <= round(votes) <= area, (uid, area, votes)
      ring = f['geometry']['coordinates'][0]
      assert ring[0] == ring[-1] and ring[:-1] == n['contour']
      assert f['properties']['objectType'] == 'detection'
      assert f['properties']['classification']['name'] == model.class_names[n['type']]
      x, y = n['contour'][0]
      assert mat['inst_map'][y, x] == uid  # Contours run on the nucleus' own border pixels.
    overlay = cv2.imread(str(out / 'overlay' / f'{name}.png'))[..., ::-1]
    assert overlay.shape == image.shape
    if uids:  # The first contour pixel carries its class colour.
      x, y = nuc['nuc'][str(uids[0])]['contour'][0]
      colour = geo['features'][0]['properties']['classification']['color']
      assert overlay[y, x].tolist() == colour
  assert found > 20
  # evaluate reads mat/ as a prediction folder (truth: the exported demo labels, same names).
  truth = sources / 'truth'
  truth.mkdir()
  for name in ('test_1', 'test_2', 'test_3'):
    lab = sio.loadmat(sources / 'demo' / 'Labels' / f'{name}.mat')
    records.save_mat(truth / f'{name}.mat', records.label_record(lab['inst_map'],
                                                                        lab['type_map']))
  pred = sources / 'pred_demo'
  pred.mkdir()
  for name in ('test_1', 'test_2', 'test_3'):
    shutil.copy(out / 'mat' / f'{name}.mat', pred / f'{name}.mat')
  metrics = records.evaluate_dirs(truth, pred)
  assert metrics['num_images'] == 3 and metrics['num_pred'] == sum(
      len(json.loads((out / 'json' / f'{n}.json').read_text())['nuc'])
      for n in ('test_1', 'test_2', 'test_3'))


def test_sources_agree_rerun_skips_and_another_model_redoes(sources):
  _run({'model_dir': str(sources / 'model')}, sources / 'images', sources / 'out_dir')
  a, b = sources / 'out_work', sources / 'out_dir'
  if not a.exists():
    _run({'workdir': str(sources / 'work')}, sources / 'images', a)
  for name in ('test_1', 'test_2', 'test_3'):
    np.testing.assert_array_equal(sio.loadmat(a / 'mat' / f'{name}.mat')['inst_map'],
                                  sio.loadmat(b / 'mat' / f'{name}.mat')['inst_map'])
    assert (a / 'json' / f'{name}.json').read_text() == (b / 'json' / f'{name}.json').read_text()
  stamp = lambda: {p: p.stat().st_mtime_ns for p in b.rglob('*') if p.is_file()}
  before = stamp()
  _, errors = _run({'model_dir': str(sources / 'model')}, sources / 'images', b)
  assert errors == [] and stamp() == before  # Same model: every tile skipped.
  other = sources / 'model2'
  shutil.copytree(sources / 'model', other)
  module = hovernet.create_hovernet(**predict._model_config(FIELDS))  # pylint: disable=protected-access
  checkpoint.save_tree(str(other / convert_torch.HOVERNET_VARIABLES), _variables(module, 4))
  _run({'model_dir': str(other)}, sources / 'images', b)
  after = stamp()
  assert all(after[p] != before[p] for p in before if p.parent.name == 'fingerprint')
  # A workdir's own post-processing values (configs/demo.py halves the kernels) come with its model
  # and change the fingerprint: outputs of other values are redone.
  work = predict.load_model(workdir=str(sources / 'work'))
  assert work.postprocess == postprocess.OFFICIAL
  halved = sources / 'work_halved'
  shutil.copytree(sources / 'work', halved)
  config = json.loads((halved / 'config.json').read_text())
  config['eval']['postprocess'].update(sobel_ksize=11, marker_open=3, min_area=5)
  (halved / 'config.json').write_text(json.dumps(config))
  model = predict.load_model(workdir=str(halved))
  assert model.postprocess == postprocess.Params(sobel_ksize=11, marker_open=3, min_area=5)
  assert model.fingerprint() != work.fingerprint()


def test_bad_files_are_named_and_the_rest_predicted(sources, tmp_path):
  images = tmp_path / 'images'
  images.mkdir()
  good = cv2.imread(str(sources / 'demo' / 'Images' / 'test_2.png'))
  cv2.imwrite(str(images / 'rgba.png'), np.concatenate([good, good[..., :1]], axis=-1))
  cv2.imwrite(str(images / 'gray.png'), good[..., 0])
  cv2.imwrite(str(images / 'deep.png'), good.astype(np.uint16) * 256)
  (images / 'broken.jpg').write_bytes(b'not a jpeg')
  (images / 'notes.txt').write_text('ignored: not an image suffix')
  out = tmp_path / 'out'
  env = dict(os.environ, PYTHONPATH=str(REPO))
  done = subprocess.run(
      [sys.executable, '-m', 'diffmix_jax.predict', f'--model_dir={sources / "model"}',
       f'--images={images}', f'--out={out}', '--class_names=bg,a,b,c,d'],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=HANG_TIMEOUT)
  assert done.returncode == 1, done.stderr[-3000:]
  for name, why in (('gray.png', 'grayscale'), ('deep.png', 'uint16 pixels (16-bit)'),
                    ('broken.jpg', 'not a readable image')):
    assert f'{images / name}: {why}' in done.stderr
  assert sorted(p.name for p in (out / 'mat').iterdir()) == ['rgba.mat']
  geo = json.loads((out / 'qupath' / 'rgba.geojson').read_text())
  assert {f['properties']['classification']['name'] for f in geo['features']} <= set('abcd')


def test_input_and_class_table_errors(tmp_path):
  (tmp_path / 'a.png').write_bytes(b'')
  (tmp_path / 'a.jpg').write_bytes(b'')
  with pytest.raises(ValueError, match=r"a\.jpg and .*a\.png share the name 'a'"):
    predict.list_images(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='no such folder'):
    predict.list_images(str(tmp_path / 'none'))
  info = tmp_path / 'type_info.json'
  info.write_text(json.dumps({'0': ['nolabe', [0, 0, 0]], '1': ['neo', [255, 0, 0]],
                              '2': ['inflam', [0, 255, 0]]}))
  assert predict.class_table(3, type_info=str(info))[2] == ('inflam', (0, 255, 0))
  with pytest.raises(ValueError, match=r'type_info.json: no entry for type id\(s\) \[3\]'):
    predict.class_table(4, type_info=str(info))
  with pytest.raises(ValueError, match='--class_names=.*expected 5'):
    predict.class_table(5, class_names='a,b')
  assert [n for n, _ in predict.class_table(3)] == ['background', 'type_1', 'type_2']
  with pytest.raises(ValueError, match='exactly one model source'):
    predict.load_model(workdir='w', model_dir='m')
  with pytest.raises(FileNotFoundError, match='config.json: missing'):
    predict.load_model(workdir=str(tmp_path))


def test_official_checkpoint_source_equals_its_conversion(tmp_path):
  """A full-size fast-mode state dict (the specs' TSV keys and shapes, random values) as an
  official `.tar`: converted on the fly it equals `convert_torch --model hovernet`'s folder."""
  torch = pytest.importorskip('torch')
  tsv = REPO.parent / 'shared' / 'specs' / 'data' / 'hovernet_state_dict_fast.tsv'
  if not tsv.exists():
    pytest.skip(f'{tsv} is not here')
  rng = np.random.default_rng(0)
  sd = {}
  for row in tsv.read_text().splitlines()[1:]:
    key, shape = row.split('\t')
    shape = tuple(json.loads(shape))
    sd[key] = (np.ones(shape, np.int64) if key.endswith('num_batches_tracked') else
               rng.uniform(0.5, 1.5, shape).astype(np.float32))
  path = tmp_path / 'hovernet_fast.tar'
  torch.save({'desc': {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
  model = predict.load_model(checkpoint=str(path))
  assert model.model_config['mode'] == 'fast' and model.model_config['nr_types'] == 5
  assert model.model_config['width'] == 1 and model.model_config['encoder_units'] == [3, 4, 6, 3]
  config = tiny.get_config()
  config.hovernet.model.update(mode='fast', nr_types=5)
  convert_torch.convert('hovernet', config, str(path), str(tmp_path / 'converted'))
  again = predict.load_model(model_dir=str(tmp_path / 'converted'))
  assert again.model_config == model.model_config
  assert again.fingerprint() == model.fingerprint()
