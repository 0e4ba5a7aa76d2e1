"""The class table of every dataset: names (background first), rare and common classes (NumPy free).

Fixed for the published sets (CoNSeP and GLySAC after their merges, the demo set, CoNIC, PanNuke);
read from `<manual_dir>/classes.json` for a user's `nuclei_folder`:

  {"names": ["background", "tumour", "lymphocyte", ...],
   "merge": {"<source id>": <class id>, ...},      (optional: source ids in the label files)
   "rare": [<class id>, ...], "common": [<class id>, ...]}

Rare classes are the donors of label-map balancing, common ones its targets (docs/method.md §2).
"""

import dataclasses
import json
import pathlib


@dataclasses.dataclass(frozen=True)
class ClassTable:
  """Class names (index = class id, 0 = background), rare and common ids, and an optional merge
  {source id: class id} applied to the label files' ids (None = the files hold class ids)."""
  names: tuple[str, ...]
  rare: tuple[int, ...]
  common: tuple[int, ...]
  merge: dict[int, int] | None = None

  @property
  def num_classes(self) -> int:
    return len(self.names)

  def to_json(self) -> dict:
    out = {'names': list(self.names), 'rare': list(self.rare), 'common': list(self.common)}
    if self.merge is not None:
      out['merge'] = {str(k): v for k, v in sorted(self.merge.items())}
    return out


# CoNIC (Lizard) ids 1-6; neutrophils and eosinophils are its two rarest classes (~2 % and ~1 % of
# the nuclei in the challenge's release), the other four common.
CONIC = ClassTable(('background', 'neutrophil', 'epithelial', 'lymphocyte', 'plasma', 'eosinophil',
                    'connective'), rare=(1, 5), common=(2, 3, 4, 6))
# PanNuke's mask channels 0-4 become classes 1-5; dead cells are its rarest class (~1 %).
PANNUKE = ClassTable(('background', 'neoplastic', 'inflammatory', 'connective', 'dead',
                      'epithelial'), rare=(4,), common=(1, 2, 3, 5))
CONSEP = ClassTable(('background', 'other', 'inflammatory', 'epithelial', 'spindle'), rare=(1,),
                    common=(2, 3, 4))
GLYSAC = ClassTable(('background', 'miscellaneous', 'lymphocyte', 'epithelial'), rare=(1,), common=(2, 3))
FIXED = {'consep': CONSEP, 'glysac': GLYSAC, 'demo_nuclei': CONSEP, 'conic': CONIC,
         'pannuke': PANNUKE}
CLASSES_FILE = 'classes.json'


class ClassTableError(ValueError):
  """A class table file is missing or not of the documented form."""


def _ids(value, key: str, path, top: int) -> tuple[int, ...]:
  if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                            for v in value):
    raise ClassTableError(f'{path}: "{key}" must be a list of class ids; got {value!r}')
  bad = [v for v in value if not 1 <= v <= top]
  if not value or bad or len(set(value)) != len(value):
    raise ClassTableError(f'{path}: "{key}" must hold at least one, distinct class ids in '
                          f'1..{top} (0 is background); got {value}')
  return tuple(value)


def parse(obj, path='classes.json') -> ClassTable:
  """Validates a class table read from JSON.

  Args:
    obj: the decoded JSON object.
    path: shown in errors.

  Returns:
    The ClassTable.

  Raises:
    ClassTableError: naming the file and the key at fault.
  """
  if not isinstance(obj, dict):
    raise ClassTableError(f'{path}: expected a JSON object with "names", "rare", "common" and '
                          'optionally "merge"')
  unknown = sorted(set(obj) - {'names', 'merge', 'rare', 'common'})
  if unknown:
    raise ClassTableError(f'{path}: unknown key(s) {unknown}; expected names, merge, rare, common')
  names = obj.get('names')
  if (not isinstance(names, list) or len(names) < 2
      or not all(isinstance(n, str) and n and ',' not in n for n in names)):
    raise ClassTableError(f'{path}: "names" must list at least 2 non-empty names without commas, '
                          f'background first; got {names!r}')
  if len(set(names)) != len(names):
    raise ClassTableError(f'{path}: "names" holds a name twice: {names}')
  top = len(names) - 1
  rare = _ids(obj.get('rare'), 'rare', path, top)
  common = _ids(obj.get('common'), 'common', path, top)
  if set(rare) & set(common):
    raise ClassTableError(f'{path}: class {sorted(set(rare) & set(common))[0]} is both rare and '
                          'common')
  merge = obj.get('merge')
  if merge is not None:
    if not isinstance(merge, dict) or not merge:
      raise ClassTableError(f'{path}: "merge" must map source ids (strings) to class ids')
    table = {}
    for k, v in merge.items():
      if not (isinstance(k, str) and k.isdigit()) or not isinstance(v, int) or not 0 <= v <= top:
        raise ClassTableError(f'{path}: "merge" entry {k!r}: {v!r} must map a source id >= 0 to a '
                              f'class id in 0..{top}')
      table[int(k)] = v
    if table.get(0, 0) != 0:
      raise ClassTableError(f'{path}: "merge" maps source id 0 (background) to {table[0]}')
    table[0] = 0
    merge = table
  return ClassTable(tuple(names), rare, common, merge)


def read(folder) -> ClassTable:
  """The class table `<folder>/classes.json` of a nuclei_folder dataset.

  Raises:
    ClassTableError: missing, unreadable or malformed file (named).
  """
  path = pathlib.Path(folder) / CLASSES_FILE
  if not path.is_file():
    raise ClassTableError(f'{path}: missing; a nuclei_folder dataset describes its classes there: '
                          '{"names": ["background", ...], "rare": [ids], "common": [ids], '
                          '"merge": {"<source id>": <class id>} (optional)}')
  try:
    obj = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ClassTableError(f'{path}: not readable JSON ({e})') from e
  return parse(obj, path)
