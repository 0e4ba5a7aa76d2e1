"""Stage `diffusion_train`: SDM training, both DiffMix phases, data-parallel, EMA, resumable.

Phase 1 (conditional, label drop 0, lr 1e-4) then phase 2 (classifier-free fine-tune: the whole
condition dropped with probability 0.2, lr 2e-5) continue one run: the step counter, params, EMA and
Adam moments carry over, only the learning rate and drop rate change at `phase1_steps` (sdm.md §4).
Outputs under `<workdir>/diffusion/`: orbax checkpoints, TensorBoard events, `ema_params.msgpack`
(the EMA weights the sample stage uses) and `DONE`.
"""

import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections

from diffmix_jax.core import checkpoint
from diffmix_jax.data import input_pipeline
from diffmix_jax.core import sharding
from diffmix_jax import workdir as wdir
from diffmix_jax.core import train_loop as train_lib
from diffmix_jax.sdm import training as sdm_training



def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains the SDM through both phases; resumes from the newest checkpoint; no-op when done."""
  out = wdir.StageDir(workdir, wdir.DIFFUSION)
  if out.done():
    logging.info('diffusion_train: already done (%s)', out.path)
    return
  tc, mc = config.diffusion.train, config.diffusion.model
  mesh = sharding.create_mesh(config.mesh)
  trainer = sdm_training.create_trainer(config, mesh)
  total = tc.phase1_steps + tc.phase2_steps
  manager = checkpoint.create_manager(out.checkpoints, tc.keep_checkpoints)
  restored = checkpoint.restore_latest(
      manager, checkpoint.abstract(trainer.abstract_state, trainer.state_sharding))
  if restored is None:
    state, data_state, start = trainer.init(jax.random.key(config.seed)), None, 0
  else:
    start, state, data_state = restored
    logging.info('diffusion_train: resumed from step %d', start)
  train_lib.check_finite(int(state.first_bad_step), 'diffusion_train (restored state)')

  source = input_pipeline.source_for(config, workdir, 'train')
  ds = input_pipeline.train_dataset(
      source, crop_size=config.data.crop_size, global_batch=tc.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  it = iter(ds)
  if data_state is not None:
    it.set_state(data_state)

  writer = train_lib.create_writer(out.tensorboard)
  if start == 0:
    train_lib.log_overview(config, jax.device_get(state.params))
  progress = train_lib.create_progress(total)
  last_log, last_time = start, time.time()
  for step in range(start, total):
    local = next(it)
    y = sdm_training.make_condition(local, mc)
    batch = sharding.global_batch({'image': local['image'], 'y': y}, mesh)
    state, metrics = trainer.step(state, batch)
    done = step + 1
    progress(done)
    if done % tc.log_every_steps == 0 or done == total:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      train_lib.check_finite(int(state.first_bad_step), 'diffusion_train')
      rate = (done - last_log) / max(time.time() - last_time, 1e-9)
      metrics.update(steps_per_sec=rate, images_per_sec=rate * tc.batch_size,
                     phase=1.0 if step < tc.phase1_steps else 2.0)
      writer.write_scalars(done, metrics)
      last_log, last_time = done, time.time()
    if done % tc.checkpoint_every_steps == 0 or done in (tc.phase1_steps, total):
      train_lib.check_finite(int(state.first_bad_step), 'diffusion_train')
      checkpoint.save(manager, done, state, it.get_state())
    if tc.sample_every_steps and done % tc.sample_every_steps == 0:
      grid = sdm_training.sample_grid(sdm_training.local_ema(state.ema, config.mesh.shard_opt_state), trainer.module, local,
                          y, tc.sample_respacing, config.seed + done)
      writer.write_images(done, {'label_real_ema_sample': grid[None]})
  checkpoint.wait(manager)
  writer.flush()
  ema = multihost_utils.process_allgather(state.ema, tiled=True)  # Host NumPy, all processes.
  if jax.process_index() == 0:
    checkpoint.save_tree(out.path / wdir.EMA_PARAMS, ema)
    out.mark_done({'steps': total})
  logging.info('diffusion_train: finished %d steps', total)
