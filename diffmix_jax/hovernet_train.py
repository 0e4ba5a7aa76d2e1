"""Stage `hovernet_train`: HoVer-Net on real (+ synthetic) patches, both phases, data-parallel, resumable.

For each run of `config.hovernet.train.runs` (`baseline`: real patches only; `diffmix`: real plus the
synthetic set under `<workdir>/synthetic/`), phase 1 (encoder frozen as a gradient path, §1.5) then
phase 2 (all trainable, fresh Adam, restarted StepLR), hovernet.md §3. Outputs under
`<workdir>/hovernet_<run>/`: orbax checkpoints, TensorBoard events, `variables.msgpack` (eval
variables for the evaluate stage) and `DONE`.
"""

import dataclasses
import functools
import os
import time
from typing import Any, Callable

from absl import logging
import flax
from flax import serialization
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffmix_jax import checkpoint
from diffmix_jax import convert_hovernet
from diffmix_jax import convert_torch
from diffmix_jax import evaluate
from diffmix_jax import hovernet_data
from diffmix_jax import hovernet_infer
from diffmix_jax import hovernet_targets
from diffmix_jax import input_pipeline
from diffmix_jax import labels
from diffmix_jax import sharding
from diffmix_jax import stage_files
from diffmix_jax import train_lib
from diffmix_jax.models import hovernet

RUNS = ('baseline', 'diffmix')


# ---------------------------------------------------------------- losses -------------------------

def xentropy(logits: jax.Array, labels_: jax.Array, n: int,
             class_weights: jax.Array | None = None) -> jax.Array:
  """CE of §3.1: softmax, clamp to [1e-7, 1 - 1e-7], mean over N*H*W; with `class_weights` [n]
  the mean is weighted by the weight of each pixel's label (sum w_y CE / sum w_y)."""
  p = jnp.clip(jax.nn.softmax(logits, axis=-1), 1e-7, 1.0 - 1e-7)
  ce = -jnp.sum(jax.nn.one_hot(labels_, n) * jnp.log(p), axis=-1)
  if class_weights is None:
    return jnp.mean(ce)
  w = jnp.asarray(class_weights, jnp.float32)[labels_]
  return jnp.sum(w * ce) / jnp.sum(w)


def dice_loss(logits: jax.Array, labels_: jax.Array, n: int) -> jax.Array:
  """Dice of §3.1 summed over all channels, background included, smoothing 1e-3."""
  p, y = jax.nn.softmax(logits, axis=-1), jax.nn.one_hot(labels_, n)
  inter = jnp.sum(p * y, axis=(0, 1, 2))
  return jnp.sum(1.0 - (2.0 * inter + 1e-3) / (jnp.sum(p, (0, 1, 2)) + jnp.sum(y, (0, 1, 2)) + 1e-3))


def _msge_kernel() -> np.ndarray:
  """[5, 5, 1, 2] HWIO: out channel 0 = K_row (applied to x), 1 = K_col (applied to y), §3.1."""
  a, b = np.meshgrid(np.arange(-2, 3), np.arange(-2, 3), indexing='ij')  # a = row, b = column.
  den = a * a + b * b + 1e-15
  return np.stack([a / den, b / den], axis=-1)[:, :, None, :].astype(np.float32)


def hv_gradient(hv: jax.Array) -> jax.Array:
  """G(hv) of §3.1 (the shipped cross-derivative form, pitfall 10): [N, H, W, 2] -> same."""
  return jax.lax.conv_general_dilated(hv, jnp.asarray(_msge_kernel()), (1, 1), [(2, 2), (2, 2)],
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      feature_group_count=2)


def msge_loss(pred: jax.Array, true: jax.Array, nuclei: jax.Array) -> jax.Array:
  """Sum m (G(pred) - G(true))^2 / (sum m + 1e-8), m = NP mask on both channels (§3.1)."""
  m = jnp.repeat(nuclei[..., None].astype(jnp.float32), 2, axis=-1)
  d = hv_gradient(pred) - hv_gradient(true)
  return jnp.sum(m * d * d) / (jnp.sum(m) + 1e-8)


