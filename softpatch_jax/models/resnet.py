"""torchvision's ResNet family in Flax (linen, NHWC), for feature extraction (METHOD.md section 2).

The architecture follows torchvision's definitions exactly (Bottleneck v1.5: the stride sits on the
3x3 convolution; `width_per_group=128` for the wide variants) so that torchvision's ImageNet weights
port one to one (`convert_torchvision`). Batch norm always runs in eval mode (running statistics).
The model returns the outputs of the requested stages in a dict and computes nothing past the last
requested one.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

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
        y = _conv(self.planes, 3, self.stride, self.dtype, "conv1")(x)
        y = nn.relu(_norm(self.dtype, "bn1")(y))
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


VARIANTS = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "wide_resnet50_2": wide_resnet50_2,
    "wide_resnet101_2": wide_resnet101_2,
    "resnet_tiny": resnet_tiny,
}


def init_variables(module: nn.Module, key: jax.Array, image_size: int = 64) -> dict:
    """Random variables for `module`: Flax's default LeCun-normal kernels, unit batch norm."""
    return module.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32))


# Flax (collection, leaf) -> torchvision parameter suffix.
_LEAVES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
# Flax module names that differ from torchvision's (torchvision nests the shortcut in a Sequential).
_MODULES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}


def _torch_name(collection: str, path: Sequence[str]) -> str:
    parts = []
    for name in path[:-1]:
        stage, _, block = name.partition("_")
        if stage in STAGES and block.isdigit():
            parts.append(f"{stage}.{block}")  # layer1_0 -> layer1.0
        else:
            parts.append(_MODULES.get(name, name))
    return ".".join([*parts, _LEAVES[(collection, path[-1])]])


def _infer_module(state_dict: Mapping[str, np.ndarray]) -> ResNet:
    """The ResNet whose variables a torchvision state dict holds (all stages it has)."""
    if "conv1.weight" not in state_dict or "layer1.0.conv1.weight" not in state_dict:
        raise ValueError(
            "not a torchvision ResNet state dict: no conv1.weight/layer1.0.conv1.weight"
        )
    sizes = []
    for stage in STAGES:
        count = 0
        while f"{stage}.{count}.conv1.weight" in state_dict:
            count += 1
        if count == 0:
            break
        sizes.append(count)
    base = int(np.shape(state_dict["conv1.weight"])[0])
    bottleneck = "layer1.0.conv3.weight" in state_dict
    width = int(np.shape(state_dict["layer1.0.conv1.weight"])[0])
    return ResNet(
        stage_sizes=tuple(sizes),
        block="bottleneck" if bottleneck else "basic",
        width_per_group=width * 64 // base if bottleneck else 64,
        base_planes=base,
        out_layers=STAGES[: len(sizes)],
    )


def convert_torchvision(
    state_dict: Mapping[str, np.ndarray],
    arch: str | None = None,
    *,
    out_layers: Sequence[str] | None = None,
    strict: bool = True,
    ignore_prefixes: Sequence[str] = (),
) -> dict:
    """torchvision ResNet state dict -> Flax variables {"params": ..., "batch_stats": ...}.

    Convolutions go from torch's OIHW to Flax's HWIO; batch norm weight/bias become scale/bias and
    running_mean/var become the batch_stats mean/var. `num_batches_tracked` (unused in eval mode)
    is dropped. Arrays come back as float32 numpy arrays whatever the file's dtype.

    Args:
      state_dict: torchvision name -> array, e.g. from `torch_pickle.load_state_dict`.
      arch: a name in `VARIANTS`; None infers the block type, widths and depths from the arrays.
      out_layers: the stages the variables are for (default all four); nothing past the last is
        expected.
      strict: if False, any key with no counterpart (the fc classifier, stages past out_layers)
        is dropped; if True such keys are an error unless they start with one of
        `ignore_prefixes` (e.g. ("fc.",) for a published ImageNet checkpoint).

    Returns:
      Nested dict of float32 arrays, usable with `module.apply` for the module `arch` describes
      (or any module with fewer out_layers: Flax ignores the unused stages).

    Raises:
      ValueError: naming missing keys, unexpected keys or arrays of the wrong shape.
    """
    layers = tuple(out_layers) if out_layers else STAGES
    if arch is None:
        module = _infer_module(state_dict).clone(out_layers=layers)
    elif arch in VARIANTS:
        module = VARIANTS[arch](out_layers=layers)
    else:
        raise ValueError(f"unknown ResNet arch {arch!r}; valid: {sorted(VARIANTS)}")
    # Shapes only: the module's variable tree is the authority on which keys must exist.
    shapes = jax.eval_shape(
        module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    )
    expected = {}
    for collection, tree in shapes.items():
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            path = tuple(k.key for k in key_path)
            expected[_torch_name(collection, path)] = (collection, path, leaf.shape)
    counters = {name.rsplit(".", 1)[0] + ".num_batches_tracked" for name in expected}
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected) - counters)
    keep = tuple(ignore_prefixes)
    unexpected = [k for k in extra if strict and not (keep and k.startswith(keep))]
    if missing or unexpected:
        raise ValueError(
            f"{arch or 'inferred ResNet'} (out_layers={layers}): missing keys {missing}; "
            f"unexpected keys {unexpected}"
        )
    if extra:
        logging.info("convert_torchvision: ignoring %d keys (%s ...)", len(extra), extra[:3])
    variables: dict = {"params": {}, "batch_stats": {}}
    bad_shapes = []
    for name, (collection, path, shape) in expected.items():
        array = np.asarray(state_dict[name]).astype(np.float32)
        if path[-1] == "kernel":
            array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if array.shape != shape:
            bad_shapes.append(f"{name}: {array.shape} after conversion, expected {shape}")
            continue
        node = variables[collection]
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.ascontiguousarray(array)
    if bad_shapes:
        raise ValueError(f"{arch or 'inferred ResNet'}: wrong shapes: {bad_shapes}")
    return variables
