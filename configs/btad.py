"""BTAD (METHOD.md section 7): categories 01, 02, 03 at 512x512; coreset 1% (the paper's setting).
ROOT is the extracted BTech_Dataset_transformed/ folder.

  python -m softpatch_jax.main --config=configs/btad.py --workdir=runs/btad --config.dataset.root=ROOT
"""

from configs import base


def get_config():
    c = base.get_config()
    c.dataset.name = "btad"
    c.dataset.layout = "btad"
    c.dataset.prepared = True
    c.dataset.resize = 512
    c.dataset.crop = 512
    c.dataset.batch_size = 8  # 512x512 images: P = 4096 patches each
    c.coreset.ratio = 0.01
    c.noise.ratios = "0.0"  # the papers report BTAD with no extra noise
    return c