def compute_losses(out: dict, batch: dict, nr_types: int | None, mse_weight: float,
                   tp_weights=None) -> dict:
  """All loss terms and the total (§3.1; weights 1, MSE weighted by `mse_weight`); `tp_weights`
  [nr_types] weights the TP cross-entropy by class (`hovernet_targets.tp_class_weights`)."""
  t = {'np_ce': xentropy(out['np'], batch['np'], 2), 'np_dice': dice_loss(out['np'], batch['np'], 2),
       'hv_mse': jnp.mean((out['hv'] - batch['hv']) ** 2),
       'hv_msge': msge_loss(out['hv'], batch['hv'], batch['np'])}
  if nr_types:
    t['tp_ce'] = xentropy(out['tp'], batch['tp'], nr_types, tp_weights)
    t['tp_dice'] = dice_loss(out['tp'], batch['tp'], nr_types)
  t['loss'] = sum(v * (mse_weight if k == 'hv_mse' else 1.0) for k, v in t.items())
  return t


# ---------------------------------------------------------------- state and step -----------------

@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 [], steps done over both phases.
  params: Any
  batch_stats: Any
  opt_state: Any
  first_bad_step: jax.Array  # int32 [], first step with a non-finite loss, -1 if none.


def _frozen_mask(tree) -> Any:
  """Pytree of bools: True where a leaf is frozen in phase 1 (hovernet.md §1.5)."""
  flat = traverse_util.flatten_dict(tree)
  return traverse_util.unflatten_dict({p: hovernet.is_frozen_in_phase1(p) for p in flat})


def train_step(state: TrainState, batch: dict, lr: jax.Array, *, module, tx, phase1: bool,
               mse_weight: float, freeze_bn_stats: bool, tp_weights: tuple | None = None
               ) -> tuple[TrainState, dict]:
  """One Adam step on the §3.1 loss; phase 1 freezes the encoder as a gradient path (pitfall 1).

  Args:
    state: the train state (donated).
    batch: `image` uint8 [B, I, I, 3]; `np`, `tp` int32 [B, O, O]; `hv` float32 [B, O, O, 2].
    lr: float32 [] learning rate of this step (`Trainer.lr`). An argument, not a schedule baked
      into the step, so runs that differ only in their step counts share one compiled step (the
      persistent compilation cache then skips the second run's compile).
    tx: `ADAM`, the Adam direction without the learning rate.

  Returns:
    (new state, metrics of float32 scalars); a non-finite loss keeps the old state.
  """
  def loss_fn(params):
    out, upd = module.apply({'params': params, 'batch_stats': state.batch_stats},
                            batch['image'].astype(jnp.float32), train=True, freeze=phase1,
                            mutable=['batch_stats'])
    terms = compute_losses(out, batch, module.nr_types, mse_weight, tp_weights)
    return terms['loss'], (terms, upd['batch_stats'])

  (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if phase1:  # Belt and braces: frozen leaves get exactly zero gradient (Adam then moves nothing).
    grads = jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, grads, _frozen_mask(grads))
    if freeze_bn_stats:
      batch_stats = jax.tree.map(lambda new, old, f: old if f else new, batch_stats,
                                 state.batch_stats, _frozen_mask(batch_stats))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, jax.tree.map(lambda u: -lr * u, updates))
  finite = jnp.isfinite(loss)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
      step=state.step + 1, params=keep(params, state.params),
      batch_stats=keep(batch_stats, state.batch_stats), opt_state=keep(opt_state, state.opt_state),
      first_bad_step=jnp.where((state.first_bad_step < 0) & ~finite, state.step,
                               state.first_bad_step))
  metrics = dict(terms, grad_norm=optax.global_norm(grads))
  return new_state, metrics


# optax.adam(lr) is this chain followed by a scale of -lr, which train_step applies itself.
ADAM = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)


def step_lr(lr: float, decay_steps: int, gamma: float, count: int) -> np.float32:
  """StepLR stepped per epoch (§3.2): lr until `decay_steps` optimizer steps, then lr * gamma."""
  return np.float32(lr if count < decay_steps else lr * gamma)


