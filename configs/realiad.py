"""Real-IAD (CVPR 2024; METHOD.md section 7): 30 objects x 5 camera views, read through the official
split JSONs (softpatch_jax/data/realiad.py). ROOT holds realiad_256/ (or 512, 1024, raw) and the
realiad_jsons*/ folders, side by side or nested inside realiad_jsons/.

  python -m softpatch_jax.main --config=configs/realiad.py --workdir=runs/realiad \
    --config.dataset.root=ROOT --config.dataset.split=fuiad_0.2

A miniature tree to try it on: python -m softpatch_jax.data.realiad_demo --out=/tmp/realiad_mini
(then add --config.backbone.arch=resnet_tiny --config.backbone.allow_random_init=True
--config.dataset.resize=32 --config.dataset.crop=32 for a CPU smoke run).
"""

from configs import base


def get_config():
    c = base.get_config()
    c.dataset.name = "real_iad"
    c.dataset.layout = "realiad"
    c.dataset.prepared = True
    c.dataset.resolution = "256"  # which realiad_<res>/ folder: 256 | 512 | 1024 | raw
    # standard | single_view | fuiad_0.0 | fuiad_0.1 | fuiad_0.2 | fuiad_0.4. The FUIAD splits are
    # the fully unsupervised benchmark: their JSON fixes the noisy training set.
    c.dataset.split = "fuiad_0.1"
    # With a FUIAD split the split is the noise: the project's own injection is off, and any ratio
    # above 0 is an error (not silently ignored). The standard / single-view splits may inject.
    c.noise.ratios = "0.0"
    # Thousands of training images per category: a 1% coreset (as for BTAD) keeps the bank and the
    # nearest-neighbour search at a size one accelerator holds.
    c.coreset.ratio = 0.01
    # Pixel metrics as the official evaluator (ADEval) computes them: at each mask's own resolution.
    c.eval.pixel_resolution = "original"
    return c
