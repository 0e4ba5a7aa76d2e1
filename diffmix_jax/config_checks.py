"""Every config value checked before any stage runs: an error names the field and the expected form.

`check(config)` is the first thing `main` does. It reads the config only and imports no JAX, TF or
TFDS, so a bad value fails in a second, not after hours of SDM training. Three kinds of checks:
  - `RULES`: one rule per enumerated, comma-list, class-id or numeric field of configs/common.py
    (fields left out are free text, paths or booleans, which ConfigDict already types);
  - relations between fields (`_check_relations`);
  - files the selected stages will read (`_check_paths`) and named tile subsets (`_check_tiles`).
"""

import os
from typing import Any, Callable

import ml_collections

from configs import common
from diffmix_jax import workdir as wdir
from diffmix_jax.core import arms
from diffmix_jax.data import datasets
from diffmix_jax.hovernet import geometry
from diffmix_jax.metrics import postprocess
from diffmix_jax.mixing import balancing
from diffmix_jax.mixing import enlarging
from diffmix_jax.core import fields
from diffmix_jax.sdm import fields as sdm_fields
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


def comma_numbers(lo=0, *, n=None, integer=True, allow_empty=False) -> Rule:
  """A comma list of numbers >= lo, exactly n of them when n is given."""
  def rule(v, c):
    del c
    parts = fields.names(v)
    try:
      values = [int(p) if integer else float(p) for p in parts]
    except ValueError:
      values = None
    form = f'a comma list of {n or ""} {"integers" if integer else "numbers"} >= {lo}'.replace('  ', ' ')
    if values is None or any(x < lo for x in values) or (n is not None and len(values) != n):
      return f'expected {form}'
    return None if values or allow_empty else f'expected {form}, not empty'
  return rule


def class_ids(v, c) -> str | None:
  """A comma list of distinct class ids in 1..num_classes-1 (background 0 is not a class to mix)."""
  top = c.data.num_classes - 1
  try:
    ids = list(fields.ints(v))
  except ValueError:
    return f'expected a comma list of class ids in 1..{top}'
  bad = [i for i in ids if not 1 <= i <= top]
  if not ids or bad or len(set(ids)) != len(ids):
    return (f'expected a comma list of distinct class ids in 1..{top} (config.data.num_classes='
            f'{c.data.num_classes})' + (f'; not classes: {bad}' if bad else ''))
  return None


def class_names(v, c) -> str | None:
  names = [n.strip() for n in str(v).split(',')]
  if len(names) != c.data.num_classes or not all(names):
    return f'expected {c.data.num_classes} comma-separated names (config.data.num_classes)'
  return None


def respacing(v, c) -> str | None:
  try:
    sdm_fields.space_timesteps(c.diffusion.schedule.diffusion_steps, str(v))
  except (ValueError, TypeError) as e:
    return f"expected '', 'ddimN' or a comma list of step counts ({e})"
  return None


def comma_of(options, allow_empty=False) -> Rule:
  def rule(v, c):
    del c
    items = fields.names(v)
    unknown = [s for s in items if s not in options]
    if unknown or not (items or allow_empty) or len(set(items)) != len(items):
      return (f'expected a comma list of distinct names from {", ".join(options)}'
              + (f'; unknown: {", ".join(unknown)}' if unknown else ''))
    return None
  return rule


def raises(parse: Callable[[ml_collections.ConfigDict], Any]) -> Rule:
  """A field whose runtime parser already raises a ValueError naming it (e.g. `arms.seeds`)."""
  def rule(v, c):
    del v
    parse(c)
  return rule


