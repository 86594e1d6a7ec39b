"""Journal Table 8: SoftPatch-LOF and SoftPatch+ against LOF's neighbourhood size k, at 10% noise
(no-overlap; VisA 8%, its maximum); 3 seeds. Columns of the table: k.

  python -m launch.sweep --config=configs/sweeps/lof_k.py:demo --workdir=/tmp/sw_lofk
  python -m softpatch_jax.report --workdir=/tmp/sw_lofk
Each k is one LOF run per noisy set (cached); the Gaussian scores SoftPatch+ also needs are shared.
k is capped at N-1 training images, as scikit-learn does.
"""

from configs.sweeps import common

KS = (2, 3, 4, 5, 6, 8, 10, 15)


def get_config(dataset: str = "demo"):
    c = common.with_sweep(common.run_config(dataset), columns="softpatch.lof_k")
    c.noise.overlap = False
    c.noise.ratios = str(common.max_noise(dataset, overlap=False))
    c.methods = "softpatch_lof,softpatch_plus"
    common.axis(c, "softpatch.lof_k", KS)
    common.axis(c, "seed", (0, 1, 2))
    return c
