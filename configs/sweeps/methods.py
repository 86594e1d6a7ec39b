"""Every registered method (`methods.names()`: PatchCore, SoftPatch with each discriminator,
SoftPatch+, image-level denoising, InReaCh, and any method registered since) on the same features,
at 0, 10 and 20% overlap noise, seed 0: README "Extension points", the noisy-data baselines table.

  python -m launch.sweep --config=configs/sweeps/methods.py:demo --workdir=/tmp/sw_methods
  python -m softpatch_jax.report --workdir=/tmp/sw_methods
A subset: --config.methods=patchcore,softpatch_lof,softpatch_plus,softpatch_bootstrap,inreach.
"""

from configs.sweeps import common
from softpatch_jax import methods


def get_config(dataset: str = "demo"):
    c = common.with_sweep(common.run_config(dataset), curves="noise_ratio")
    c.noise.overlap = True
    c.noise.ratios = "0.0,0.1,0.2"
    c.methods = ",".join(methods.names())
    return c
