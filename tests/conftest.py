"""Shared pytest set-up: 8 simulated CPU devices, a persistent compile cache, real-data discovery."""

import os
import pathlib
import sys
import tempfile

# Must happen before jax is imported anywhere.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'diffmix_jax_test_jit_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def consep_dir() -> pathlib.Path:
  """The real CoNSeP folder named by $DIFFMIX_CONSEP_DIR; skips the test when it is unset."""
  path = os.environ.get('DIFFMIX_CONSEP_DIR', '')
  if not path:
    pytest.skip('DIFFMIX_CONSEP_DIR is not set (real CoNSeP tests need it; .ci/run sets it when '
                '../shared/data/consep exists)')
  p = pathlib.Path(path)
  if not (p / 'Train').is_dir():
    pytest.fail(f'DIFFMIX_CONSEP_DIR={path} has no Train/ folder')
  return p


@pytest.fixture(scope='session')
def tiny_trained(tmp_path_factory) -> pathlib.Path:
  """A workdir of configs/tiny.py after build_data, diffusion_train and mix_labels (in process).

  Tests that write into a workdir copy it first (`copy_workdir`).
  """
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from diffmix_jax import build_data, diffusion_train, mix_labels  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('tiny_trained')
  config = tiny.get_config()
  for stage in (build_data, diffusion_train, mix_labels):
    stage.run(config, str(workdir))
  return workdir


def copy_workdir(src: pathlib.Path, dst: pathlib.Path, skip=()) -> pathlib.Path:
  """Copies a workdir (without the stage folders in `skip`)."""
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n in skip])
  return dst


@pytest.fixture(scope='session')
def sampled(tiny_trained, tmp_path_factory) -> pathlib.Path:
  """A copy of `tiny_trained` after an uninterrupted, in-process run of the sample stage."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from diffmix_jax import sample  # pylint: disable=g-import-not-at-top
  workdir = copy_workdir(tiny_trained, tmp_path_factory.mktemp('sampled') / 'w',
                         skip=('synthetic',))
  sample.run(tiny.get_config(), str(workdir))
  return workdir
