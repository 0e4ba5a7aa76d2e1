"""Stage `hovernet_train`: HoVer-Net on real (+ synthetic) patches, both phases, data-parallel, resumable.

For each arm x seed of `config.hovernet.train.runs` x `seeds` (`arms`: `baseline` real windows only;
`balancing`, `enlarging`, `diffmix` add synthetic patches of their kinds from `<workdir>/synthetic/`
to every batch), phase 1 (encoder frozen as a gradient path, docs/hovernet.md §1.5) then phase 2
(all trainable, fresh Adam, restarted StepLR), docs/hovernet.md §3; both in `core.loop.Loop`.
Outputs under `<workdir>/hovernet_<run>/`
(`arms.run_name`): orbax checkpoints, TensorBoard events, `variables.msgpack` (eval variables for
the evaluate stage) and `DONE`.
"""

import dataclasses

from absl import logging
import jax
import ml_collections
import numpy as np

from diffmix_jax.core import arms
from diffmix_jax.core import checkpoint
from diffmix_jax.hovernet import patches as hovernet_data
from diffmix_jax.hovernet import targets as hovernet_targets
from diffmix_jax.hovernet import validation as hovernet_validation
from diffmix_jax.data import input_pipeline
from diffmix_jax.core import loop as loop_lib
from diffmix_jax.core import sharding
from diffmix_jax import workdir as wdir
from diffmix_jax.hovernet import training as hovernet_training


@dataclasses.dataclass
class RunData:
  """What one run trains on: real windows, its synthetic items, batch shapes and step counts."""
  real: hovernet_data.PatchSet
  synthetic: list[dict]  # Packed synthetic items of the arm's kinds ([] for baseline).
  val_tiles: list[dict]
  real_batch: tuple[int, int]  # Real rows per batch, phases 1 and 2 (the phase batch sizes).
  synthetic_batch: tuple[int, int]  # Synthetic rows per batch beside them (0 for baseline).
  steps_per_epoch: tuple[int, int]  # Epochs are of the real windows: the same for every arm.
  phase_steps: tuple[int, int]
  tp_weights: np.ndarray | None
  val_folder: str = ''  # Where processes leave validation records for process 0.


