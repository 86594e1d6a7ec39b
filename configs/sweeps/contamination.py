"""Unknown contamination (README "Unknown contamination"): noise ratio x method x tau, where tau is
one of the fixed quantiles, `auto` (estimated per training set from the discriminator scores:
softpatch_jax/contamination.py) or `oracle` (the true contaminated patch fraction of the training
set, from the injected images' masks: a reference no real line has). Overlap mode, seed 0.

  python -m launch.sweep --config=configs/sweeps/contamination.py:demo --workdir=/tmp/sw_cont \
      --config.sweep.cache_dir=/tmp/sweep_cache
  python -m softpatch_jax.report --workdir=/tmp/sw_cont
MVTec layout (e.g. PIPED): `:mvtec` with --config.dataset.root=PATH (and dataset.categories).
`:demo_ablation` / `:mvtec_ablation`: what costs on clean data, on the same features: SoftPatch
driven by LOF alone (softpatch_plus with discriminators=lof: the same removal order as
softpatch_lof) with removal on or off (tau, tau_seg in {0, 0.15}) x soft weights on or off; the
rows with tau == tau_seg are the ablation (tau 0 + no weights = PatchCore).

SoftPatch+'s fixed-tau rows vary its classification bank's tau and hold tau_seg at the authors' 0.5
(as the journal's Figure 5); `auto` and `oracle` set both banks.
"""

from configs.sweeps import common

FIXED_TAUS = (0.05, 0.10, 0.15, 0.20, 0.30, 0.40)
RATIOS = (0.0, 0.1, 0.2, 0.4)


def get_config(arg: str = "demo"):
    dataset, _, variant = arg.partition("_")
    c = common.with_sweep(common.run_config(dataset), columns="softpatch.tau")
    c.noise.overlap = True
    common.axis(c, "noise.ratios", RATIOS)
    if variant == "ablation":
        c.methods = "softpatch_plus"
        c.softpatch.discriminators = "lof"
        common.axis(c, "noise.ratios", (0.0,))
        common.axis(c, "softpatch.tau", (0.0, 0.15))
        common.axis(c, "softpatch.tau_seg", (0.0, 0.15))
        common.axis(c, "softpatch.soft_weight", ("none", "lof"))
        return c
    if variant:
        raise ValueError(
            f"unknown variant {variant!r} of {arg!r}; valid: DATASET or DATASET_ablation"
        )
    c.methods = "patchcore,softpatch_lof,softpatch_plus"
    common.axis(c, "softpatch.tau", (*FIXED_TAUS, "auto", "oracle"))
    return c
