"""Tests of the mix_labels stage: outputs, summary, rerun, determinism, bad input, real CoNSeP (§8)."""

import importlib.util
import json
import math
import sys
import types

import ml_collections
import numpy as np
import pytest
import scipy.io
from skimage import morphology

from configs import common
import diffmix_jax
from diffmix_jax.stages import mix_labels
from diffmix_jax.mixing import files as mixed_files
from diffmix_jax.mixing import balancing
from diffmix_jax.mixing import enlarging
from diffmix_jax.mixing import tiles as mixing_tiles


def _install_loader(monkeypatch, fn):
  """Points input_pipeline.load_split at `fn` (a stub module while input_pipeline.py is missing)."""
  try:
    if importlib.util.find_spec('diffmix_jax.data.input_pipeline') is None:
      raise ImportError('diffmix_jax.data.input_pipeline does not exist yet')
    from diffmix_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    monkeypatch.setattr(input_pipeline, 'load_split', fn, raising=False)
  except Exception:  # pylint: disable=broad-except
    stub = types.ModuleType('diffmix_jax.data.input_pipeline')
    stub.load_split = fn
    monkeypatch.setitem(sys.modules, 'diffmix_jax.data.input_pipeline', stub)
    monkeypatch.setattr(diffmix_jax, 'input_pipeline', stub, raising=False)


def _synthetic_split(with_rare=True):
  """Four tiles (three 400², one 256²) of jittered disks, classes 1..4; names out of natural order."""
  rng = np.random.default_rng(0)
  out = []
  for name, size in (('train_10', 400), ('train_2', 400), ('train_1', 256), ('train_3', 400)):
    inst, typ = np.zeros((size, size), np.int32), np.zeros((size, size), np.int32)
    k = 0
    for r in range(14, size - 14, 24):
      for c in range(14, size - 14, 24):
        rare = rng.random() < 0.2
        rad = int(rng.integers(2, 5) if rare else rng.integers(5, 9))
        rr, cc = r + int(rng.integers(-3, 4)), c + int(rng.integers(-3, 4))
        d = morphology.disk(rad).astype(bool)
        k += 1
        inst[rr - rad:rr + rad + 1, cc - rad:cc + rad + 1][d] = k
        cls = 1 if rare and with_rare else int(rng.integers(2, 5))
        typ[rr - rad:rr + rad + 1, cc - rad:cc + rad + 1][d] = cls
    out.append(dict(name=name, image=np.zeros((size, size, 3), np.uint8), inst_map=inst,
                    type_map=typ))
  return out


def _config(**mix):
  c = common.base_config()
  c.mix.preview_tiles = 2
  for k, v in mix.items():
    c.mix.balance[k] = v
  return c


def _loader(split_data):
  calls = []

  def load_split(config, workdir, split):
    del config, workdir
    assert split == 'train'
    calls.append(split)
    return [dict(d) for d in split_data]
  return load_split, calls


def _read_all(workdir):
  out = {}
  for kind in mixed_files.KINDS:
    for name in mixed_files.mixed_names(workdir, kind):
      out[(kind, name)] = mixed_files.load_mixed(workdir, kind, name)
  return out


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    for k, v in a[key].items():
      if isinstance(v, dict):
        for kk in v:
          np.testing.assert_array_equal(v[kk], b[key][k][kk])
      else:
        np.testing.assert_array_equal(v, b[key][k])



def _enlarge_cfg(**kw):
  c = ml_collections.ConfigDict(dict(preset='recovered', frame_margin=32, axis_probability=0.3,
                                     shift_low=-15, shift_high=14, collision='overwrite'))
  c.update(kw)
  return c


def test_config_defaults_match_spec():
  """§2.4 and §3.3 parameters, §4.1 grid."""
  c = common.base_config()
  assert mix_labels.balance_params(c.mix.balance) == balancing.BalanceParams(
      (1,), (2, 3, 4), 0.8, 2.3, 2, 30.0, 'overwrite', None)
  assert mix_labels.enlarge_params(c.mix.enlarge, c.sample.patch_size, c.sample.grid_stride) == (
      enlarging.EnlargeParams(32, 0.3, -15, 14, 'overwrite', 256, 76))