def _training_data(config: ml_collections.ConfigDict, workdir: str, arm: str, mesh,
                   tiles: list[dict] | None, val_tiles: list[dict] | None) -> RunData:
  """The run's real windows and synthetic items, batch shapes, steps and TP class weights.

  Every arm trains the same steps on the same real batches (they depend on the real set and the
  phase batch sizes only); an arm with synthetic data adds `synthetic_batch` rows to each batch.

  Raises:
    ValueError: naming the config field, when a phase's batch does not fit the mesh or the patches.
  """
  tc = config.hovernet.train
  synthetic = []
  if arms.ARMS[arm]:
    patches = hovernet_data.read_synthetic(wdir.synthetic_consep_dir(config, workdir),
                                           arms.ARMS[arm])
    synthetic = hovernet_data.synthetic_items(patches, tc.patch_window, tc.patch_step)
  if tiles is None:
    tiles = input_pipeline.load_split(config, workdir, 'train')
  if val_tiles is None:
    val_tiles = (input_pipeline.load_split(config, workdir, 'test')[:tc.val_tiles]
                 if tc.val_tiles else [])
  real = hovernet_data.PatchSet(tiles, tc.patch_window, tc.patch_step)
  batches = (tc.phase1_batch_size, tc.phase2_batch_size)
  epochs = (tc.phase1_epochs, tc.phase2_epochs)
  spe, syn = [], []
  for b, field, e in zip(batches, ('phase1_batch_size', 'phase2_batch_size'), epochs):
    if e and len(real) < b:  # A phase that does not run needs no batch that fits.
      raise ValueError(f'config.hovernet.train.{field}={b} exceeds the {len(real)} real windows')
    spe.append(len(real) // b)
    syn.append(hovernet_data.synthetic_per_batch(tc.synthetic_ratio, b, len(synthetic), spe[-1])
               if synthetic and e else 0)
    if not e:
      continue
    if synthetic and not syn[-1]:
      raise ValueError(f'config.hovernet.train.synthetic_ratio={tc.synthetic_ratio} gives no '
                       f'synthetic row beside the {b} real ones of hovernet.train.{field}: expected '
                       f'>= {0.5 / b:.3g}, or -1 (every synthetic item once per epoch)')
    sharding.check_batch(b + syn[-1], mesh, f'hovernet.train.{field} (+ {syn[-1]} synthetic rows)')
  if synthetic:
    logging.info('hovernet_train %s: %d synthetic items of kind %s, %s per batch', arm,
                 len(synthetic), '+'.join(arms.ARMS[arm]), syn)
  steps = (epochs[0] * spe[0], epochs[1] * spe[1])
  # Pixel shares of the rows the run trains on: real and synthetic windows in their batch ratio.
  rows = [(sum(n * b for n, b in zip(steps, batches)), [t['type_map'] for t in tiles]),
          (sum(n * s for n, s in zip(steps, syn)), [q['type_map'] for q in synthetic])]
  tp_weights = (hovernet_targets.tp_class_weights(
      [(maps, r) for r, maps in rows if r], config.hovernet.model.nr_types, tc.tp_class_weighting)
                if config.hovernet.model.nr_types else None)
  if tp_weights is not None:
    logging.info('hovernet_train %s: TP cross-entropy class weights %s', arm, np.round(tp_weights, 4))
  return RunData(real, synthetic, val_tiles, batches, tuple(syn), tuple(spe), steps, tp_weights)


def _initial_state(trainer: hovernet_training.Trainer, manager, config, run: str, seed: int
                   ) -> tuple[hovernet_training.TrainState, int]:
  """(state, step): the latest checkpoint's, else a fresh state (init key from `config.seed` and
  the HoVer-Net seed only) with the ImageNet encoder if set."""
  def init():
    state = trainer.init(jax.random.fold_in(jax.random.key(config.seed), seed))
    path = config.hovernet.train.pretrained
    return hovernet_training.load_pretrained(trainer, state, path) if path else state
  start, state, _ = loop_lib.restore_or_init(manager, trainer.abstract_state,
                                             trainer.state_sharding, init, f'hovernet_train {run}')
  return state, start


def _write_validation(writer, step: int, module, state: hovernet_training.TrainState, val_tiles: list[dict],
                      eval_config, folder: str) -> None:
  """Validation over every process (`hovernet_validation`); process 0 writes the metrics and the
  truth/prediction overlay of the first tile to TensorBoard."""
  result = hovernet_validation.validate(module, hovernet_training.eval_variables(state), val_tiles,
                                        eval_config.batch_size, eval_config, folder, step)
  if result is not None:
    writer.write_scalars(step, result[0])
    writer.write_images(step, {'val_image_truth_prediction': result[1][None]})


def _write_variables(out: wdir.StageDir, state: hovernet_training.TrainState, done_info: dict) -> None:
  """The eval variables for the evaluate stage, then DONE (process 0)."""
  variables = hovernet_training.eval_variables(state)
  if jax.process_index() == 0:
    checkpoint.save_tree(out.path / wdir.HOVERNET_VARIABLES, variables)
    out.mark_done(done_info)


def train_run(config: ml_collections.ConfigDict, workdir: str, arm: str, seed: int = 0,
              tiles: list[dict] | None = None, val_tiles: list[dict] | None = None) -> None:
  """Trains one arm x seed through both phases; resumes; no-op when its DONE marker exists.

  Args:
    config: the full config.
    workdir: the run's workdir.
    arm: one of `arms.ARMS` (which synthetic patches join the real ones).
    seed: the HoVer-Net seed; with `config.seed` it fixes init, batch order and augmentation.
    tiles: training tiles (default: the dataset's train split); `name`, `image` uint8 [H, W, 3],
      `inst_map`, `type_map` int32 [H, W].
    val_tiles: validation tiles (default: the first `val_tiles` tiles of the test split).
  """
  if arm not in arms.ARMS:
    raise ValueError(f'config.hovernet.train.runs: unknown arm {arm!r}; expected arms from '
                     f'{", ".join(arms.ARMS)}')
  run = arms.run_name(arm, seed)
  out = wdir.StageDir(workdir, wdir.hovernet_stage(run))
  if out.done():
    logging.info('hovernet_train: run %s already done (%s)', run, out.path)
    return
  tc = config.hovernet.train
  mesh = sharding.create_mesh(config.mesh)
  data = _training_data(config, workdir, arm, mesh, tiles, val_tiles)
  data.val_folder = str(out.path / 'validation')
  spe, phase_steps = data.steps_per_epoch, data.phase_steps
  total = sum(phase_steps)
  trainer = hovernet_training.create_trainer(config, mesh, spe, data.tp_weights)
  input_size, output_size = trainer.module.patch_shapes
  manager = checkpoint.create_manager(out.checkpoints, tc.keep_checkpoints)
  state, start = _initial_state(trainer, manager, config, run, seed)
  loop = loop_lib.Loop.create(f'hovernet_train {run}', out.tensorboard, total=total,
                              log_every=tc.log_every_steps, manager=manager, config=config,
                              state=state, start=start)
  logging.info('hovernet_train %s: %d real windows, %d synthetic items, %d + %d steps', run,
               len(data.real), len(data.synthetic), *phase_steps)
  for phase in (0, 1):
    lo, hi = (0, phase_steps[0]) if phase == 0 else (phase_steps[0], total)
    if start >= hi:
      continue
    if phase == 1 and start == phase_steps[0]:
      state = trainer.reset_optimizer(state)  # Weights only carry over (docs/hovernet.md §3.2).
    it = hovernet_data.create_dataset(
        data.real, data.synthetic, seeds=hovernet_data.Seeds.of(config.seed, seed, phase),
        real_batch=data.real_batch[phase], synthetic_batch=data.synthetic_batch[phase],
        start=max(start, lo) - lo, total=hi - lo, input_size=input_size, output_size=output_size,
        augment=tc.augment, num_threads=tc.loader_threads)
    state = _train_phase(config, loop, phase, (lo, hi), start, it, trainer, state, data, mesh)
    start = hi
  loop.finish()
  _write_variables(out, state, {'arm': arm, 'seed': seed, 'steps': total,
                                'real_windows': len(data.real),
                                'synthetic_items': len(data.synthetic),
                                'synthetic_per_batch': list(data.synthetic_batch)})
  logging.info('hovernet_train: run %s finished %d steps', run, total)


def _train_phase(config, loop: loop_lib.Loop, phase: int, bounds: tuple[int, int], start: int, it,
                 trainer: hovernet_training.Trainer, state: hovernet_training.TrainState,
                 data: RunData, mesh) -> hovernet_training.TrainState:
  """Steps max(start, lo)..hi-1 of one phase in `loop`: its lr per step (a logged scalar),
  validation and checkpoints at epoch ends."""
  tc = config.hovernet.train
  lo, hi = bounds
  spe = data.steps_per_epoch[phase]

  def step_fn(state, batch, step):
    lr = trainer.lr(phase, step - lo)
    state, metrics = trainer.steps[phase](state, sharding.global_batch(batch, mesh), lr)
    return state, dict(metrics, lr=lr)

  def validate(done, state, batch):
    del batch
    epoch, rest = divmod(done - lo, spe)
    if data.val_tiles and not rest and epoch % tc.val_every_epochs == 0:  # Every process: its share.
      _write_validation(loop.writer, done, trainer.module, state, data.val_tiles, config.eval,
                        data.val_folder)

  return loop.run(state, range(max(start, lo), hi), it, step_fn, phase=phase + 1,
                  rows=data.real_batch[phase] + data.synthetic_batch[phase],
                  checkpoint_every=spe * tc.checkpoint_every_epochs, origin=lo, epoch_steps=spe,
                  after_step=validate)


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains every arm x seed of `hovernet.train.runs` x `hovernet.train.seeds` (docs/hovernet.md §3)."""
  for arm, seed in arms.runs(config):
    train_run(config, workdir, arm, seed)
