"""MVTec AD (METHOD.md section 7), the papers' main benchmark: 15 categories, WRN50 at 224.
ROOT holds bottle/, cable/, ... as extracted from the official archive.

  python -m softpatch_jax.main --config=configs/mvtec.py --workdir=runs/mvtec \
    --config.dataset.root=ROOT --config.noise.ratios=0.1 --config.noise.overlap=True
"""

from configs import base


def get_config():
    c = base.get_config()
    c.dataset.name = "mvtec_ad"
    c.dataset.layout = "mvtec"
    c.dataset.prepared = True  # sweeps re-read the same images many times
    c.noise.ratios = "0.1"  # no-overlap mode allows at most 10% on MVTec (fewer anomalies exist)
    return c
