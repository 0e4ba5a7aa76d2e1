"""Every config value checked before any stage runs: an error names the field and the expected form.

`check(config)` is the first thing `main` does after `data.datasets.resolve_classes` has filled the
class fields a config leaves to its dataset. It only reads the config (no parsing for later use, no
change), so a bad value fails in seconds, not after hours of SDM training. Three kinds of checks:
  - `RULES`: one rule per enumerated, list, class-id or numeric field of configs/common.py (fields
    left out are free text, paths or booleans, which ConfigDict already types);
  - relations between fields (`_check_relations`);
  - files the selected stages will read (`_check_paths`) and named tile subsets (`_check_tiles`).
Lists are tuples (`--config.hovernet.train.seeds=0,1` on the command line; a tuple of names is
written `--config.hovernet.train.runs="('baseline','diffmix')"`), except `stages` and the official
SDM flags `channel_mult` and `attention_resolutions`, which are comma strings.
"""

import os
from typing import Any, Callable

import ml_collections

from configs import common
from diffmix_jax import workdir as wdir
from diffmix_jax.core import arms
from diffmix_jax.data import datasets
from diffmix_jax.hovernet import model as hovernet_model
from diffmix_jax.metrics import postprocess
from diffmix_jax.mixing import balancing
from diffmix_jax.mixing import enlarging
from diffmix_jax.sdm import diffusion as gd
from diffmix_jax.sdm import unet as sdm_unet
from tfds_builders import class_tables
from tfds_builders import raw_folders
from tfds_builders.demo_nuclei import generate as demo_tiles

Rule = Callable[[Any, ml_collections.ConfigDict], str | None]  # value, config -> problem or None


def choice(*options) -> Rule:
  return lambda v, c: None if v in options else f'expected one of {", ".join(map(str, options))}'


def number(lo=None, hi=None, *, lo_open=False, hi_open=False, integer=False, also=()) -> Rule:
  """A number in [lo, hi] (open ends when asked), or one of `also`."""
  def rule(v, c):
    del c
    what = 'an integer' if integer else 'a number'
    if v in also and not isinstance(v, bool):
      return None
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
      return f'expected {what}'
    if ((lo is None or (v > lo if lo_open else v >= lo)) and
                     (hi is None or (v < hi if hi_open else v <= hi))):
      return None
    bounds = [f'{">" if lo_open else ">="} {lo}' if lo is not None else '',
              f'{"<" if hi_open else "<="} {hi}' if hi is not None else '']
    return (f'expected {what} ' + ' and '.join(b for b in bounds if b)
            + (f' (or {" or ".join(map(str, also))})' if also else ''))
  return rule


def positive_int(**kw) -> Rule:
  return number(1, integer=True, **kw)


def count(**kw) -> Rule:
  return number(0, integer=True, **kw)


def probability() -> Rule:
  return number(0.0, 1.0)


def _is_number(v, integer: bool) -> bool:
  return not isinstance(v, bool) and isinstance(v, int if integer else (int, float))


def sequence(what: str, item: Callable[[Any], bool], *, n: int | None = None,
             allow_empty: bool = False, distinct: bool = False) -> Rule:
  """A tuple of `what` (each passing `item`): exactly n of them when n is given."""
  def rule(v, c):
    del c
    form = f'a tuple of {f"{n} " if n else ""}{"distinct " if distinct else ""}{what}'
    if not isinstance(v, (tuple, list)):
      return f'expected {form}'
    bad = [x for x in v if not item(x)]
    if bad:
      hint = (' (a comma inside one name: on the command line a tuple of names is written '
              """"('a','b')")""" if any(',' in str(x) for x in bad) else '')
      return f'expected {form}; not allowed: {bad}{hint}'
    if (n is not None and len(v) != n) or (distinct and len(set(v)) != len(v)):
      return f'expected {form}'
    return None if v or allow_empty else f'expected {form}, not empty'
  return rule