@dataclasses.dataclass
class Trainer:
  module: hovernet.HoVerNet
  abstract_state: TrainState
  state_sharding: Any
  init: Callable[[jax.Array], TrainState]
  steps: tuple[Callable, Callable]  # Jitted phase-1/2 (state, batch, lr) steps (donate the state).
  lr: Callable[[int, int], np.float32]  # (phase 0|1, optimizer step within the phase) -> lr.
  reset_optimizer: Callable[[TrainState], TrainState]  # Fresh phase-2 Adam (moments and count).


def create_trainer(config: ml_collections.ConfigDict, mesh, steps_per_epoch: tuple[int, int],
                   tp_weights: np.ndarray | None = None):
  """Model, the two optimizers (same structure, own schedules), shardings, jitted init and steps;
  `tp_weights` [nr_types] (or None) weights the TP cross-entropy, a constant of the steps."""
  tc = config.hovernet.train
  module = hovernet.create_hovernet(config.hovernet.model)
  size = module.patch_shapes[0]

  def init(rng):
    v = module.init(rng, jnp.zeros((1, size, size, 3)))
    return TrainState(step=jnp.zeros((), jnp.int32), params=v['params'],
                      batch_stats=v['batch_stats'], opt_state=ADAM.init(v['params']),
                      first_bad_step=jnp.full((), -1, jnp.int32))

  abstract_state = jax.eval_shape(init, jax.random.key(0))
  state_sh = sharding.state_shardings(abstract_state, mesh, False)
  steps = tuple(jax.jit(
      functools.partial(train_step, module=module, tx=ADAM, phase1=p == 0,
                        mse_weight=tc.mse_weight, freeze_bn_stats=tc.phase1_freeze_bn_stats,
                        tp_weights=None if tp_weights is None else tuple(map(float, tp_weights))),
      in_shardings=(state_sh, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0) for p in (0, 1))
  reset = jax.jit(lambda s: s.replace(opt_state=ADAM.init(s.params)),
                  in_shardings=(state_sh,), out_shardings=state_sh, donate_argnums=0)
  lr = lambda phase, count: step_lr(tc.lr, tc.lr_step_epochs * steps_per_epoch[phase],
                                    tc.lr_gamma, count)
  return Trainer(module, abstract_state, state_sh, train_lib.jit_init(init, state_sh), steps, lr,
                 reset)


# ---------------------------------------------------------------- validation ---------------------

def validate(module, variables, tiles: list[dict], batch_size: int, eval_config) -> tuple[dict, Any]:
  """Tiled inference + post-processing + `evaluate.evaluate_arrays` on validation tiles.

  Returns:
    (scalars dice, aji, pq, f_d, acc; overlay image uint8 [H, 3W, 3] of the first tile:
    image | truth | prediction, instance edges drawn in their type colour).
  """
  predict = hovernet_infer.create_predictor(module, variables, batch_size)
  pairs, names, overlay = [], [], None
  for t in tiles:
    pred = hovernet_infer.predict_record(predict, module, t['image'])
    pairs.append((hovernet_infer.true_record(t['inst_map'], t['type_map']), pred))
    names.append(t['name'])
    if overlay is None:
      pred_types = np.zeros_like(pred['inst_map'])
      for uid, typ in zip(pred['inst_uid'], pred['inst_type']):
        pred_types[pred['inst_map'] == uid] = typ
      draw = lambda inst, typ: np.where(labels.edge_map(inst)[..., None],
                                        train_lib.colour_labels(typ), t['image'])
      overlay = np.concatenate([t['image'], draw(t['inst_map'], t['type_map']),
                                draw(pred['inst_map'], pred_types)], axis=1).astype(np.uint8)
  m = evaluate.evaluate_arrays(pairs, names=names, radius=eval_config.match_radius,
                               weights=[float(v) for v in eval_config.f_c_weights.split(',')])
  return {f'val_{k}': float(m[k]) for k in ('dice', 'aji', 'pq', 'f_d', 'acc')}, overlay


# ---------------------------------------------------------------- stage --------------------------

def _training_data(config: ml_collections.ConfigDict, workdir: str, run: str, mesh,
                   tiles: list[dict] | None, val_tiles: list[dict] | None):
  """The run's patch set, validation tiles, steps per epoch and per phase, and TP class weights.

  Raises:
    ValueError: naming the config field, when a phase's batch does not fit the mesh or the patches.
  """
  tc = config.hovernet.train
  synthetic = []
  if run == 'diffmix':
    synthetic = hovernet_data.read_synthetic(hovernet_data.synthetic_folder(config, workdir))
  if tiles is None:
    tiles = input_pipeline.load_split(config, workdir, 'train')
  if val_tiles is None:
    val_tiles = (input_pipeline.load_split(config, workdir, 'test')[:tc.val_tiles]
                 if tc.val_tiles else [])
  patches = hovernet_data.PatchSet(tiles, synthetic, tc.patch_window, tc.patch_step,
                                   tc.synthetic_ratio)
  if len(patches.synthetic) != len(synthetic):
    logging.info('hovernet_train %s: %d synthetic patches packed into %d windows', run,
                 len(synthetic), len(patches.synthetic))
  batches = (tc.phase1_batch_size, tc.phase2_batch_size)
  for b, field in zip(batches, ('phase1_batch_size', 'phase2_batch_size')):
    sharding.check_batch(b, mesh, f'hovernet.train.{field}')
    if len(patches) < b:
      raise ValueError(f'config.hovernet.train.{field}={b} exceeds the {len(patches)} patches')
  spe = tuple(len(patches) // b for b in batches)
  phase_steps = (tc.phase1_epochs * spe[0], tc.phase2_epochs * spe[1])
  tp_weights = (hovernet_targets.tp_class_weights(
      [t['type_map'] for t in tiles], config.hovernet.model.nr_types, tc.tp_class_weighting)
                if config.hovernet.model.nr_types else None)
  if tp_weights is not None:  # From the real tiles only: every run weights its loss alike.
    logging.info('hovernet_train %s: TP cross-entropy class weights %s', run, np.round(tp_weights, 4))
  return patches, val_tiles, spe, phase_steps, tp_weights


def _variables(state: TrainState) -> dict:
  """Host copy of the eval variables {'params', 'batch_stats'}."""
  return jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})


