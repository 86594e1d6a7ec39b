"""torchvision's ResNet family in Flax (linen, NHWC), for feature extraction (METHOD.md section 2).

The architecture follows torchvision's definitions exactly (Bottleneck v1.5: the stride sits on the 3x3
convolution; `width_per_group=128` for the wide variants) so that torchvision's ImageNet weights port
one to one. Batch norm always runs in eval mode (running statistics). The model returns the outputs
of the requested stages in a dict and computes nothing past the last requested one.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

STAGES = ("layer1", "layer2", "layer3", "layer4")


def _conv(features: int, kernel: int, stride: int, dtype, name: str) -> nn.Conv:
    pad = (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _norm(dtype, name: str) -> nn.BatchNorm:
    # torchvision's BatchNorm2d default eps; eval mode only.
    return nn.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=dtype, name=name)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (resnet18/34): two 3x3 convolutions."""

    planes: int
    stride: int
    downsample: bool
    dtype: jnp.dtype = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x):
        y = nn.relu(
            _norm(self.dtype, "bn1")(_conv(self.planes, 3, self.stride, self.dtype, "conv1")(x))
        )
        y = _norm(self.dtype, "bn2")(_conv(self.planes, 3, 1, self.dtype, "conv2")(y))
        if self.downsample:
            x = _conv(self.planes, 1, self.stride, self.dtype, "downsample_conv")(x)
            x = _norm(self.dtype, "downsample_bn")(x)
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1x1 -> 3x3 (strided) -> 1x1, expansion 4."""

    planes: int
    stride: int
    downsample: bool
    width_per_group: int = 64
    dtype: jnp.dtype = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x):
        width = int(self.planes * (self.width_per_group / 64.0))
        y = nn.relu(_norm(self.dtype, "bn1")(_conv(width, 1, 1, self.dtype, "conv1")(x)))
        y = nn.relu(_norm(self.dtype, "bn2")(_conv(width, 3, self.stride, self.dtype, "conv2")(y)))
        y = _norm(self.dtype, "bn3")(_conv(self.planes * 4, 1, 1, self.dtype, "conv3")(y))
        if self.downsample:
            x = _conv(self.planes * 4, 1, self.stride, self.dtype, "downsample_conv")(x)
            x = _norm(self.dtype, "downsample_bn")(x)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """ResNet trunk returning a dict of stage outputs.

    Attributes:
      stage_sizes: blocks per stage (torchvision's `layers`).
      block: "basic" or "bottleneck".
      width_per_group: torchvision's `width_per_group` (128 for the wide variants).
      base_planes: planes of the first stage (64 in torchvision; smaller for test variants).
      out_layers: which of layer1..layer4 to return; nothing past the last one is computed.
      dtype: compute dtype (parameters stay float32).

    Input: images_BxHxWx3, already normalised. Output: {layer: [B, h, w, C]}.
    """

    stage_sizes: Sequence[int]
    block: str = "bottleneck"
    width_per_group: int = 64
    base_planes: int = 64
    out_layers: Sequence[str] = ("layer2", "layer3")
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        unknown = set(self.out_layers) - set(STAGES)
        if unknown or not self.out_layers:
            raise ValueError(
                f"out_layers must be a non-empty subset of {STAGES}, got {self.out_layers}"
            )
        last = max(STAGES.index(name) for name in self.out_layers)
        x = x.astype(self.dtype)
        x = _conv(self.base_planes, 7, 2, self.dtype, "conv1")(x)
        x = nn.relu(_norm(self.dtype, "bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        if self.block == "basic":
            block_cls, expansion = BasicBlock, BasicBlock.expansion
        elif self.block == "bottleneck":
            block_cls = functools.partial(Bottleneck, width_per_group=self.width_per_group)
            expansion = Bottleneck.expansion
        else:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {self.block!r}")
        outputs = {}
        in_channels = self.base_planes
        for i, num_blocks in enumerate(self.stage_sizes[: last + 1]):
            planes = self.base_planes * 2**i
            for j in range(num_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                downsample = j == 0 and (stride != 1 or in_channels != planes * expansion)
                x = block_cls(
                    planes=planes,
                    stride=stride,
                    downsample=downsample,
                    dtype=self.dtype,
                    name=f"{STAGES[i]}_{j}",
                )(x)
                in_channels = planes * expansion
            if STAGES[i] in self.out_layers:
                outputs[STAGES[i]] = x
        return outputs


resnet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block="basic")
resnet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
wide_resnet50_2 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), width_per_group=128)
wide_resnet101_2 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), width_per_group=128)
# A narrow variant with the same code path, for tests: 8 base planes, one block per stage.
resnet_tiny = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), base_planes=8, width_per_group=64)


def init_variables(module: nn.Module, key: jax.Array, image_size: int = 64):
    """Random (He-normal convolution, unit batch-norm) variables for `module`."""
    return module.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32))
