"""Tests through the real `main` entry point."""

import json
import pathlib
import subprocess
import sys

import pytest

from diffmix_jax import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args, timeout=600):
  return subprocess.run([sys.executable, '-m', 'diffmix_jax.main', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def test_demo_data_stage_and_noop_rerun(tmp_path):
  workdir = tmp_path / 'demo'
  out = run_main('--config', 'configs/demo.py', '--workdir', str(workdir),
                 '--config.stages=build_data')
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads((workdir / 'build_data' / 'summary.json').read_text())
  assert summary['splits']['train']['tiles'] == 32
  assert (workdir / 'build_data' / 'DONE').exists()
  assert json.loads((workdir / 'config.json').read_text())['data']['name'] == 'demo_nuclei'
  assert 'build_data' in json.loads((workdir / 'timings.json').read_text())
  again = run_main('--config', 'configs/demo.py', '--workdir', str(workdir),
                   '--config.stages=build_data')
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'build_data: already done' in again.stderr


def test_missing_stage_module_says_it_is_not_implemented(monkeypatch):
  monkeypatch.setitem(main.STAGES, 'future', ('diffmix_jax.no_such_stage', 99, True))
  with pytest.raises(NotImplementedError, match=r"stage 'future' is not implemented yet "
                     r'\(diffmix_jax.no_such_stage.run, issue #99\)'):
    main.stage_fn('future')


def test_bad_config_value_is_an_error_naming_the_field(tmp_path):
  out = run_main('--config', 'configs/tiny.py', '--workdir', str(tmp_path),
                 '--config.stages=build_data,nonsense')
  assert out.returncode != 0
  assert "config.stages: unknown stage(s) ['nonsense']" in out.stderr
