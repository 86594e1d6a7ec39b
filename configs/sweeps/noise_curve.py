"""Journal Figure 4: image and pixel AUROC against the noise ratio, overlap mode, for PatchCore,
SoftPatch with each discriminator, and SoftPatch+; 3 seeds.

  python -m launch.sweep --config=configs/sweeps/noise_curve.py:demo --workdir=/tmp/sw_noise
  python -m softpatch_jax.report --workdir=/tmp/sw_noise
MVTec / VisA: `:mvtec` / `:visa` and --config.dataset.root=PATH. Cells: categories x 10 ratios x
5 methods x 3 seeds (ratio 0 is one noisy set for all seeds, so features: 1 + 9 x 3 per category).
"""

from configs.sweeps import common

RATIOS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)


def get_config(dataset: str = "demo"):
    c = common.with_sweep(common.run_config(dataset), curves="noise_ratio")
    c.noise.overlap = True
    c.methods = "patchcore,softpatch_nearest,softpatch_gaussian,softpatch_lof,softpatch_plus"
    common.axis(c, "noise.ratios", RATIOS)
    common.axis(c, "seed", (0, 1, 2))
    return c
