"""A cohort's shared state on disk: which slides are finished, claimed, and how far a slide got.

  <out>/<stem>/fingerprint.txt         written last: the slide is finished by this run key
  <out>/<stem>/.parts/key.txt          the run key the parts below belong to (others are wiped)
  <out>/<stem>/.parts/<i>_<j>.npz      the nuclei chunk (i, j) kept (work pixels), one per chunk done
  <out>/.claims/<launch>/<stem>        created exclusively by the process that takes the slide

The run key hashes the model's fingerprint, the slide file (size, first and last MiB), the µm/px and
level used, the chunk geometry and the tissue mask source: any change redoes the slide. Every file is
written atomically. Claims are per launch (a launch id all processes share through the coordination
service), so a rerun after a kill claims afresh. Host only.
"""

import hashlib
import io
import json
import os
import pathlib
import shutil
import socket

import numpy as np

from diffmix_jax import workdir as wdir

FINGERPRINT = 'fingerprint.txt'
PARTS = '.parts'
CLAIMS = '.claims'
FIELDS = ('bbox', 'centroid', 'type', 'type_prob', 'area')


def file_fingerprint(path: pathlib.Path) -> str:
  """SHA-256 over the size, the first and the last MiB of a file (cheap for multi-GB slides)."""
  h, size = hashlib.sha256(), path.stat().st_size
  h.update(str(size).encode())
  with open(path, 'rb') as f:
    h.update(f.read(1 << 20))
    f.seek(max(0, size - (1 << 20)))
    h.update(f.read(1 << 20))
  return h.hexdigest()


def run_key(parts: dict) -> str:
  """SHA-256 of the JSON of everything that decides a slide's outputs."""
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def is_finished(slide_dir: pathlib.Path, key: str) -> bool:
  mark = slide_dir / FINGERPRINT
  return mark.exists() and mark.read_text() == key


def mark_finished(slide_dir: pathlib.Path, key: str) -> None:
  """Marks the slide finished (last write) and removes its parts."""
  wdir.atomic_write(slide_dir / FINGERPRINT, key.encode())
  shutil.rmtree(slide_dir / PARTS, ignore_errors=True)


def open_parts(slide_dir: pathlib.Path, key: str) -> pathlib.Path:
  """The parts folder of `key`: kept when it holds parts of the same key, else emptied."""
  parts = slide_dir / PARTS
  if (slide_dir / FINGERPRINT).exists():
    (slide_dir / FINGERPRINT).unlink()  # Outputs of another key are about to be replaced.
  if not (parts / 'key.txt').exists() or (parts / 'key.txt').read_text() != key:
    shutil.rmtree(parts, ignore_errors=True)
    wdir.atomic_write(parts / 'key.txt', key.encode())
  return parts


def part_path(parts: pathlib.Path, chunk: tuple[int, int]) -> pathlib.Path:
  return parts / f'{chunk[0]}_{chunk[1]}.npz'


def save_part(parts: pathlib.Path, chunk: tuple[int, int], nuclei: dict) -> None:
  """Writes a chunk's kept nuclei: FIELDS arrays plus the contours concatenated with their lengths."""
  contours = nuclei['contours']
  buf = io.BytesIO()
  np.savez(buf, **{k: nuclei[k] for k in FIELDS},
           contour_len=np.array([len(c) for c in contours], np.int64),
           contour_xy=(np.concatenate(contours) if contours else np.zeros((0, 2), np.int32)))
  wdir.atomic_write(part_path(parts, chunk), buf.getvalue())


def load_part(parts: pathlib.Path, chunk: tuple[int, int]) -> dict | None:
  """A chunk's kept nuclei as `save_part` wrote them, or None when the chunk is not done."""
  path = part_path(parts, chunk)
  if not path.exists():
    return None
  with np.load(path) as z:
    out = {k: z[k] for k in FIELDS}
    out['contours'] = np.split(z['contour_xy'], np.cumsum(z['contour_len'])[:-1]) if len(
        z['contour_len']) else []
  return out


def empty_nuclei() -> dict:
  return {'bbox': np.zeros((0, 4), np.int64), 'centroid': np.zeros((0, 2)),
          'type': np.zeros(0, np.int32), 'type_prob': np.zeros(0), 'area': np.zeros(0, np.int64),
          'contours': []}


def concat(parts: list[dict]) -> dict:
  out = empty_nuclei()
  for p in parts:
    for k in FIELDS:
      out[k] = np.concatenate([out[k], p[k]])
    out['contours'] = out['contours'] + list(p['contours'])
  return out


def launch_id() -> str:
  """An id shared by the processes of this launch: process 0 draws it and publishes it through the
  coordination service of `jax.distributed` (one process: drawn locally)."""
  import jax  # pylint: disable=g-import-not-at-top
  from diffmix_jax.core import sharding  # pylint: disable=g-import-not-at-top
  client = sharding.coordination_client() if jax.process_count() > 1 else None
  if client is None:
    return os.urandom(8).hex()
  if jax.process_index() == 0:
    client.key_value_set('diffmix_slides_launch', os.urandom(8).hex())
  return client.blocking_key_value_get('diffmix_slides_launch', 600_000)


def claim(out: pathlib.Path, launch: str, stem: str) -> bool:
  """Takes slide `stem` for this process in this launch; False when another process has it."""
  folder = out / CLAIMS / launch
  folder.mkdir(parents=True, exist_ok=True)
  try:
    fd = os.open(folder / stem, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'w') as f:
    f.write(f'{socket.gethostname()} {os.getpid()}\n')
  return True