def load_pretrained(trainer: Trainer, state: TrainState, path: str) -> TrainState:
  """The state with the encoder (conv0, d0-d3) of an ImageNet file (hovernet.md §3.3)."""
  variables, report = convert_torch.load_hovernet_encoder(path, _variables(state))
  logging.info('hovernet_train: encoder from %s: %s', path, convert_hovernet.describe(report))
  sh = trainer.state_sharding
  return state.replace(params=sharding.put_global(variables['params'], sh.params),
                       batch_stats=sharding.put_global(variables['batch_stats'], sh.batch_stats))


def _initial_state(trainer: Trainer, manager, config, run: str) -> tuple[TrainState, int]:
  """(state, step): the latest checkpoint's, else a fresh state with the ImageNet encoder if set."""
  restored = checkpoint.restore_latest(
      manager, checkpoint.abstract(trainer.abstract_state, trainer.state_sharding))
  if restored is not None:
    logging.info('hovernet_train: run %s resumed from step %d', run, restored[0])
    return restored[1], restored[0]
  state, path = trainer.init(jax.random.key(config.seed)), config.hovernet.train.pretrained
  return (load_pretrained(trainer, state, path) if path else state), 0


def _write_validation(writer, step: int, module, state: TrainState, val_tiles: list[dict],
                      eval_config) -> None:
  """Validation metrics and the truth/prediction overlay of the first tile, to TensorBoard."""
  val, overlay = validate(module, _variables(state), val_tiles, eval_config.batch_size, eval_config)
  writer.write_scalars(step, val)
  writer.write_images(step, {'val_image_truth_prediction': overlay[None]})


def _write_variables(out: stage_files.StageDir, state: TrainState, done_info: dict) -> None:
  """The eval variables for the evaluate stage, then DONE (process 0)."""
  variables = _variables(state)
  if jax.process_index() == 0:
    out.write_bytes(hovernet_infer.VARIABLES_FILE, serialization.to_bytes(variables))
    out.mark_done(done_info)


