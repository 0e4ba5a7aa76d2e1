"""Stage `diffusion_train`: SDM training, both DiffMix phases, data-parallel, EMA, resumable.

Phase 1 (conditional, label drop 0, lr 1e-4) then phase 2 (classifier-free fine-tune: the whole
condition dropped with probability 0.2, lr 2e-5) continue one run: the step counter, params, EMA and
Adam moments carry over, only the learning rate and drop rate change at `phase1_steps`
(docs/sdm.md §4). The steps run in `core.loop.Loop`, one call per phase. Outputs under
`<workdir>/diffusion/`: orbax checkpoints, TensorBoard events, `ema_params.msgpack` (the EMA weights
the sample stage uses) and `DONE`.
"""

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from diffmix_jax import workdir as wdir
from diffmix_jax.core import checkpoint
from diffmix_jax.core import loop as loop_lib
from diffmix_jax.core import sharding
from diffmix_jax.data import input_pipeline
from diffmix_jax.data import labels
from diffmix_jax.sdm import diffusion as gd
from diffmix_jax.sdm import samplers
from diffmix_jax.sdm import training as sdm_training
from diffmix_jax.stages import figures


def sample_grid(ema, module, local: dict, y: np.ndarray, respacing: str, seed: int) -> np.ndarray:
  """Rows of (label in colour, real crop, EMA sample from the same label), up to 4 examples.

  Args:
    ema: the EMA params (host or local arrays).
    local: the process's batch: `image` float32 [B, S, S, 3], `type_map`, `inst_map` int [B, S, S].
    y: float32 [B, S, S, Cy], its condition.

  Returns:
    uint8 [n*S, 3*S, 3], n = min(4, B).
  """
  n = min(4, y.shape[0])
  diff = gd.create_diffusion(timestep_respacing=respacing)
  noise = jax.random.normal(jax.random.key(seed), (n,) + local['image'].shape[1:])
  sample = jax.jit(lambda e, z, yy: samplers.ddim_sample_loop(
      diff, lambda x, tt, c: module.apply({'params': e}, x, tt, c), z, yy))(ema, noise, y[:n])
  colour = labels.colour_labels(local['type_map'][:n], labels.edge_map(local['inst_map'][:n]))
  return figures.image_grid([colour, figures.to_uint8(local['image'][:n]),
                             figures.to_uint8(jax.device_get(sample))])


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
  start, state, data_state = loop_lib.restore_or_init(
      manager, trainer.abstract_state, trainer.state_sharding,
      lambda: trainer.init(jax.random.key(config.seed)), 'diffusion_train')

  source = input_pipeline.source_for(config, workdir, 'train')
  ds = input_pipeline.train_dataset(
      source, crop_size=config.data.crop_size, global_batch=tc.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  it = iter(ds)
  if data_state is not None:
    it.set_state(data_state)

  def batches():  # (local batch, its condition y); read one step at a time (the saved state).
    while True:
      local = next(it)
      yield local, sdm_training.make_condition(local, mc)

  def step_fn(state, batch, step):
    del step  # The jitted step reads the phase from state.step.
    return trainer.step(state, sharding.global_batch({'image': batch[0]['image'], 'y': batch[1]},
                                                     mesh))

  loop = loop_lib.Loop.create('diffusion_train', out.tensorboard, total=total,
                              log_every=tc.log_every_steps, manager=manager, config=config,
                              state=state, start=start)

  def preview(done, state, batch):
    if tc.sample_every_steps and done % tc.sample_every_steps == 0:
      ema = sdm_training.local_ema(state.ema, config.mesh.shard_opt_state)
      grid = sample_grid(ema, trainer.module, batch[0], batch[1], tc.sample_respacing,
                         config.seed + done)
      loop.writer.write_images(done, {'label_real_ema_sample': grid[None]})

  stream = batches()
  for phase, (lo, hi) in enumerate(((0, tc.phase1_steps), (tc.phase1_steps, total)), start=1):
    state = loop.run(state, range(max(start, lo), hi), stream, step_fn, phase=phase,
                     rows=tc.batch_size, checkpoint_every=tc.checkpoint_every_steps,
                     data_state=lambda done: it.get_state(), after_step=preview)
  loop.finish()
  ema = multihost_utils.process_allgather(state.ema, tiled=True)  # Host NumPy, all processes.
  if jax.process_index() == 0:
    checkpoint.save_tree(out.path / wdir.EMA_PARAMS, ema)
    out.mark_done({'steps': total})
  logging.info('diffusion_train: finished %d steps', total)
