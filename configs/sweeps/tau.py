"""Journal Figure 5: AUROC against the removal threshold tau (SoftPatch's tau; SoftPatch+'s tau_cls,
its tau_seg held at 0.5), at 10% overlap noise; PatchCore as the flat reference; 3 seeds.

  python -m launch.sweep --config=configs/sweeps/tau.py:demo --workdir=/tmp/sw_tau
  python -m softpatch_jax.report --workdir=/tmp/sw_tau
Every tau shares one noisy set's features, projection, discriminator scores and prepared coreset
inputs; the taus' coresets run in one pass of the greedy loop (`memory_bank.fit_banks`).
"""

from configs.sweeps import common

TAUS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)


def get_config(dataset: str = "demo"):
    c = common.with_sweep(common.run_config(dataset), curves="softpatch.tau")
    c.noise.overlap = True
    c.noise.ratios = "0.1"
    c.methods = "patchcore,softpatch_lof,softpatch_plus"
    common.axis(c, "softpatch.tau", TAUS)
    common.axis(c, "seed", (0, 1, 2))
    return c
