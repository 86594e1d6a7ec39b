"""Feature extraction: uint8 images -> normalised on device -> backbone stages -> patch embedding.

One jitted function per run; batches are padded to a fixed size so nothing recompiles per batch.
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
    batch_size: int  # images per backbone call (padded, so compiled once)


def build(options: Options) -> Extractor:
    """The extractor for the backbone and patch embedding of `options` at its crop size."""
    bb = options.backbone
    dtype = weights.compute_dtype(bb.dtype)
    spec = models.get_spec(bb.arch)
    layers = models.split_layers(bb.layers) or spec.feature_layers
    module = models.build(bb.arch, layers, dtype)
    variables, info = weights.resolve(bb)
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


def extract(
    ex: Extractor, images_NxHxWx3: np.ndarray, progress: Callable | None = None
) -> jax.Array:
    """Patch features [N, h, w, D] for uint8 images, in fixed-size padded batches."""
    n = images_NxHxWx3.shape[0]
    b = ex.batch_size
    outs = []
    for start in range(0, n, b):
        batch = images_NxHxWx3[start : start + b]
        real = batch.shape[0]
        if real < b:
            batch = np.concatenate([batch, np.zeros((b - real, *batch.shape[1:]), batch.dtype)])
        outs.append(ex.apply(ex.variables, jnp.asarray(batch))[:real])
        if progress is not None:
            progress(real)
    if not outs:
        raise ValueError("no images to extract features from")
    return jnp.concatenate(outs, axis=0)
