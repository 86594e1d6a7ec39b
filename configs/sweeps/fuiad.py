"""Real-IAD's four fully unsupervised splits (noise 0.0 / 0.1 / 0.2 / 0.4, fixed by the official
JSONs) for PatchCore, SoftPatch-LOF and SoftPatch+: image, sample and pixel metrics per split.

  python -m launch.sweep --config=configs/sweeps/fuiad.py:realiad --workdir=runs/fuiad \
    --config.dataset.root=ROOT
  python -m softpatch_jax.report --workdir=runs/fuiad
The splits are an axis of `dataset.split`, so features are extracted once per (category, split);
noise.ratios stays 0.0 (the splits are the noise). Cells: categories x 4 splits x 3 methods.
"""

from configs.sweeps import common

SPLITS = ("fuiad_0.0", "fuiad_0.1", "fuiad_0.2", "fuiad_0.4")


def get_config(dataset: str = "realiad"):
    if dataset != "realiad":
        raise ValueError(f"the FUIAD splits are Real-IAD's: use :realiad, got {dataset!r}")
    c = common.with_sweep(common.run_config(dataset), columns="dataset.split")
    c.methods = "patchcore,softpatch_lof,softpatch_plus"
    common.axis(c, "dataset.split", SPLITS)
    return c
