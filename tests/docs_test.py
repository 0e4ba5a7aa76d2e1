"""The docs hold: every design-note reference resolves to a file in the repository and a heading in it,
and every `python -m diffmix_jax.<module>` command shown in a fenced block parses with that module's
flags. Nothing is run and nothing is compiled: the flag definitions are read from each module's source and
defined on a fresh FlagValues; `main`'s `--config` file is loaded as absl would load it."""

import argparse
import ast
import functools
import importlib
import os
import pathlib
import re
import shlex

from absl import flags
from ml_collections import config_flags
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCANNED = ('diffmix_jax', 'configs', 'tests', 'bench', 'tfds_builders', 'launch', 'docs')
ROOT_FILES = ('README.md', 'CONTRIBUTING.md', 'BENCHMARKS.md', 'pyproject.toml')
SUFFIXES = ('.py', '.md', '.sh', '.toml')
# `X.md §4.1` (X may carry a path: docs/hovernet.md) and `X.md#anchor` (markdown links or code).
PATH = r'(?<![\w/:.-])((?:[\w.-]+/)*[\w-]+\.md)'
SECTION_REF = re.compile(PATH + r'[`"\']?,? §\s?(\d+(?:\.\d+)*)')
ANCHOR_REF = re.compile(PATH + r'#([\w-]+)|\]\(()#([\w-]+)\)')
LINK = re.compile(r'\]\(((?!https?:|mailto:|#)[^)\s#]+)(?:#[^)\s]*)?\)')
OUTSIDE = re.compile(r'shared/specs')  # The external design notes these docs replace.
# In code, 'pitfall 8' or 'issue 17' points at nothing a reader has: state the fact or cite docs/.
BARE_POINTER = re.compile(r'\b(pitfalls? \d+|issue \d+)', re.IGNORECASE)
COMMAND = re.compile(r'python3? -m (diffmix_jax(?:\.\w+)+)')


def scanned_files(root: pathlib.Path = REPO) -> list[pathlib.Path]:
  """Source and documentation files whose references the checks read."""
  files = [root / f for f in ROOT_FILES if (root / f).exists()]
  for d in SCANNED:
    files += sorted(p for p in (root / d).rglob('*') if p.suffix in SUFFIXES and p.is_file()
                    and '__pycache__' not in p.parts)
  return [f for f in files if f.name != pathlib.Path(__file__).name or f.parent != REPO / 'tests']


