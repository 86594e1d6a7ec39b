"""The training set's projected pool (METHOD.md section 3, the random projection D -> R): the named
random streams, the projection, the features streamed once into the pool [N, P, R] on the device,
and the picked bank rows gathered back from the full-D features.

Patches are flattened image-major: patch p of training image n has index n*P + p. The full-D
features may live on the host (any dtype, or a lazy reader) and are read twice: streamed once into
the pool, and for the picked bank rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from softpatch_jax import ops

# Named random streams derived from the root key (STYLE.md: no global RNG). The noisy training set
# is drawn on the host from its own seeded generator (`experiment/plan.noisy_splits`), so no stream
# here; 0 stays unused so that the other streams, and every result, keep their keys.
STREAMS = {"projection": 1, "coreset": 2, "discriminators": 3}


def stream(key: jax.Array, name: str) -> jax.Array:
    return jax.random.fold_in(key, STREAMS[name])


def random_projection(key: jax.Array, dim: int, out_dim: int) -> jax.Array:
    """A bias-free linear map D -> R drawn as torch.nn.Linear's default init, U(+-1/sqrt(D))."""
    bound = 1.0 / np.sqrt(dim)
    return jax.random.uniform(key, (dim, out_dim), jnp.float32, -bound, bound)


@jax.jit
def project(feats_NxD: jax.Array, projection_DxR: jax.Array) -> jax.Array:
    return ops.matmul(feats_NxD.astype(jnp.float32), projection_DxR)


@jax.jit
def _project_device(feats_NxPxD: jax.Array, projection_DxR: jax.Array | None) -> jax.Array:
    # Reshaped inside the jit (a bitcast); outside it, reshaping a device array copies it.
    n, p, d = feats_NxPxD.shape
    flat = feats_NxPxD.reshape(n * p, d)
    out = flat.astype(jnp.float32) if projection_DxR is None else project(flat, projection_DxR)
    return out.reshape(n, p, -1)


@functools.partial(jax.jit, donate_argnums=0)
def _project_into(
    pool_NxPxR: jax.Array, block_BxPxD: jax.Array, projection_DxR: jax.Array | None, start
) -> jax.Array:
    y = block_BxPxD.astype(jnp.float32)
    if projection_DxR is not None:
        y = ops.matmul(y, projection_DxR)
    return jax.lax.dynamic_update_slice_in_dim(pool_NxPxR, y, start, axis=0)


def images_per_block(feats_NxPxD, out_dim: int) -> int:
    """Images per host->device block: input, its float32 cast and the output in 1/4 of free memory."""
    n, p, d = feats_NxPxD.shape
    itemsize = np.dtype(feats_NxPxD.dtype).itemsize
    return max(1, min(n, ops.chunk_rows(p * (d * (itemsize + 4) + 4 * out_dim))))


def project_pool(
    feats_NxPxD, projection_DxR: jax.Array | None, *, block_images: int = 0
) -> jax.Array:
    """The discriminators' and coreset's pool [N, P, R] (float32, on device); R = D without a
    projection.

    `feats_NxPxD` is a device array, or a host source: anything with `.shape`, `.dtype` and numpy
    slicing over images (a numpy array or memmap, possibly float16, or a lazy reader). A host source
    is streamed in blocks of images into the pool, so the full-D features are never on the device
    at once: at N=5000, P=784, D=1024 they are 16 GB in float32, the R=128 pool 2 GB.
    block_images: images per block (0: sized from free memory).
    """
    if isinstance(feats_NxPxD, jax.Array):
        return _project_device(feats_NxPxD, projection_DxR)
    n, p, d = feats_NxPxD.shape
    r = d if projection_DxR is None else projection_DxR.shape[1]
    b = min(n, block_images) if block_images > 0 else images_per_block(feats_NxPxD, r)
    pool = jnp.zeros((n, p, r), jnp.float32)
    # Equal-size blocks (one compile); the last is shifted back to end at image n.
    for lo in sorted({min(i, n - b) for i in range(0, n, b)}):
        block = np.asarray(feats_NxPxD[lo : lo + b])
        pool = _project_into(pool, block, projection_DxR, jnp.int32(lo))
    return pool


# Donated: the flat view reuses the pool's buffer; reshaping outside a jit would copy it.
flatten_images = jax.jit(lambda x_NxPxR: x_NxPxR.reshape(-1, x_NxPxR.shape[-1]), donate_argnums=0)


@jax.jit
def _gather_device(feats_NxPxD: jax.Array, idx_M: jax.Array) -> jax.Array:
    n, p, d = feats_NxPxD.shape
    return feats_NxPxD.reshape(n * p, d)[idx_M]


def gather_rows(feats_NxPxD, idx_M: jax.Array) -> jax.Array:
    """The full-D features [M, D] of flat patch indices n*P + p, in the source's dtype.

    For a host source only the images holding picked patches are read (see `project_pool`).
    """
    if isinstance(feats_NxPxD, jax.Array):
        return _gather_device(feats_NxPxD, idx_M)
    _, p, d = feats_NxPxD.shape
    img, pos = np.divmod(np.asarray(idx_M), p)
    if isinstance(feats_NxPxD, np.ndarray):  # numpy and memmaps index directly
        return jnp.asarray(feats_NxPxD[img, pos])
    out = np.empty((img.shape[0], d), np.dtype(feats_NxPxD.dtype))
    order = np.argsort(img, kind="stable")
    images, first = np.unique(img[order], return_index=True)
    # Only the images holding picked patches, one at a time.
    for i, rows in zip(images, np.split(order, first[1:])):
        out[rows] = np.asarray(feats_NxPxD[i : i + 1])[0, pos[rows]]
    return jnp.asarray(out)