def numbers(lo=0, *, integer=True, **kw) -> Rule:
  return sequence(f'{"integers" if integer else "numbers"} >= {lo}',
                  lambda x: _is_number(x, integer) and x >= lo, **kw)


def one_of(options, what: str = 'names', **kw) -> Rule:
  return sequence(f'{what} from {", ".join(map(str, options))}', lambda x: x in options,
                  distinct=True, **kw)


def class_ids(v, c) -> str | None:
  """A tuple of distinct class ids in 1..num_classes-1 (background 0 is not a class to mix)."""
  top = c.data.num_classes - 1
  return sequence(f'class ids in 1..{top} (config.data.num_classes={c.data.num_classes})',
                  lambda x: _is_number(x, True) and 1 <= x <= top, distinct=True)(v, c)


def class_names(v, c) -> str | None:
  problem = sequence('non-empty names', lambda x: isinstance(x, str) and bool(x.strip()),
                     n=c.data.num_classes)(v, c)
  return problem and f'{problem} (config.data.num_classes)'


def stage_list(v, c) -> str | None:
  del c
  names = common.stage_names(v)
  unknown = [s for s in names if s not in common.ALL_STAGES]
  if unknown or len(set(names)) != len(names):
    return (f'expected a comma list of distinct stages from {", ".join(common.ALL_STAGES)}'
            + (f'; unknown: {", ".join(unknown)}' if unknown else ''))
  return None


def channel_mult(v, c) -> str | None:
  try:
    mult = sdm_unet.parse_channel_mult(str(v), c.diffusion.model.image_size)
  except ValueError as e:
    return f'expected \'\' or a comma list of numbers >= 1 ({e})'
  return None if not v or min(mult) >= 1 else 'expected a comma list of numbers >= 1'


def resolutions(v, c) -> str | None:
  del c
  try:
    values = sdm_unet.parse_resolutions(str(v))
  except ValueError:
    values = (0,)
  return None if all(x >= 1 for x in values) else 'expected a comma list of integers >= 1'


def respacing(v, c) -> str | None:
  try:
    gd.space_timesteps(c.diffusion.schedule.diffusion_steps, str(v))
  except (ValueError, TypeError) as e:
    return f"expected '', 'ddimN' or a comma list of step counts ({e})"
  return None


def raises(parse: Callable[[ml_collections.ConfigDict], Any]) -> Rule:
  """A field whose runtime parser already raises a ValueError naming it (e.g. `arms.seeds`)."""
  def rule(v, c):
    del v
    parse(c)
  return rule


