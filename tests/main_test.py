"""End-to-end tests through the real `main` entry point."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args, timeout=600):
  return subprocess.run([sys.executable, '-m', 'diffmix_jax.main', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def test_demo_runs_data_stage_and_names_missing_stages(tmp_path):
  workdir = tmp_path / 'demo'
  out = run_main('--config', 'configs/demo.py', '--workdir', str(workdir))
  summary = json.loads((workdir / 'build_data' / 'summary.json').read_text())
  assert summary['splits']['train']['tiles'] == 32
  assert (workdir / 'build_data' / 'DONE').exists()
  assert json.loads((workdir / 'config.json').read_text())['data']['name'] == 'demo_nuclei'
  # The chain stops at the first stage that does not exist yet, saying so.
  if out.returncode != 0:
    assert 'is not implemented yet' in out.stderr, out.stderr[-3000:]
  # A rerun of the finished data stage is a no-op.
  again = run_main('--config', 'configs/demo.py', '--workdir', str(workdir),
                   '--config.stages=build_data')
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'build_data: already done' in again.stderr


def test_bad_config_value_is_an_error_naming_the_field(tmp_path):
  out = run_main('--config', 'configs/tiny.py', '--workdir', str(tmp_path),
                 '--config.stages=build_data,nonsense')
  assert out.returncode != 0
  assert "config.stages: unknown stage(s) ['nonsense']" in out.stderr
