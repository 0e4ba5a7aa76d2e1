"""The demo as a study: the four arms x three HoVer-Net seeds on the built-in demo set, 2 CPU cores.

  python -m diffmix_jax.main --config configs/demo_study.py --workdir runs/demo_study

Everything but HoVer-Net is the demo's (configs/demo.py): one SDM, one mixing draw, one synthetic
set. HoVer-Net is trained for every arm (baseline: real only; balancing / enlarging: real + the
synthetic patches of that mixing kind; diffmix: real + both) and seed (0, 1, 2: init, batch order,
augmentation), 12 runs. Arms of one seed train the same steps on the same real batches; an arm
with synthetic data adds one synthetic row to each batch of two real ones. The report gives
mean ± s.d. per arm and the paired differences arm - baseline with their 95 % t intervals.

An existing demo workdir can be reused: its SDM, mixing and synthetic set are kept, its two seed-0
runs (baseline, diffmix) too, and only the ten new runs are trained, then evaluate and report
rebuilt (a demo workdir from before the covering balancing patches is refused by `sample`). The
seeds were fixed before any arm was looked at; README reports every arm.

Measured 2026-12-05 on the project's 2-core CPU (fresh clone of f4ce928, after the demo on the same
workdir): 33 min 16 s for the ten new runs, their scoring with synthetic fidelity and the report;
41 min 46 s from a fresh clone, demo included.
"""

from configs import demo


def get_config():
  c = demo.get_config()
  c.name = 'demo_study'
  c.hovernet.train.runs = ('baseline', 'balancing', 'enlarging', 'diffmix')
  c.hovernet.train.seeds = (0, 1, 2)
  # The seed-0 baseline scores every synthetic patch against its own labels (report's
  # synthetic_fidelity): the demo skips it for time, the study needs it to read the rare class.
  c.eval.synthetic_fidelity = True
  return c
