"""A stage's output folder under the workdir: atomic writes and the finished marker.

Every file is written to a temporary name in the same folder and renamed into place, so a killed run
never leaves a half file that a rerun trusts. A stage writes `DONE` last; a rerun that finds it returns.
"""

import json
import os
import pathlib
import tempfile

DONE = 'DONE'


def atomic_write(path: os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file in the same folder and os.replace."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


class StageDir:
  """`<workdir>/<name>/` of one stage."""

  def __init__(self, workdir: os.PathLike, name: str):
    self.path = pathlib.Path(workdir) / name
    self.path.mkdir(parents=True, exist_ok=True)

  def done(self) -> bool:
    return (self.path / DONE).exists()

  def mark_done(self, info: dict | None = None) -> None:
    atomic_write(self.path / DONE, json.dumps(info or {}).encode())

  def write_bytes(self, relpath: str, data: bytes) -> pathlib.Path:
    out = self.path / relpath
    atomic_write(out, data)
    return out

  def write_text(self, relpath: str, text: str) -> pathlib.Path:
    return self.write_bytes(relpath, text.encode())


def write_consep_example(folder: os.PathLike, name: str, image, record: dict) -> None:
  """`folder/Images/<name>.png` (RGB uint8 [H, W, 3]) and `folder/Labels/<name>.mat` (`record`:
  inst_map, type_map, inst_type, inst_centroid), each written atomically."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import scipy.io  # pylint: disable=g-import-not-at-top
  folder = pathlib.Path(folder)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='png')
  atomic_write(folder / 'Images' / f'{name}.png', buf.getvalue())
  buf = io.BytesIO()
  scipy.io.savemat(buf, record, do_compression=True)
  atomic_write(folder / 'Labels' / f'{name}.mat', buf.getvalue())
