"""HoVer-Net training runs: the ablation arms, the seeds, and the name of each arm x seed.

An arm says which synthetic patches join the real ones (docs/method.md §5): `baseline` none,
`balancing` those rendered from balancing maps, `enlarging` those from enlarging maps, `diffmix`
both. `hovernet.train.runs` lists the arms, `hovernet.train.seeds` the HoVer-Net seeds; every
arm x seed is its own resumable run in `<workdir>/hovernet_<name>/`, scored in `eval/<name>.json`,
where the name is the arm for seed 0 and `<arm>_s<seed>` otherwise. Seed s derives every HoVer-Net
random stream from (`config.seed`, s) only, never from the arm, so runs of one seed are paired.
"""

import ml_collections

# Arm -> the mixing kinds (`mixing.files.KINDS`) of the synthetic patches it trains on.
ARMS = {'baseline': (), 'balancing': ('balance',), 'enlarging': ('enlarge',),
        'diffmix': ('balance', 'enlarge')}


def arms(config: ml_collections.ConfigDict) -> list[str]:
  """The arms of `hovernet.train.runs`, in the given order (checked by config_checks)."""
  return list(config.hovernet.train.runs)


def seeds(config: ml_collections.ConfigDict) -> list[int]:
  """The HoVer-Net seeds of `hovernet.train.seeds`, in the given order (checked by config_checks)."""
  return [int(s) for s in config.hovernet.train.seeds]


def run_name(arm: str, seed: int) -> str:
  """`arm` for seed 0 (the single-seed layout), `<arm>_s<seed>` otherwise."""
  return arm if seed == 0 else f'{arm}_s{seed}'


def runs(config: ml_collections.ConfigDict) -> list[tuple[str, int]]:
  """Every (arm, seed) to train and score: seeds outer, so a killed study has whole seeds done."""
  return [(arm, s) for s in seeds(config) for arm in arms(config)]


def fidelity_run(config: ml_collections.ConfigDict) -> str | None:
  """The run whose model scores the synthetic set (the first seed's baseline), or None."""
  return run_name('baseline', seeds(config)[0]) if 'baseline' in arms(config) else None
