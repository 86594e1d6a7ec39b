"""MVTec AD (METHOD.md section 7), the papers' main benchmark: 15 categories, WRN50 at 224.

  python -m softpatch_jax.main --config=configs/mvtec.py --workdir=runs/mvtec \
    --config.dataset.root=/data/mvtec_anomaly_detection --config.noise.ratios=0.1 --config.noise.overlap=True
"""

from configs import base


def get_config():
    c = base.get_config()
    c.dataset.name = "mvtec"
    c.dataset.layout = "mvtec"
    c.noise.ratios = "0.1"  # no-overlap mode allows at most 10% on MVTec (fewer anomalies exist)
    return c