def test_author_issue3_preset():
  p = mix_labels.enlarge_params(_enlarge_cfg(preset='author_issue3'), 256, 76)
  assert (p.axis_probability, p.shift_low, p.shift_high) == (1.0, -3, 3)


def test_stage_outputs_and_summary(tmp_path, monkeypatch):
  data = _synthetic_split()
  load, _ = _loader(data)
  _install_loader(monkeypatch, load)
  mix_labels.run(_config(), tmp_path)
  stage = tmp_path / 'mixed_labels'
  assert (stage / 'DONE').exists()
  for png in ('class_histogram.png', 'preview.png'):
    assert (stage / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  s = json.loads((stage / 'summary.json').read_text())
  names = ['train_1', 'train_2', 'train_3', 'train_10']
  assert mixed_files.mixed_names(tmp_path, 'balance') == names
  assert mixed_files.mixed_names(tmp_path, 'enlarge') == names
  # Known answers from the raw split.
  tiles = {d['name']: mixing_tiles.prepare_tile(d['name'], d['inst_map'], d['type_map'], 5)
           for d in data}
  elig = {n: mixing_tiles.eligible(t, 30) for n, t in tiles.items()}
  commons = {n: int((elig[n] & np.isin(t.classes, [2, 3, 4])).sum()) for n, t in tiles.items()}
  assert s['eligible_common'] == sum(commons.values())
  assert s['eligible_rare'] == sum(int((elig[n] & (t.classes == 1)).sum()) for n, t in tiles.items())
  assert s['targets'] == sum(math.floor(0.8 * v) for v in commons.values())
  before = np.bincount(np.concatenate([t.classes[1:] for t in tiles.values()]), minlength=5)[1:]
  assert s['class_counts_before'] == {str(c): int(before[c - 1]) for c in range(1, 5)}
  after = np.zeros(4, int)
  reps = 0
  for n in names:
    b = mixed_files.load_mixed(tmp_path, 'balance', n)
    assert b['inst_map'].dtype == np.int32 and b['type_map'].dtype == np.int32
    np.testing.assert_array_equal(b['type_map'] > 0, b['inst_map'] > 0)
    assert set(np.unique(b['type_map']).tolist()) <= {0, 1, 2, 3, 4}  # merged set only (§8 item 1)
    assert set(b['ids'].tolist()) <= set(np.unique(tiles[n].inst_map).tolist())
    after += np.bincount(b['inst_type'], minlength=5)[1:]
    assert s['class_counts_per_tile'][n]['after'] == {
        str(c): int(v) for c, v in enumerate(np.bincount(b['inst_type'], minlength=5)) if c}
    assert len(b['provenance']['target_id']) == s['replacements_per_tile'][n]
    reps += s['replacements_per_tile'][n]
    e = mixed_files.load_mixed(tmp_path, 'enlarge', n)
    size = tiles[n].inst_map.shape[0]
    assert e['offsets'].tolist() == ([[0, 0]] if size == 256 else [[0, 0], [0, 76], [76, 0], [76, 76]])
    assert e['inst_maps'].dtype == np.int32 and e['type_maps'].shape == e['inst_maps'].shape
    np.testing.assert_array_equal(e['type_maps'] > 0, e['inst_maps'] > 0)
    for p, (r, c) in enumerate(e['offsets']):  # per-id classes equal the real ones
      crop = tiles[n].inst_map[r:r + 256, c:c + 256]
      ids = np.unique(crop[crop > 0])
      np.testing.assert_array_equal(e['real_ids'][p][1:len(ids) + 1], ids)
      np.testing.assert_array_equal(e['classes'][p][1:len(ids) + 1], tiles[n].classes[ids])
  assert reps == s['replacements'] > 0
  assert s['class_counts_after'] == {str(c): int(after[c - 1]) for c in range(1, 5)}
  p = after / after.sum()
  assert s['normalised_entropy_after'] == pytest.approx(-(p * np.log(p)).sum() / np.log(4))
  assert s['class_shares_after']['1'] == pytest.approx(p[0]) and p[0] > before[0] / before.sum()
  assert s['patches'] == 13
  moved = sum(int(mixed_files.load_mixed(tmp_path, 'enlarge', n)['moves']['moved'].sum())
              for n in names)
  assert s['enlarge_moved_per_patch'] == pytest.approx(moved / 13)
  csv = (stage / 'provenance.csv').read_text().strip().splitlines()
  assert len(csv) == 1 + s['replacements'] and csv[0].startswith('tile,target_id,donor_tile')
  assert s['seed'] == 0 and s['messages'] == []


def test_rerun_is_a_noop(tmp_path, monkeypatch):
  load, calls = _loader(_synthetic_split())
  _install_loader(monkeypatch, load)
  mix_labels.run(_config(), tmp_path)
  stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / 'mixed_labels').rglob('*')}
  mix_labels.run(_config(), tmp_path)
  assert calls == ['train']
  assert stamp == {p: p.stat().st_mtime_ns for p in (tmp_path / 'mixed_labels').rglob('*')}


