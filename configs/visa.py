"""VisA (METHOD.md section 7): 12 categories, split from ROOT/split_csv/1cls.csv, WRN50 at 224.
The journal's headline VisA setting is 8% overlap noise.

  python -m softpatch_jax.main --config=configs/visa.py --workdir=runs/visa --config.dataset.root=ROOT
"""

from configs import base


def get_config():
    c = base.get_config()
    c.dataset.name = "visa"
    c.dataset.layout = "visa"
    c.dataset.prepared = True
    c.noise.ratios = "0.08"  # no-overlap mode allows at most 8% on VisA
    c.noise.overlap = True
    return c