RULES: dict[str, Rule] = {
    'seed': count(),
    'stages': comma_of(common.ALL_STAGES, allow_empty=True),  # '': set-up only (launch tests).
    'data.name': choice(*sorted(class_tables.FIXED), 'nuclei_folder'),
    'data.labels': choice('original', 'merged'),
    'data.num_classes': number(2, integer=True),
    'data.class_names': class_names,
    'data.crop_size': positive_int(),
    'data.mpp': number(0.0, 100.0, lo_open=True),
    'data.num_workers': count(),
    'data.conic.test_fraction': number(0.0, 1.0, lo_open=True, hi_open=True),
    'data.conic.split_seed': count(),
    'data.pannuke.train_folds': comma_of(('1', '2', '3')),
    'data.pannuke.test_folds': comma_of(('1', '2', '3')),
    'data.prefetch': positive_int(),
    'mesh.data': positive_int(also=(-1,)),
    'mesh.num_processes': positive_int(also=(-1,)),
    'mesh.process_id': count(also=(-1,)),
    'mesh.initialization_timeout': positive_int(),
    'mesh.heartbeat_timeout': positive_int(),
    'diffusion.model.image_size': positive_int(),
    'diffusion.model.num_channels': positive_int(),
    'diffusion.model.num_res_blocks': positive_int(),
    'diffusion.model.channel_mult': comma_numbers(1, allow_empty=True, integer=False),
    'diffusion.model.attention_resolutions': comma_numbers(1, allow_empty=True),
    'diffusion.model.num_heads': positive_int(),
    'diffusion.model.num_head_channels': positive_int(also=(-1,)),
    'diffusion.model.num_classes': number(2, integer=True),
    'diffusion.model.dropout': number(0.0, 1.0, hi_open=True),
    'diffusion.model.dtype': choice(*sdm_fields.DTYPES),
    'diffusion.model.spade_hidden': positive_int(),
    'diffusion.schedule.diffusion_steps': number(2, integer=True),
    'diffusion.schedule.noise_schedule': choice(*sdm_fields.NOISE_SCHEDULES),
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
    'hovernet.model.mode': choice(*geometry.MODES),
    'hovernet.model.nr_types': number(2, integer=True),
    'hovernet.model.encoder_units': comma_numbers(1, n=4),
    'hovernet.model.decoder_units': comma_numbers(1, n=2),
    'hovernet.model.width': choice(1, 2, 4, 8, 16),
    'hovernet.model.head_init': choice(*geometry.HEAD_INITS),
    'hovernet.train.runs': raises(arms.arms),
    'hovernet.train.seeds': raises(arms.seeds),
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
    'eval.f_c_weights': comma_numbers(0, n=4, integer=False),
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
  for field in ('diffusion.model.num_classes', 'hovernet.model.nr_types'):
    if _get(c, field) != c.data.num_classes:
      _fail(field, _get(c, field), f'must equal config.data.num_classes={c.data.num_classes}')
  if c.data.crop_size != c.diffusion.model.image_size:
    _fail('data.crop_size', c.data.crop_size,
          f'must equal config.diffusion.model.image_size={c.diffusion.model.image_size}')
  try:
    sdm_fields.parse_channel_mult(c.diffusion.model.channel_mult, c.diffusion.model.image_size)
  except ValueError as e:
    _fail('diffusion.model.channel_mult', c.diffusion.model.channel_mult, str(e))
  folds = set(fields.names(c.data.pannuke.train_folds)) & set(fields.names(c.data.pannuke.test_folds))
  if folds:
    _fail('data.pannuke.test_folds', c.data.pannuke.test_folds,
          f'fold {sorted(folds)[0]} is also in config.data.pannuke.train_folds')
  b = c.mix.balance
  both = sorted(set(fields.ints(b.rare_classes)) & set(fields.ints(b.common_classes)))
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
  window, (size, _) = c.hovernet.train.patch_window, geometry.PATCH_SHAPES[c.hovernet.model.mode]
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


def tile_names(config: ml_collections.ConfigDict, split: str) -> list[str]:
  """The tiles of `split` a run uses: `config.data.<split>_tiles` as a list ([] = every tile).

  Raises:
    ValueError: a name given twice.
  """
  names = fields.names(config.data[f'{split}_tiles'])
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise ValueError(f'config.data.{split}_tiles: tile(s) {twice} named more than once; expected a '
                     'comma list of distinct tile names')
  return names


def check_tile_names(config: ml_collections.ConfigDict, split: str, available: list[str]) -> None:
  """Raises ValueError naming `config.data.<split>_tiles` if it names a tile not in `available`."""
  known = set(available)
  unknown = [n for n in tile_names(config, split) if n not in known]
  if unknown:
    raise ValueError(f'config.data.{split}_tiles: unknown tile(s) {unknown}; the {split} split of '
                     f'{config.data.name} holds {", ".join(available)}')


def check(c: ml_collections.ConfigDict, workdir: str = '') -> list[str]:
  """Checks the whole config for a run in `workdir`; returns the selected stages, in order.

  Raises:
    ValueError: naming the first bad field, its value and the expected form.
  """
  problem = RULES['data.name'](c.data.name, c)  # Before its class table is looked up.
  if problem:
    _fail('data.name', c.data.name, problem)
  datasets.resolve_classes(c, workdir)  # Class fields left to the dataset's table (0 or '').
  for field, rule in RULES.items():
    problem = rule(_get(c, field), c)
    if problem:
      _fail(field, _get(c, field), problem)
  _check_relations(c)
  stages = fields.names(c.stages)
  _check_paths(c, stages, workdir)
  for split in ('train', 'test'):
    if tile_names(c, split):  # Raises for a name given twice.
      available = tile_names_on_disk(c, split)
      if available is not None:  # Else build_data's folder check above reports it.
        check_tile_names(c, split, available)
  return stages