def test_same_outputs_for_reversed_order_and_threads_not_for_other_seed(tmp_path, monkeypatch):
  """§8 item 10 through the stage."""
  data = _synthetic_split()
  runs = {}
  for tag, split, workers, seed in (('base', data, 0, 0), ('rev', data[::-1], 0, 0),
                                    ('threads', data, 2, 0), ('seed1', data, 0, 1)):
    _install_loader(monkeypatch, _loader(split)[0])
    c = _config()
    c.mix.num_workers, c.seed = workers, seed
    mix_labels.run(c, tmp_path / tag)
    runs[tag] = _read_all(tmp_path / tag)
  _assert_same(runs['base'], runs['rev'])
  _assert_same(runs['base'], runs['threads'])
  summaries = {t: json.loads((tmp_path / t / 'mixed_labels' / 'summary.json').read_text())
               for t in runs}
  assert summaries['base'] == summaries['rev'] == summaries['threads']
  with pytest.raises(AssertionError):
    _assert_same(runs['base'], runs['seed1'])


def test_dataset_without_rare_nuclei(tmp_path, monkeypatch):
  """Bad input: clear message, empty balancing set (stale files of an unfinished run removed)."""
  stale = tmp_path / 'mixed_labels' / 'balance' / 'train_2.npz'
  stale.parent.mkdir(parents=True)
  stale.write_bytes(b'half')
  _install_loader(monkeypatch, _loader(_synthetic_split(with_rare=False))[0])
  mix_labels.run(_config(), tmp_path)
  s = json.loads((tmp_path / 'mixed_labels' / 'summary.json').read_text())
  assert s['eligible_rare'] == 0 and s['replacements'] == 0
  assert 'no eligible rare nucleus' in s['messages'][0] and s['balance_tiles'] == []
  assert mixed_files.mixed_names(tmp_path, 'balance') == []
  assert len(mixed_files.mixed_names(tmp_path, 'enlarge')) == 4
  assert mixed_files.load_mixed(tmp_path, 'enlarge', 'train_2')['inst_maps'].shape == (4, 256, 256)
  assert (tmp_path / 'mixed_labels' / 'DONE').exists()


