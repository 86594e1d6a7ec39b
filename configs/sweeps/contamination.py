"""Unknown contamination (README "Unknown contamination"): noise ratio x method x tau policy, where
tau is a fixed quantile, `auto` (estimated per training set from the discriminator scores:
softpatch_jax/contamination.py) or `oracle` (the true contaminated patch fraction of the training
set, from the injected images' masks: a reference no real line has). Overlap mode, seed 0.

  W=/tmp/sw_cont; C=configs/sweeps/contamination.py
  for v in demo demo_auto demo_oracle; do
    python -m launch.sweep --config=$C:$v --workdir=$W --config.sweep.cache_dir=/tmp/sweep_cache
  done
  python -m launch.sweep --config=$C:demo_ablation --workdir=${W}_ablation \
      --config.sweep.cache_dir=/tmp/sweep_cache
  python -m softpatch_jax.report --workdir=$W
MVTec layout (e.g. PIPED): `:mvtec*` with --config.dataset.root=PATH (and dataset.categories).

Variants (one workdir; the cache shares features and scores between them):
  DATASET          the fixed taus; SoftPatch+'s tau_seg held at the authors' 0.5 (journal Fig. 5)
  DATASET_auto     tau = tau_seg = "auto"
  DATASET_oracle   tau = tau_seg = "oracle" (noisy ratios only: a clean set's oracle is 0)
  DATASET_estimators  tau = tau_seg = "auto" with every registered estimator (the README's
                   comparison; the floors at their defaults)
  DATASET_ablation what costs on clean data, on the same features: SoftPatch driven by LOF alone
                   (softpatch_plus with discriminators=lof: softpatch_lof's removal order) with
                   removal on or off (tau, tau_seg in {0, 0.15}) x soft weights on or off; the rows
                   with tau == tau_seg are the ablation (tau 0 + no weights = PatchCore).
"""

from configs.sweeps import common
from softpatch_jax import contamination

FIXED_TAUS = (0.05, 0.10, 0.15, 0.20, 0.30, 0.40)
RATIOS = (0.0, 0.1, 0.2, 0.4)


def get_config(arg: str = "demo"):
    dataset, _, variant = arg.partition("_")
    c = common.with_sweep(common.run_config(dataset), columns="softpatch.tau")
    c.noise.overlap = True
    c.methods = "patchcore,softpatch_lof,softpatch_plus"
    common.axis(c, "noise.ratios", RATIOS)
    if variant == "":
        common.axis(c, "softpatch.tau", FIXED_TAUS)
    elif variant in ("auto", "oracle"):
        c.softpatch.tau = c.softpatch.tau_seg = variant
        if variant == "oracle":
            common.axis(c, "noise.ratios", tuple(r for r in RATIOS if r > 0))
    elif variant == "estimators":
        c.softpatch.tau = c.softpatch.tau_seg = "auto"
        common.axis(c, "softpatch.auto_estimator", tuple(contamination.ESTIMATORS))
    elif variant == "ablation":
        c.methods = "softpatch_plus"
        c.softpatch.discriminators = "lof"
        common.axis(c, "noise.ratios", (0.0,))
        common.axis(c, "softpatch.tau", (0.0, 0.15))
        common.axis(c, "softpatch.tau_seg", (0.0, 0.15))
        common.axis(c, "softpatch.soft_weight", ("none", "lof"))
    else:
        raise ValueError(
            f"unknown variant {variant!r} of {arg!r}; valid: DATASET, DATASET_auto, "
            "DATASET_oracle, DATASET_estimators, DATASET_ablation"
        )
    return c