RULES: dict[str, Rule] = {
    'seed': count(),
    'stages': stage_list,  # '': set-up only (launch tests).
    'data.name': choice(*sorted(class_tables.FIXED), 'nuclei_folder'),
    'data.labels': choice('original', 'merged'),
    'data.num_classes': number(2, integer=True),
    'data.class_names': class_names,
    'data.crop_size': positive_int(),
    'data.mpp': number(0.0, 100.0, lo_open=True),
    'data.num_workers': count(),
    'data.conic.test_fraction': number(0.0, 1.0, lo_open=True, hi_open=True),
    'data.conic.split_seed': count(),
    'data.train_tiles': sequence('tile names', lambda x: isinstance(x, str) and bool(x),
                                 allow_empty=True, distinct=True),
    'data.test_tiles': sequence('tile names', lambda x: isinstance(x, str) and bool(x),
                                allow_empty=True, distinct=True),
    'data.pannuke.train_folds': one_of((1, 2, 3), 'folds'),
    'data.pannuke.test_folds': one_of((1, 2, 3), 'folds'),
    'data.prefetch': positive_int(),
    'mesh.data': positive_int(also=(-1,)),
    'mesh.num_processes': positive_int(also=(-1,)),
    'mesh.process_id': count(also=(-1,)),
    'mesh.initialization_timeout': positive_int(),
    'mesh.heartbeat_timeout': positive_int(),
    'diffusion.model.image_size': positive_int(),
    'diffusion.model.num_channels': positive_int(),
    'diffusion.model.num_res_blocks': positive_int(),
    'diffusion.model.channel_mult': channel_mult,
    'diffusion.model.attention_resolutions': resolutions,
    'diffusion.model.num_heads': positive_int(),
    'diffusion.model.num_head_channels': positive_int(also=(-1,)),
    'diffusion.model.dropout': number(0.0, 1.0, hi_open=True),
    'diffusion.model.dtype': choice(*sdm_unet.DTYPES),
    'diffusion.model.spade_hidden': positive_int(),
    'diffusion.schedule.diffusion_steps': number(2, integer=True),
    'diffusion.schedule.noise_schedule': choice(*gd.NOISE_SCHEDULES),
    'diffusion.train.batch_size': positive_int(),
    'diffusion.train.phase1_steps': count(),
    'diffusion.train.phase2_steps': count(),
    'diffusion.train.phase1_lr': number(0.0, lo_open=True),
    'diffusion.train.phase2_lr': number(0.0, lo_open=True),
    'diffusion.train.phase1_drop_rate': probability(),
    'diffusion.train.phase2_drop_rate': probability(),
    'diffusion.train.ema_rate': probability(),
    'diffusion.train.log_every_steps': positive_int(),
    'diffusion.train.checkpoint_every_steps': positive_int(),
    'diffusion.train.keep_checkpoints': positive_int(),
    'diffusion.train.sample_every_steps': count(),
    'diffusion.train.sample_respacing': respacing,
    'mix.num_workers': count(),
    'mix.preview_tiles': count(),
    'mix.balance.rare_classes': class_ids,
    'mix.balance.common_classes': class_ids,
    'mix.balance.target_fraction': probability(),
    'mix.balance.area_ratio': number(0.0, lo_open=True),
    'mix.balance.dilation_iterations': count(),
    'mix.balance.border_margin': count(),
    'mix.balance.paste_mode': choice(*balancing.PASTE_MODES),
    'mix.balance.max_replacements_per_tile': count(also=(None,)),
    'mix.enlarge.preset': choice(*enlarging.PRESETS),
    'mix.enlarge.frame_margin': count(),
    'mix.enlarge.axis_probability': probability(),
    'mix.enlarge.shift_low': number(integer=True),
    'mix.enlarge.shift_high': number(integer=True),
    'mix.enlarge.collision': choice(*enlarging.COLLISIONS),
    'sample.timestep_respacing': respacing,
    'sample.percent': number(0, 100),
    'sample.guidance': number(0.0),
    'sample.patch_size': positive_int(),
    'sample.grid_stride': positive_int(),
    'sample.balance_patches': choice('grid', 'cover'),
    'sample.cover_stride': positive_int(),
    'sample.batch_size': positive_int(),
    'sample.shard_size': positive_int(),
    'hovernet.model.mode': choice(*hovernet_model.MODES),
    'hovernet.model.encoder_units': numbers(1, n=4),
    'hovernet.model.decoder_units': numbers(1, n=2),
    'hovernet.model.width': choice(1, 2, 4, 8, 16),
    'hovernet.model.head_init': choice(*hovernet_model.HEAD_INITS),
    'hovernet.train.runs': one_of(tuple(arms.ARMS), 'arms'),
    'hovernet.train.seeds': numbers(0, distinct=True),
    'hovernet.train.synthetic_ratio': number(0.0, also=(-1, -1.0)),
    'hovernet.train.patch_window': positive_int(),
    'hovernet.train.patch_step': positive_int(),
    'hovernet.train.phase1_epochs': count(),
    'hovernet.train.phase2_epochs': count(),
    'hovernet.train.phase1_batch_size': positive_int(),
    'hovernet.train.phase2_batch_size': positive_int(),
    'hovernet.train.lr': number(0.0, lo_open=True),
    'hovernet.train.lr_step_epochs': positive_int(),
    'hovernet.train.lr_gamma': number(0.0, 1.0, lo_open=True),
    'hovernet.train.mse_weight': number(0.0),
    'hovernet.train.tp_class_weighting': choice('none', 'median_frequency'),
    'hovernet.train.loader_threads': positive_int(),
    'hovernet.train.log_every_steps': positive_int(),
    'hovernet.train.checkpoint_every_epochs': positive_int(),
    'hovernet.train.keep_checkpoints': positive_int(),
    'hovernet.train.val_tiles': count(),
    'hovernet.train.val_every_epochs': positive_int(),
    'eval.match_radius': number(0.0, lo_open=True),
    'eval.f_c_weights': numbers(0, n=4, integer=False),
    'eval.batch_size': positive_int(),
    'eval.postprocess': raises(lambda c: postprocess.params_from(c.eval.postprocess)),
}


