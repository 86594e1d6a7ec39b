"""Feature extraction: uint8 images -> normalised on device -> backbone stages -> patch embedding.

One jitted function per run. Batches are shaped to the work (`batch_plan`): full batches of
`batch_size`, and the rest in power-of-two pieces (20 images at batch 32: 16 + 4), so one image
costs one image's compute rather than a padded batch's, and at most log2(batch_size) + 1 batch shapes
(floor(log2(batch_size)) + 2 when it is not a power of two) are ever compiled. No padding is
computed at all; each image's features are those of the padded batches of earlier versions to
float32 rounding (tests/test_features.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from softpatch_jax import embedding, models, weights

# embedding.store_dtype: how patch features are kept between stages (they are read in float32); the
# backbone's compute dtype is `weights.compute_dtype`.
STORE_DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
# Logged by every driver that extracts with random weights (the report says it from the rows).
RANDOM_INIT_WARNING = (
    "WARNING: random-init backbone: these numbers come from random features and say nothing about "
    "the method on real data."
)


@dataclasses.dataclass(frozen=True)
class Extractor:
    apply: Callable  # (variables, images_BxHxWx3 uint8) -> patches [B, h, w, D]
    variables: dict
    info: dict  # weights identity: {"weights": source or "random-init", "arch", ...}
    batch_size: int
    grid: tuple[int, int]  # (h, w)
    image_size: tuple[int, int]  # (H, W)

    @property
    def random_init(self) -> bool:
        return self.info.get("weights") == weights.RANDOM_INIT


@dataclasses.dataclass(frozen=True)
class Options:
    """What the extractor is built from (the driver builds it from `config.backbone`,
    `config.embedding` and the dataset's crop and batch size)."""

    backbone: weights.Backbone
    patch_size: int  # local aggregation window
    pretrain_dim: int  # each layer's unfolded vector is pooled to this
    target_dim: int  # D
    crop: int  # input image side
    batch_size: int  # the largest batch per backbone call (smaller ones: `batch_plan`)


def build(options: Options) -> Extractor:
    """The extractor for the backbone and patch embedding of `options` at its crop size."""
    bb = options.backbone
    dtype = weights.compute_dtype(bb.dtype)
    spec = models.get_spec(bb.arch)
    layers = models.split_layers(bb.layers) or spec.feature_layers
    module = models.build(bb.arch, layers, dtype, depthwise=bb.depthwise)
    variables, info = weights.resolve(bb)
    # On the device once: numpy leaves would be copied to it on every call (all of the backbone's
    # parameters per batch) and re-hashed by deploy's model check on every predict.
    variables = jax.device_put(variables)
    mean = jnp.asarray(spec.mean, jnp.float32).reshape(1, 1, 1, 3) * 255.0
    std = jnp.asarray(spec.std, jnp.float32).reshape(1, 1, 1, 3) * 255.0
    emb = options

    @jax.jit
    def apply(variables, images_BxHxWx3):
        x = (images_BxHxWx3.astype(jnp.float32) - mean) / std
        maps = module.apply(variables, x)
        return embedding.embed(maps, layers, emb.patch_size, emb.pretrain_dim, emb.target_dim)

    size = (options.crop, options.crop)
    out = jax.eval_shape(apply, variables, jax.ShapeDtypeStruct((1, *size, 3), jnp.uint8))
    return Extractor(apply, variables, info, options.batch_size, tuple(out.shape[1:3]), size)


def batch_sizes(batch_size: int) -> tuple[int, ...]:
    """Every batch shape `batch_plan` can use: the powers of two below `batch_size`, and it."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    sizes = [1 << k for k in range(batch_size.bit_length()) if 1 << k < batch_size]
    return (*sizes, batch_size)


def batch_plan(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, size) of the batches covering n items: full batches of `batch_size`, then the rest
    split into powers of two, largest first (its binary digits: 21 -> 16, 4, 1). Every size is in
    `batch_sizes(batch_size)`; the sizes add up to n exactly, so nothing is padded."""
    plan, start = [], 0
    while n - start >= batch_size:
        plan.append((start, batch_size))
        start += batch_size
    rest = n - start
    for k in reversed(range(rest.bit_length())):
        if rest >> k & 1:
            plan.append((start, 1 << k))
            start += 1 << k
    return plan


def extract(
    ex: Extractor, images_NxHxWx3: np.ndarray, progress: Callable | None = None
) -> jax.Array:
    """Patch features [N, h, w, D] for uint8 images, in the batches of `batch_plan`."""
    outs = []
    for start, size in batch_plan(images_NxHxWx3.shape[0], ex.batch_size):
        outs.append(ex.apply(ex.variables, jnp.asarray(images_NxHxWx3[start : start + size])))
        if progress is not None:
            progress(size)
    if not outs:
        raise ValueError("no images to extract features from")
    return jnp.concatenate(outs, axis=0)
