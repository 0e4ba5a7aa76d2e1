"""Many slides in one command: the slide list, the claims that share it between processes, the skip of
finished slides, and the errors that name bad slides without stopping the others (docs/slides.md §5).
"""

import pathlib
import time

from absl import logging

from diffmix_jax.slides import cohort
from diffmix_jax.slides import pipeline
from diffmix_jax.slides import reading


def list_slides(paths: list[str]) -> list[pathlib.Path]:
  """Slide files of `paths` (files, or folders of reading.SLIDE_SUFFIXES files, any case).

  Raises:
    FileNotFoundError: naming a path that does not exist or a folder without slides.
    ValueError: naming both files, when two slides share a stem (their output folders would collide).
  """
  out = []
  for p in map(pathlib.Path, paths):
    if p.is_dir():
      found = sorted(q for q in p.iterdir()
                     if q.is_file() and q.suffix.lower() in reading.SLIDE_SUFFIXES)
      if not found:
        raise FileNotFoundError(f'{p}: no slide ({", ".join(reading.SLIDE_SUFFIXES)}) in this folder')
      out += found
    elif p.is_file():
      out.append(p)
    else:
      raise FileNotFoundError(f'{p}: no such slide file or folder (--slides)')
  seen = {}
  for p in out:
    if p.stem in seen and seen[p.stem] != p:
      raise ValueError(f'{seen[p.stem]} and {p} share the name {p.stem!r}: their output folders '
                       'would collide; rename one')
    seen[p.stem] = p
  return list(dict.fromkeys(out))


def predict_slides(model, paths: list[str], out: str, table, model_mpp: float, opts: pipeline.Options,
                   batch_size: int) -> list[str]:
  """Every slide of `paths` into `out`, shared with the other processes of a `jax.distributed` launch
  through claim files; returns one error line per slide that could not be read."""
  import jax  # pylint: disable=g-import-not-at-top
  from diffmix_jax.hovernet import infer as hovernet_infer  # pylint: disable=g-import-not-at-top
  slides, root = list_slides(paths), pathlib.Path(out)
  launch, shared = cohort.launch_id(), jax.process_count() > 1
  predict, errors, start = None, [], time.monotonic()
  for k, path in enumerate(slides):
    try:
      plan = pipeline.plan_slide(path, model, model_mpp, opts)
      if cohort.is_finished(root / path.stem, plan.key):
        logging.info('%s: finished by this model already, skipped', path.name)
        continue
      if shared and not cohort.claim(root, launch, path.stem):
        continue
      predict = predict or hovernet_infer.create_predictor(model.module, model.variables, batch_size)
      summary = pipeline.predict_slide(path, model, predict, root, table, model_mpp, opts, plan)
    except (ValueError, FileNotFoundError) as e:
      errors.append(str(e))
      logging.error('%s', e)
      continue
    elapsed = time.monotonic() - start
    logging.info('%s: %d nuclei, %.2f mm² tissue, %.1f s%s; slide %d/%d, ETA %.0f s', path.name,
                 summary['nuclei'], summary['tissue_mm2'], summary['seconds']['wall'],
                 f' ({summary["note"]})' if 'note' in summary else '', k + 1, len(slides),
                 elapsed / (k + 1) * (len(slides) - k - 1))
  return errors