def _get(c: ml_collections.ConfigDict, field: str) -> Any:
  for part in field.split('.'):
    c = c[part]
  return c


def _fail(field: str, value: Any, problem: str) -> None:
  raise ValueError(f'config.{field}={value!r}: {problem}')


def _check_relations(c: ml_collections.ConfigDict) -> None:
  """Fields that must agree with each other."""
  if c.data.crop_size != c.diffusion.model.image_size:
    _fail('data.crop_size', c.data.crop_size,
          f'must equal config.diffusion.model.image_size={c.diffusion.model.image_size}')
  folds = set(c.data.pannuke.train_folds) & set(c.data.pannuke.test_folds)
  if folds:
    _fail('data.pannuke.test_folds', c.data.pannuke.test_folds,
          f'fold {sorted(folds)[0]} is also in config.data.pannuke.train_folds')
  b = c.mix.balance
  both = sorted(set(b.rare_classes) & set(b.common_classes))
  if both:
    _fail('mix.balance.common_classes', b.common_classes,
          f'class id {both[0]} is also in config.mix.balance.rare_classes')
  e = c.mix.enlarge
  if e.preset != 'author_issue3':
    limit = f'smaller in size than config.mix.enlarge.frame_margin={e.frame_margin}'
    if -e.shift_low >= e.frame_margin:
      _fail('mix.enlarge.shift_low', e.shift_low, f'must be {limit}')
    if e.shift_high >= e.frame_margin:
      _fail('mix.enlarge.shift_high', e.shift_high, f'must be {limit}')
    if e.shift_high < e.shift_low:
      _fail('mix.enlarge.shift_high', e.shift_high,
            f'must be >= config.mix.enlarge.shift_low={e.shift_low}')
  if 2 * e.frame_margin > c.sample.patch_size:
    _fail('mix.enlarge.frame_margin', e.frame_margin,
          f'must be at most half of config.sample.patch_size={c.sample.patch_size}')
  window = c.hovernet.train.patch_window
  size = hovernet_model.PATCH_SHAPES[c.hovernet.model.mode][0]
  if window < size:
    _fail('hovernet.train.patch_window', window,
          f'must be at least the {c.hovernet.model.mode} network\'s input side {size}')


