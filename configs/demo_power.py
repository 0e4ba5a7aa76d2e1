"""The demo's rare-class question with enough seeds: baseline vs DiffMix over HoVer-Net seeds 0-7.

  python -m diffmix_jax.main --config configs/demo.py --workdir runs/demo         # if not yet run
  python -m diffmix_jax.main --config configs/demo_power.py --workdir runs/demo

Everything but HoVer-Net is the demo's (configs/demo.py): one SDM, one mixing draw, one synthetic
set, so the demo's workdir is reused and its two seed-0 runs are kept; the other 14 runs are
trained (each its own resumable run, seeds outer), then scored and reported as in demo_study.

Fixed here, before seeds 3-7 had been trained or seen (2026-12-06); no seed is added or dropped
after looking:
  - arms `baseline` and `diffmix`; HoVer-Net seeds 0, 1, 2, 3, 4, 5, 6, 7 (init, batch order and
    augmentation; arms of one seed train the same steps on the same real batches);
  - primary: the paired difference of the rare class's (class 1, "other") F_c, diffmix - baseline,
    its mean and 95 % t interval over the 8 seeds (report's `paired.diffmix.f_c.1`);
  - secondary: the two-sided Wilcoxon signed-rank p of the same differences, and the same
    difference, interval and p for Dice, PQ, F_d and every class's F_c (`paired`, `wilcoxon_p`).
The report adds a paired-dot plot (paired_seeds.png): per class, one line per seed from the
baseline to diffmix. XLA's CPU float order differs between machines, so one seed's numbers differ
across machines of the same kind; the question is the interval over seeds.

Measured 2026-12-06 on the project's 2-core CPU (Intel Xeon; fresh clone of ac5e71b, the demo first,
then this config on its workdir): 37 min 14 s for the 14 new runs, their scoring and the report;
47 min 20 s in all. Primary: rare F_c +0.511 [+0.250, +0.773] (every seed higher, Wilcoxon
p = 0.0078); Dice +0.009 [-0.003, +0.021], PQ +0.035 [+0.007, +0.063] (BENCHMARKS.md).
"""

from configs import demo


def get_config():
  c = demo.get_config()
  c.name = 'demo_power'
  c.hovernet.train.runs = ('baseline', 'diffmix')
  c.hovernet.train.seeds = (0, 1, 2, 3, 4, 5, 6, 7)
  return c