def test_tile_smaller_than_a_patch(tmp_path, monkeypatch):
  """A 200² tile gets a balancing map and an enlarging file with no patch (§4.1)."""
  data = _synthetic_split()
  small = data[0]
  data.append(dict(name='train_4', image=small['image'][:200, :200],
                   inst_map=np.ascontiguousarray(small['inst_map'][:200, :200]),
                   type_map=np.ascontiguousarray(small['type_map'][:200, :200])))
  _install_loader(monkeypatch, _loader(data)[0])
  mix_labels.run(_config(), tmp_path)
  e = mixed_files.load_mixed(tmp_path, 'enlarge', 'train_4')
  assert e['offsets'].shape == (0, 2) and e['type_maps'].shape == (0, 256, 256)
  b = mixed_files.load_mixed(tmp_path, 'balance', 'train_4')
  assert b['inst_map'].shape == (200, 200)
  s = json.loads((tmp_path / 'mixed_labels' / 'summary.json').read_text())
  assert s['patches'] == 13


def test_unknown_class_in_data(tmp_path, monkeypatch):
  data = _synthetic_split()
  data[0]['type_map'][data[0]['type_map'] == 4] = 6
  _install_loader(monkeypatch, _loader(data)[0])
  with pytest.raises(ValueError, match=r'train_10: type_map values must be in 0\.\.4'):
    mix_labels.run(_config(), tmp_path)


def test_load_mixed_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='run the mix_labels stage'):
    mixed_files.load_mixed(tmp_path, 'balance', 'train_1')
  with pytest.raises(ValueError, match='kind'):
    mixed_files.load_mixed(tmp_path, 'blend', 'train_1')


@pytest.mark.slow
def test_real_consep_summary(consep_dir, tmp_path, monkeypatch):
  """§8 items 13-17 on the merged CoNSeP train split (27 tiles), default parameters, seed 0."""
  def load_split(config, workdir, split):
    del config, workdir
    out = []
    for path in (consep_dir / 'Train' / 'Labels').glob('*.mat'):
      m = scipy.io.loadmat(path)
      out.append(dict(name=path.stem, image=None, inst_map=m['inst_map'].astype(np.int32),
                      type_map=m['type_map'].astype(np.int32)))
    assert split == 'train' and len(out) == 27
    return out
  _install_loader(monkeypatch, load_split)
  mix_labels.run(common.base_config(), tmp_path)
  s = json.loads((tmp_path / 'mixed_labels' / 'summary.json').read_text())
  assert (s['eligible_rare'], s['eligible_common'], s['targets']) == (349, 13309, 10636)
  assert 6450 <= s['replacements'] <= 6530
  assert max(s['replacements_per_tile'].values()) == 349
  assert s['replacements_per_tile']['train_5'] == 0
  assert s['class_counts_before'] == {'1': 371, '2': 3941, '3': 5537, '4': 5706}
  assert 0.435 <= s['class_shares_after']['1'] <= 0.447
  for c, share in zip('1234', (0.441, 0.190, 0.197, 0.172)):
    assert abs(s['class_shares_after'][c] - share) <= 0.01
  assert s['normalised_entropy_before'] == pytest.approx(0.846, abs=0.0005)
  assert abs(s['normalised_entropy_after'] - 0.937) <= 0.005
  assert (s['patches'], s['patches_empty']) == (2700, 99)
  assert s['patches_without_rare_before'] == 1957 and s['patches_without_rare_after'] <= 20
  assert abs(s['enlarge_nuclei_per_patch'] - 42.7) <= 0.1
  assert abs(s['enlarge_interior_per_patch'] - 17.0) <= 0.1
  assert abs(s['enlarge_moved_per_patch'] - 8.5) <= 0.3


def test_preview_shows_the_enlarging_patches_that_moved_the_most():
  """On 48-px demo patches enlarging moves ~0.2 nuclei per patch, so the preview looks for them
  across tiles (it showed '0 moved' in every row when it took one patch of each chosen tile)."""
  import types  # pylint: disable=g-import-not-at-top
  enlarged = [types.SimpleNamespace(num_moved=np.array(m)) for m in ([0, 2, 0], [0, 0], [3, 2, 1])]
  assert mix_labels.most_moved_patches(enlarged, 3) == [(3, 2, 0), (2, 0, 1), (2, 2, 1)]
  assert mix_labels.most_moved_patches(enlarged, 10)[-1] == (0, 1, 1)
