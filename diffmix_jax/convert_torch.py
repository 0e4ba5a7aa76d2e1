"""`python -m diffmix_jax.convert_torch --model sdm|hovernet --config C --checkpoint F --out DIR`:
official PyTorch checkpoints to Flax files, and the public loaders `load_sdm`, `load_hovernet`,
`load_hovernet_encoder` (the mappings live in sdm/torch_import.py and hovernet/torch_import.py).

`--model sdm` writes DIR/sdm_params.msgpack (the float32 'params' tree of
`sdm_unet.create_sdm(**config.diffusion.model)`, read back with `core.checkpoint.load_tree`) and
DIR/sdm_model_config.json (the model fields used); `--model hovernet` writes the HoVer-Net variables
and the model fields that rebuild it. Files go to a temporary name, then os.replace.
"""

import json
import os

import ml_collections

from diffmix_jax import workdir as wdir
from diffmix_jax.core import checkpoint as ckpt
from diffmix_jax.hovernet import torch_import as hovernet_torch
from diffmix_jax.sdm import torch_import as sdm_torch

# The public loaders (README "Importing official checkpoints").
load_sdm = sdm_torch.load_sdm
load_hovernet = hovernet_torch.load_hovernet
load_hovernet_encoder = hovernet_torch.load_hovernet_encoder

HOVERNET_VARIABLES = 'hovernet_variables.msgpack'  # What `convert --model hovernet` writes ...
HOVERNET_CONFIG = 'hovernet_model_config.json'  # ... and the model fields that rebuild the module.


def hovernet_model_fields(module) -> dict:
  """The `config.hovernet.model` fields that rebuild `module` (hovernet.model.create_hovernet)."""
  return {'mode': module.mode, 'nr_types': module.nr_types or 0,
          'encoder_units': list(module.encoder_units), 'decoder_units': list(module.decoder_units),
          'width': module.width, 'split_grouped_convs': module.split_grouped_convs,
          'head_init': module.head_init}


def convert(model: str, config: ml_collections.ConfigDict, checkpoint: str, out_dir: str) -> str:
  """Converts `checkpoint` for `model` ('sdm' | 'hovernet') into `out_dir`; returns the params path."""
  if model == 'hovernet':
    module, variables = load_hovernet(checkpoint, config.hovernet.model.mode,
                                      config.hovernet.model.nr_types)
    out = os.path.join(out_dir, HOVERNET_VARIABLES)
    ckpt.save_tree(out, variables)
    cfg = json.dumps(hovernet_model_fields(module), indent=2).encode()
    wdir.atomic_write(os.path.join(out_dir, HOVERNET_CONFIG), cfg)
    return out
  if model != 'sdm':
    raise ValueError(f'--model={model!r}; expected sdm or hovernet')
  _, params = load_sdm(checkpoint, config.diffusion.model)
  out = os.path.join(out_dir, 'sdm_params.msgpack')
  ckpt.save_tree(out, params)
  cfg = json.dumps(config.diffusion.model.to_dict(), indent=2, sort_keys=True).encode()
  wdir.atomic_write(os.path.join(out_dir, 'sdm_model_config.json'), cfg)
  return out


def main(argv) -> None:
  """absl entry point (flags defined in the __main__ block)."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from diffmix_jax.data import datasets  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  datasets.resolve_classes(f.config)  # Class counts a config leaves to its dataset's table.
  print(f'wrote {convert(f.model, f.config, f.checkpoint, f.out)}')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file('config', None, 'Experiment config file (e.g. configs/consep.py).',
                                  lock_config=True)
  flags.DEFINE_enum('model', 'sdm', ['sdm', 'hovernet'], 'Which network the checkpoint holds.')
  flags.DEFINE_string('checkpoint', None, 'PyTorch checkpoint (.pt state dict).')
  flags.DEFINE_string('out', None, 'Output folder for <model>_params.msgpack and its config JSON.')
  flags.mark_flags_as_required(['config', 'checkpoint', 'out'])
  app.run(main)