def _check_paths(c: ml_collections.ConfigDict, stages: list[str], workdir: str) -> None:
  """Files the selected stages read, checked before the first stage starts."""
  built = workdir and os.path.exists(os.path.join(workdir, wdir.BUILD_DATA, wdir.DONE))
  if 'build_data' in stages and c.data.name != 'demo_nuclei' and not built:
    root = datasets.manual_dir(c)
    if not root:
      _fail('data.manual_dir', c.data.manual_dir,
            f'{datasets.folder_layout(c.data.name)} ({c.data.name}) is required by build_data')
    if not os.path.isdir(root):
      _fail('data.manual_dir', root, f'no such folder; expected {datasets.folder_layout(c.data.name)}')
  if 'sample' in stages and c.sample.params_path and not os.path.isfile(c.sample.params_path):
    _fail('sample.params_path', c.sample.params_path,
          'no such file; expected converted EMA params (python -m diffmix_jax.convert_torch)')
  tc = c.hovernet.train
  if 'hovernet_train' in stages:
    if tc.phase1_epochs > 0 and not tc.pretrained:
      _fail('hovernet.train.pretrained', tc.pretrained,
            f'phase 1 (config.hovernet.train.phase1_epochs={tc.phase1_epochs}) trains with the '
            f'encoder frozen, which only makes sense from ImageNet weights: set it to '
            f'{PRETRAINED_SOURCE}; or train from scratch with --config.hovernet.train.phase1_epochs=0')
    if tc.pretrained and not os.path.isfile(tc.pretrained):
      _fail('hovernet.train.pretrained', tc.pretrained, f'no such file; expected {PRETRAINED_SOURCE}')
    synthetic = [a for a in arms.arms(c) if arms.ARMS[a]]
    if synthetic and tc.synthetic_dir and 'sample' not in stages and not os.path.isdir(
        os.path.join(tc.synthetic_dir, 'Images')):
      _fail('hovernet.train.synthetic_dir', tc.synthetic_dir,
            f'no Images/ folder there; the arms {synthetic} read a synthetic set in CoNSeP layout')


PRETRAINED_SOURCE = ('the official ImageNet-ResNet50-Preact_pytorch.tar (HoVer-Net README, Google '
                     'Drive), or a .npz / torch state dict with the PyTorch HoVer-Net encoder names '
                     'conv0.*, d0.* ... d3.*')


def tile_names_on_disk(c: ml_collections.ConfigDict, split: str) -> list[str] | None:
  """The tile names of a split as the builders name them, or None when the source folder is absent."""
  if c.data.name == 'demo_nuclei':
    return [f'{split}_{i + 1}' for i in range(demo_tiles.NUM_TILES[split])]
  if c.data.name in ('conic', 'pannuke'):  # Named in the built dataset only (its source checks).
    return None
  root = datasets.manual_dir(c)
  if not root or not os.path.isdir(root):
    return None
  return [name for name, _, _ in raw_folders.split_pairs(root, split)]


def check_tile_names(config: ml_collections.ConfigDict, split: str, available: list[str]) -> None:
  """Raises ValueError naming `config.data.<split>_tiles` if it names a tile not in `available`."""
  known = set(available)
  unknown = [n for n in config.data[f'{split}_tiles'] if n not in known]
  if unknown:
    raise ValueError(f'config.data.{split}_tiles: unknown tile(s) {unknown}; the {split} split of '
                     f'{config.data.name} holds {", ".join(available)}')


def check(c: ml_collections.ConfigDict, workdir: str = '') -> list[str]:
  """Checks the whole config for a run in `workdir`; returns the selected stages, in order.

  The class fields a config leaves to its dataset (0, ()) must have been filled by
  `datasets.resolve_classes` (as `main` does); nothing in `c` is changed.

  Raises:
    ValueError: naming the first bad field, its value and the expected form.
  """
  problem = RULES['data.name'](c.data.name, c)  # Before its class table is looked up.
  if problem:
    _fail('data.name', c.data.name, problem)
  datasets.check_classes(c, workdir)  # The class count is the table's; none left unresolved.
  for field, rule in RULES.items():
    problem = rule(_get(c, field), c)
    if problem:
      _fail(field, _get(c, field), problem)
  _check_relations(c)
  stages = common.stage_names(c.stages)
  _check_paths(c, stages, workdir)
  for split in ('train', 'test'):
    if c.data[f'{split}_tiles']:
      available = tile_names_on_disk(c, split)
      if available is not None:  # Else build_data's folder check above reports it.
        check_tile_names(c, split, available)
  return stages