def train_run(config: ml_collections.ConfigDict, workdir: str, run: str,
              tiles: list[dict] | None = None, val_tiles: list[dict] | None = None) -> None:
  """Trains one run through both phases; resumes; no-op when its DONE marker exists.

  Args:
    config: the full config.
    workdir: the run's workdir.
    run: 'baseline' or 'diffmix'.
    tiles: training tiles (default: the dataset's train split); `name`, `image` uint8 [H, W, 3],
      `inst_map`, `type_map` int32 [H, W].
    val_tiles: validation tiles (default: the first `val_tiles` tiles of the test split).
  """
  if run not in RUNS:
    raise ValueError(f'config.hovernet.train.runs: unknown run {run!r}; expected a comma list of '
                     f'{", ".join(RUNS)}')
  out = stage_files.StageDir(workdir, f'hovernet_{run}')
  if out.done():
    logging.info('hovernet_train: run %s already done (%s)', run, out.path)
    return
  tc = config.hovernet.train
  mesh = sharding.create_mesh(config.mesh)
  patches, val_tiles, spe, phase_steps, tp_weights = _training_data(config, workdir, run, mesh,
                                                                    tiles, val_tiles)
  batches = (tc.phase1_batch_size, tc.phase2_batch_size)
  total = sum(phase_steps)
  trainer = create_trainer(config, mesh, spe, tp_weights)
  input_size, output_size = trainer.module.patch_shapes
  manager = checkpoint.create_manager(os.path.join(out.path, 'checkpoints'), tc.keep_checkpoints)
  state, start = _initial_state(trainer, manager, config, run)
  train_lib.check_finite(int(state.first_bad_step), f'hovernet_train {run} (restored state)')
  writer = train_lib.create_writer(os.path.join(out.path, 'tb'))
  if start == 0:
    train_lib.log_overview(config, jax.device_get(state.params))
  progress = train_lib.create_progress(total)
  logging.info('hovernet_train %s: %d patches (%d synthetic), %d + %d steps', run, len(patches),
               patches.num_synthetic, *phase_steps)
  for phase in (0, 1):
    lo, hi = (0, phase_steps[0]) if phase == 0 else (phase_steps[0], total)
    if start >= hi:
      continue
    if phase == 1 and start == phase_steps[0]:
      state = trainer.reset_optimizer(state)  # Weights only carry over (§3.2).
    it = hovernet_data.create_dataset(
        patches, phase_seed=config.seed * 7919 + 2 * RUNS.index(run) + phase,
        global_batch=batches[phase], start=max(start, lo) - lo, total=hi - lo,
        input_size=input_size, output_size=output_size, augment=tc.augment,
        num_threads=tc.loader_threads)
    last_time, last_log = time.time(), max(start, lo)
    for step in range(max(start, lo), hi):
      batch = sharding.global_batch(next(it), mesh)
      state, metrics = trainer.steps[phase](state, batch, trainer.lr(phase, step - lo))
      done = step + 1
      progress(done)
      epoch_end = (done - lo) % spe[phase] == 0
      if done % tc.log_every_steps == 0 or epoch_end:
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        train_lib.check_finite(int(state.first_bad_step), f'hovernet_train {run}')
        rate = (done - last_log) / max(time.time() - last_time, 1e-9)
        scalars.update(images_per_sec=rate * batches[phase], phase=float(phase + 1),
                       lr=float(trainer.lr(phase, done - lo - 1)))
        writer.write_scalars(done, scalars)
        last_time, last_log = time.time(), done
      if epoch_end:
        epoch = (done - lo) // spe[phase]
        if val_tiles and jax.process_index() == 0 and epoch % tc.val_every_epochs == 0:
          _write_validation(writer, done, trainer.module, state, val_tiles, config.eval)
        if epoch % tc.checkpoint_every_epochs == 0 or done in (phase_steps[0], total):
          train_lib.check_finite(int(state.first_bad_step), f'hovernet_train {run}')
          checkpoint.save(manager, done, state, {'step': done})
    start = hi
  checkpoint.wait(manager)
  writer.flush()
  _write_variables(out, state, {'steps': total, 'patches': len(patches),
                                'synthetic': patches.num_synthetic})
  logging.info('hovernet_train: run %s finished %d steps', run, total)


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains every run of `config.hovernet.train.runs` (hovernet.md §3)."""
  for name in [r.strip() for r in config.hovernet.train.runs.split(',') if r.strip()]:
    train_run(config, workdir, name)
