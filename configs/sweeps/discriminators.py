"""Journal Table 7: SoftPatch+ with each non-empty subset of the registered discriminators
(softpatch_jax/discriminators/: the paper's nearest, gaussian, lof give its 7 subsets; every
discriminator registered since joins the axis) as the fused removal score, ranks over all patches and per position (METHOD.md section 4 asks for
both), at 10% overlap noise; 3 seeds. Columns of the table: the subset.

  python -m launch.sweep --config=configs/sweeps/discriminators.py:demo --workdir=/tmp/sw_disc
  python -m softpatch_jax.report --workdir=/tmp/sw_disc
The soft weight stays SoftPatch+'s default (raw LOF), so only the removal changes between columns;
add `common.axis(c, "softpatch.soft_weight", ("lof", "fused"))` to ablate it too. All subsets share
the three discriminators' scores, computed once per noisy set.
"""

import itertools

from configs.sweeps import common
from softpatch_jax import discriminators

NAMES = discriminators.NAMES
SUBSETS = tuple(
    ",".join(s) for k in range(1, len(NAMES) + 1) for s in itertools.combinations(NAMES, k)
)  # nearest, gaussian, lof, nearest+gaussian, ..., all of them


def get_config(dataset: str = "demo"):
    c = common.with_sweep(common.run_config(dataset), columns="softpatch.discriminators")
    c.noise.overlap = True
    c.noise.ratios = "0.1"
    c.methods = "softpatch_plus"
    common.axis(c, "softpatch.discriminators", SUBSETS)
    common.axis(c, "softpatch.rank_scope", ("all", "position"))
    common.axis(c, "seed", (0, 1, 2))
    return c
