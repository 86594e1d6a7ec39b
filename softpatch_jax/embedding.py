"""Patch embedding (METHOD.md section 2, as PatchCore): 3x3 local aggregation of each backbone stage,
alignment of the coarser stage to the finest grid, PyTorch-style adaptive average pooling of each
stage's unfolded vector to `pretrain_dim`, concatenation, and pooling again to `target_dim`.

Pooling acts on the channel axis and resizing on the spatial axes, and both are linear, so each
coarse stage is pooled *before* it is upsampled: the result is the reference's, with the unfolded
C*9 map never resized (9216 channels at 28x28 for layer3 otherwise).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=64)
def _pool_bins(length: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """Bins of torch.nn.functional.adaptive_avg_pool1d: bin i spans [floor(i*L/out), ceil((i+1)*L/out)).

    Returns (index_WxO, weight_WxO): for each output i and slot j < W, the input index read and its
    weight (1/bin width, or 0 for unused slots), where W is the widest bin.
    """
    i = np.arange(out)
    start = (i * length) // out
    end = -((-(i + 1) * length) // out)
    width = int((end - start).max())
    slots = np.arange(width)[:, None]
    index = np.minimum(start[None, :] + slots, length - 1)
    weight = np.where(start[None, :] + slots < end[None, :], 1.0 / (end - start)[None, :], 0.0)
    return index.astype(np.int32), weight.astype(np.float32)


def adaptive_avg_pool(x: jax.Array, out: int) -> jax.Array:
    """adaptive_avg_pool1d over the last axis of `x` (any leading shape), exact bin semantics."""
    index, weight = _pool_bins(x.shape[-1], out)
    lead = (1,) * (x.ndim - 1)
    acc = None
    for j in range(index.shape[0]):  # static, at most ceil(L/out)+1 slots
        term = jnp.take(x, index[j], axis=-1) * weight[j].reshape(*lead, out)
        acc = term if acc is None else acc + term
    return acc


def unfold(x_BxHxWxC: jax.Array, patch_size: int = 3) -> jax.Array:
    """torch.nn.Unfold(patch_size, padding=patch_size//2, stride=1) in NHWC: [B, H, W, C*k*k],
    channel-major then the k x k window in row-major order, zero padding."""
    pad = (patch_size - 1) // 2
    b, h, w, c = x_BxHxWxC.shape
    xp = jnp.pad(
        x_BxHxWxC, ((0, 0), (pad, patch_size - 1 - pad), (pad, patch_size - 1 - pad), (0, 0))
    )
    views = [
        xp[:, dy : dy + h, dx : dx + w, :] for dy in range(patch_size) for dx in range(patch_size)
    ]
    return jnp.stack(views, axis=-1).reshape(b, h, w, c * patch_size * patch_size)


def resize_bilinear(x_BxHxWxC: jax.Array, h: int, w: int) -> jax.Array:
    """F.interpolate(mode="bilinear", align_corners=False, antialias=False) in NHWC."""
    b, _, _, c = x_BxHxWxC.shape
    return jax.image.resize(x_BxHxWxC, (b, h, w, c), method="bilinear", antialias=False)


def embed(
    feature_maps: dict[str, jax.Array],
    layers: Sequence[str],
    patch_size: int = 3,
    pretrain_dim: int = 1024,
    target_dim: int = 1024,
) -> jax.Array:
    """Backbone stage outputs -> patch features [B, h, w, target_dim] on the first layer's grid.

    Args:
      feature_maps: {stage: [B, h_l, w_l, C_l]}; the first of `layers` has the finest grid.
      layers: stages to use, in the reference's order (e.g. ("layer2", "layer3")).
    """
    ref_h, ref_w = feature_maps[layers[0]].shape[1:3]
    pooled = []
    for name in layers:
        f = adaptive_avg_pool(
            unfold(feature_maps[name].astype(jnp.float32), patch_size), pretrain_dim
        )
        if f.shape[1:3] != (ref_h, ref_w):
            f = resize_bilinear(f, ref_h, ref_w)
        pooled.append(f)
    return adaptive_avg_pool(jnp.concatenate(pooled, axis=-1), target_dim)
