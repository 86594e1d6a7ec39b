"""Backbone registry: an architecture name -> how to build it, which stages feed the patch embedding,
how its input is normalised, and how torch weights convert into it.

Each module built here maps normalised images_BxHxWx3 to a dict {stage name: [B, h, w, C]} holding
only the requested stages, and computes nothing past the last of them.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp

from softpatch_jax.io_utils import split_list

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """How to build and feed one backbone.

    Attributes:
      module: "package.module:attribute" of a callable (out_layers=, dtype=) -> nn.Module.
      feature_layers: the stride-8 and stride-16 stages the method uses by default.
      converter: "package.module:function" mapping a torch state dict {name: np.ndarray} to Flax
        variables {"params": ..., "batch_stats": ...}.
      mean, std: per-channel input normalisation applied to images scaled to [0, 1].
      depthwise: whether the module takes a `depthwise` lowering option (EfficientNet-Lite).
    """

    module: str
    feature_layers: tuple[str, ...]
    converter: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    depthwise: bool = False


def _resolve(path: str):
    module_name, attr = path.split(":")
    return getattr(importlib.import_module(module_name), attr)


_RESNET = "softpatch_jax.models.resnet"
_LITE = "softpatch_jax.models.efficientnet_lite"

ARCHS: dict[str, ArchSpec] = {
    name: ArchSpec(f"{_RESNET}:{name}", ("layer2", "layer3"), f"{_RESNET}:convert_torchvision")
    for name in ("resnet18", "resnet50", "wide_resnet50_2", "wide_resnet101_2", "resnet_tiny")
}
# EfficientNet-Lite: the last blocks at strides 8 and 16 (lite0: block4, 40 ch and block10, 112 ch),
# fed TensorFlow Lite's (pixel - 127) / 128, which is what these weights were trained on (see
# efficientnet_lite.py; its MEAN/STD hold the same numbers).
ARCHS.update(
    {
        name: ArchSpec(
            f"{_LITE}:{name}",
            ("stride8", "stride16"),
            f"{_LITE}:convert_state_dict",
            mean=(127.0 / 255.0,) * 3,
            std=(128.0 / 255.0,) * 3,
            depthwise=True,
        )
        for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
    }
)


def get_spec(arch: str) -> ArchSpec:
    if arch not in ARCHS:
        raise ValueError(f"unknown backbone arch {arch!r}; valid: {sorted(ARCHS)}")
    return ARCHS[arch]


def split_layers(layers: str | tuple[str, ...]) -> tuple[str, ...]:
    """config.backbone.layers ("" or "layer2,layer3") -> a tuple of stage names."""
    if isinstance(layers, str):
        return tuple(split_list(layers))
    return tuple(layers)


def build(
    arch: str,
    out_layers: tuple[str, ...] | None = None,
    dtype=jnp.float32,
    depthwise: str = "auto",
) -> nn.Module:
    """The Flax module for `arch`, returning `out_layers` (default: the method's feature pair).

    depthwise: how depthwise convolutions are lowered ("auto", "conv", "shifted"; see
    models/efficientnet_lite.py), for the architectures that have them; ignored by the others.
    """
    spec = get_spec(arch)
    layers = tuple(out_layers) if out_layers else spec.feature_layers
    if spec.depthwise:
        return _resolve(spec.module)(out_layers=layers, dtype=dtype, depthwise=depthwise)
    return _resolve(spec.module)(out_layers=layers, dtype=dtype)


def converter(arch: str) -> Callable:
    return _resolve(get_spec(arch).converter)
