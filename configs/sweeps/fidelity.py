"""What the authors' code's choices are worth (README "Fidelity"): the patch score with the squared L2
distance (their faiss scorer; the default) or the paper's eq. 10 (L2), crossed with 128 coreset start
points (their weighted sampler; the default) or PatchCore's 10; PatchCore and SoftPatch-LOF, no noise
and 10% overlap noise.

  python -m launch.sweep --config=configs/sweeps/fidelity.py:mvtec --workdir=/tmp/sw_fidelity \
    --config.dataset.root=../shared/data/piped --config.backbone.arch=efficientnet_lite0
  python -m softpatch_jax.report --workdir=/tmp/sw_fidelity
"""

from configs.sweeps import common


def get_config(dataset: str = "demo"):
    c = common.with_sweep(common.run_config(dataset), columns="scoring.distance,coreset.num_starts")
    c.noise.overlap = True
    c.noise.ratios = "0.0,0.1"
    c.methods = "patchcore,softpatch_lof"
    common.axis(c, "scoring.distance", ("squared", "l2"))
    common.axis(c, "coreset.num_starts", (128, 10))
    return c
