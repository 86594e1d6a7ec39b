"""Journal Table 9: no denoising (PatchCore) against image-level denoising (drop the top-tau images
by their max LOF score, then PatchCore) against SoftPatch's patch-level denoising, at 10% noise in
both modes (VisA no-overlap: 8%, its maximum); 3 seeds.

  python -m launch.sweep --config=configs/sweeps/denoise_granularity.py:demo --workdir=/tmp/sw_gran
  python -m softpatch_jax.report --workdir=/tmp/sw_gran
"""

from configs.sweeps import common


def get_config(dataset: str = "demo"):
    c = common.with_sweep(common.run_config(dataset))
    c.noise.ratios = str(common.max_noise(dataset, overlap=False))
    c.methods = "patchcore,image_denoise,softpatch"
    c.softpatch.discriminator = (
        "lof"  # image_denoise and softpatch: the same score, two granularities
    )
    common.axis(c, "noise.overlap", (False, True))
    common.axis(c, "seed", (0, 1, 2))
    return c