def slug(heading: str) -> str:
  """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
  return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


@functools.lru_cache(maxsize=None)
def headings(path: pathlib.Path) -> tuple[frozenset, frozenset]:
  """(section numbers, anchors) of the markdown headings of `path`."""
  numbers, anchors, seen = set(), set(), {}
  in_fence = False
  for line in path.read_text().splitlines():
    if line.startswith('```'):
      in_fence = not in_fence
    m = None if in_fence else re.match(r'#{1,6} (.+)', line)
    if not m:
      continue
    num = re.match(r'(\d+(?:\.\d+)*)\.?\s', m.group(1))
    if num:
      numbers.add(num.group(1))
    base = slug(m.group(1))
    anchors.add(base if base not in seen else f'{base}-{seen[base]}')
    seen[base] = seen.get(base, 0) + 1
  return frozenset(numbers), frozenset(anchors)


def resolve(source: pathlib.Path, target: str, root: pathlib.Path) -> pathlib.Path | None:
  """The file `target` names from `source` (its folder, else the repository root); None if there is no
  such file inside the repository."""
  for base in (source.parent, root):
    p = (base / target).resolve()
    if p.is_file() and p.is_relative_to(root):
      return p
  return None


def reference_errors(files: list[pathlib.Path], root: pathlib.Path = REPO) -> list[str]:
  """'file:line: why' for every reference that does not resolve."""
  errors = []
  for f in files:
    for i, line in enumerate(f.read_text(errors='replace').splitlines(), 1):
      where = f'{f.relative_to(root)}:{i}'
      if OUTSIDE.search(line):
        errors.append(f'{where}: names a path outside the repository: {line.strip()}')
      if f.suffix in ('.py', '.sh') and BARE_POINTER.search(line):
        errors.append(f'{where}: "{BARE_POINTER.search(line).group(1)}" points nowhere: state the fact '
                      'or cite docs/differences.md §x')
      for target, section in SECTION_REF.findall(line):
        p = resolve(f, target, root)
        if p is None:
          errors.append(f'{where}: {target} §{section}: no such file in the repository')
        elif section not in headings(p)[0]:
          errors.append(f'{where}: {target} §{section}: no heading numbered {section} in {target}')
      for m in ANCHOR_REF.finditer(line):
        target, anchor = (m.group(1), m.group(2)) if m.group(2) else ('', m.group(4))
        p = f if not target else resolve(f, target, root)
        if p is None:
          errors.append(f'{where}: {target}#{anchor}: no such file in the repository')
        elif p.suffix == '.md' and anchor not in headings(p)[1]:
          errors.append(f'{where}: {target}#{anchor}: no heading with that anchor')
      if f.suffix == '.md':
        for target in LINK.findall(line):
          if resolve(f, target, root) is None and not (f.parent / target).resolve().is_dir():
            errors.append(f'{where}: link to {target}: no such file in the repository')
  return errors


def test_every_reference_resolves():
  errors = reference_errors(scanned_files())
  assert not errors, f'{len(errors)} dead reference(s):\n' + '\n'.join(errors)


def test_a_dead_reference_is_caught(tmp_path):
  (tmp_path / 'docs').mkdir()
  (tmp_path / 'docs' / 'x.md').write_text('# X\n\n## 1. One\n\n### 1.2 One two\n')
  good = '"""docs/x.md §1.2, [one](docs/x.md#12-one-two), docs/x.md §1."""\n'
  (tmp_path / 'ok.py').write_text(good)
  assert reference_errors([tmp_path / 'ok.py'], tmp_path) == []
  bad = ('# docs/x.md §3\n# docs/y.md §1\n# x.md §1\n# [a](docs/x.md#2-two)\n'
         '# ../shared/specs/x.md §1\n# see docs/x.md#one-two\n# as pitfall 3 says\n')
  (tmp_path / 'bad.py').write_text(bad)
  errors = reference_errors([tmp_path / 'bad.py'], tmp_path)
  assert [e.split(':')[1] for e in errors] == ['1', '2', '3', '4', '5', '5', '6', '7'], errors


def fenced_commands(path: pathlib.Path) -> list[tuple[int, str, list[str]]]:
  """(line, module, argv) of every `python -m diffmix_jax.<module> ...` in the fenced blocks of `path`,
  continuation lines joined, shell comments, `$ ` prompts, env assignments and `&&`-joined neighbours cut."""
  out, block, start, in_fence = [], [], 0, False
  for i, line in enumerate(path.read_text().splitlines(), 1):
    if line.lstrip().startswith('```'):
      in_fence = not in_fence
      continue
    if not in_fence:
      continue
    if not block:
      start = i
    block.append(line.rstrip().removesuffix('\\'))
    if line.rstrip().endswith('\\'):
      continue
    text, block = ' '.join(block).strip().removeprefix('$ '), []
    if not COMMAND.search(text):
      continue
    words = shlex.split(text, comments=True)
    segment = []
    for w in words + ['&&']:
      if w not in ('&&', '||', ';', '|'):
        segment.append(w)
        continue
      if segment[:1] == ['time']:
        segment = segment[1:]
      while segment and re.match(r'\w+=', segment[0]):
        segment = segment[1:]
      if segment[:2] in (['python', '-m'], ['python3', '-m']) and segment[2].startswith('diffmix_jax.'):
        out.append((start, segment[2], segment[3:]))
      segment = []
  return out


class _Parsed(Exception):
  """Raised by the patched argparse once a command line is parsed, before the job would start."""


def _flag_statements(tree: ast.Module) -> list[ast.stmt]:
  """Top-level and `if __name__ == '__main__':` statements that define flags or mark them required."""
  body = list(tree.body)
  for node in tree.body:
    if isinstance(node, ast.If) and '__main__' in ast.unparse(node.test):
      body += node.body
  return [n for n in body if isinstance(n, (ast.Expr, ast.Assign)) and isinstance(n.value, ast.Call)
          and re.match(r'(config_)?flags\.(DEFINE_|mark_flag)', ast.unparse(n.value.func))]


def parse_command(module: str, argv: list[str]) -> None:
  """Parses `argv` as `python -m <module>` would, without running the job; raises on an unknown flag, a
  value of the wrong type, a missing required flag, a missing `--config` file or stray arguments."""
  mod = importlib.import_module(module)
  tree = ast.parse(pathlib.Path(mod.__file__).read_text())
  statements = _flag_statements(tree)
  if not statements:  # An argparse command (diffmix_jax.data.demo): parse, then stop before the job.
    def stop(self, args=None, namespace=None):
      raise _Parsed(argparse.ArgumentParser.parse_args.__wrapped__(self, args, namespace))
    stop.__wrapped__ = argparse.ArgumentParser.parse_args
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(argparse.ArgumentParser, 'parse_args', stop)
      with pytest.raises(_Parsed):
        mod.main(argv)
    return
  fv = flags.FlagValues()
  shim = lambda lib: type('Shim', (), {n: staticmethod(functools.partial(getattr(lib, n), flag_values=fv))
                                       for n in dir(lib) if n.startswith(('DEFINE_', 'mark_flag'))})
  names = dict(vars(mod), flags=shim(flags), config_flags=shim(config_flags), ARGV=['prog'] + argv)
  for node in statements:
    call = node.value
    if 'config_flags' in ast.unparse(call.func):
      call.keywords.append(ast.keyword('sys_argv', ast.Name('ARGV', ast.Load())))
    exec(compile(ast.fix_missing_locations(ast.Module([ast.Expr(call)], [])), mod.__file__, 'exec'),
         names)
  rest = fv(['prog'] + argv)
  # Stray arguments are an error, unless a multi-valued flag is given (`--slides A B C`: more follow).
  if len(rest) > 1 and not any(isinstance(fv[n], flags.MultiFlag) and fv[n].present for n in fv):
    raise ValueError(f'unexpected arguments {rest[1:]}')
  path = getattr(fv['config'], 'config_filename', None) if 'config' in fv else None
  if path is not None:  # A config_flags file flag: absl loads it lazily, so check it is there.
    if not (REPO / path).is_file():
      raise ValueError(f'--config {path}: no such file')


def doc_commands():
  files = [REPO / 'README.md', REPO / 'CONTRIBUTING.md', *sorted((REPO / 'docs').glob('*.md'))]
  return [pytest.param(m, argv, id=f'{f.name}:{line}') for f in files if f.exists()
          for line, m, argv in fenced_commands(f)]


@pytest.mark.parametrize('module, argv', doc_commands())
def test_documented_command_parses(module, argv, monkeypatch):
  monkeypatch.chdir(REPO)
  parse_command(module, argv)


@pytest.mark.parametrize('module, argv', [
    ('diffmix_jax.evaluate', ['--true_dir', 't', '--pred_dirr', 'p']),  # Unknown flag.
    ('diffmix_jax.predict', ['--images', 'i', '--out', 'o', '--batch_size', 'eight']),  # Wrong type.
    ('diffmix_jax.main', ['--config', 'configs/demo.py', '--workdir', 'w', '--config.sedd=1']),
    ('diffmix_jax.main', ['--config', 'configs/nope.py', '--workdir', 'w']),  # No such config file.
    ('diffmix_jax.build_data', ['--dataset', 'consepp']),  # Not one of the enum's values.
    ('diffmix_jax.data.demo', ['--exportt', 'tiles/']),  # argparse: unknown option.
    ('diffmix_jax.evaluate', ['--true_dir', 't', '--pred_dir', 'p', 'extra']),  # A stray argument.
    ('diffmix_jax.evaluate', ['--true_dir', 't']),  # --pred_dir is required.
])
def test_a_bad_command_is_caught(module, argv, monkeypatch):
  monkeypatch.chdir(REPO)
  with pytest.raises((flags.Error, ValueError, AttributeError, KeyError, SystemExit)):
    parse_command(module, argv)


def test_commands_are_found(tmp_path):
  md = tmp_path / 'x.md'
  md.write_text('text python -m diffmix_jax.a --x\n```bash\npip install -e . && '
                'python -m diffmix_jax.main --config c.py \\\n    --workdir w   # comment\n'
                'A=1 python -m diffmix_jax.data.demo --export t/\n```\n')
  assert fenced_commands(md) == [(3, 'diffmix_jax.main', ['--config', 'c.py', '--workdir', 'w']),
                                 (5, 'diffmix_jax.data.demo', ['--export', 't/'])]
