"""Scoring (METHOD.md section 5): each test patch's distance to its nearest memory patch times that
patch's soft weight (the SQUARED L2 distance by default, as the authors' faiss `IndexFlatL2` scorer
and the original PatchCore code; `distance="l2"` is the paper's eq. 10); the image score is the max
over the image's patches; the pixel map is the patch scores upsampled bilinearly to the input size
and blurred with a Gaussian (sigma 4). All on device, the nearest-neighbour search chunked over test
patches so memory stays bounded for any bank size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from softpatch_jax import embedding, ops
from softpatch_jax import parallel as parallel_lib
from softpatch_jax.memory_bank import Banks, MemoryBank


def nearest(
    query_QxD: jax.Array,
    bank_MxD: jax.Array,
    chunk_size: int,
    centre_1xD: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Distance to and index of the nearest bank row for each query row (L2, full D).

    The search uses |q|^2 + |b|^2 - 2qb on bank-centred data; the winner's distance is then recomputed
    as |q - b| directly, since the expanded form loses small distances to cancellation in float32.
    `centre_1xD` (default: the bank mean) is passed in by `patch_scores`, computed by one call of
    `ops.mean_row` as the sharded search (`parallel.nearest`) does, so both give the same bits.
    """
    centre = jnp.mean(bank_MxD.astype(jnp.float32), axis=0, keepdims=True)
    centre = centre if centre_1xD is None else centre_1xD
    bank = bank_MxD.astype(jnp.float32) - centre
    bank_sq = ops.sq_norms(bank)

    def chunk(q):
        _, idx, dist = ops.nearest_rows(q.astype(jnp.float32) - centre, bank, bank_sq)
        return dist, idx

    return ops.chunked_map(chunk, query_QxD, chunk_size)


DISTANCES = ("squared", "l2")


def check_distance(distance: str) -> str:
    if distance not in DISTANCES:
        raise ValueError(
            f"scoring.distance {distance!r}; valid: 'squared' (the authors' code, faiss "
            "IndexFlatL2) or 'l2' (the paper's eq. 10)"
        )
    return distance


def weigh(weights_M: jax.Array, idx_Q: jax.Array, dist_Q: jax.Array, distance: str) -> jax.Array:
    """The patch score: the nearest memory patch's soft weight times its L2 distance, squared or
    not (`DISTANCES`)."""
    check_distance(distance)
    return weights_M[idx_Q] * (dist_Q * dist_Q if distance == "squared" else dist_Q)


@functools.partial(jax.jit, static_argnames=("chunk_size", "distance"))
def _patch_scores(
    bank: MemoryBank,
    feats_TxPxD: jax.Array,
    centre_1xD: jax.Array,
    chunk_size: int,
    distance: str,
) -> jax.Array:
    t, p, d = feats_TxPxD.shape
    dist, idx = nearest(feats_TxPxD.reshape(t * p, d), bank.feats_MxD, chunk_size, centre_1xD)
    return weigh(bank.weights_M, idx, dist, distance).reshape(t, p)


def patch_scores(
    bank: MemoryBank,
    feats_TxPxD: jax.Array,
    chunk_size: int,
    *,
    distance: str = "squared",
    parallel: bool = False,
) -> jax.Array:
    """[T, P]: weighted nearest-neighbour distance of every test patch.

    distance: "squared" (the authors' code) or "l2" (the paper's eq. 10).
    parallel: shard the bank over all devices (`parallel.nearest`); same values.
    """
    check_distance(distance)
    if parallel:
        t, p, d = feats_TxPxD.shape
        dist, idx = parallel_lib.nearest(feats_TxPxD.reshape(t * p, d), bank.feats_MxD, chunk_size)
        return _weigh(bank.weights_M, idx, dist, distance).reshape(t, p)
    return _patch_scores(bank, feats_TxPxD, ops.mean_row(bank.feats_MxD), chunk_size, distance)


_weigh = jax.jit(weigh, static_argnames=("distance",))


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage.gaussian_filter's 1-D kernel: radius int(truncate*sigma + 0.5), normalised."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(maps_TxHxW: jax.Array, sigma: float) -> jax.Array:
    """scipy.ndimage.gaussian_filter(map, sigma) per map (mode 'reflect' = numpy 'symmetric')."""
    if sigma <= 0:
        return maps_TxHxW
    k = jnp.asarray(gaussian_kernel(sigma))
    r = (k.shape[0] - 1) // 2

    def blur_axis(x, axis):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (r, r)
        xp = jnp.pad(x, pad, mode="symmetric")
        n = x.shape[axis]
        out = jnp.zeros_like(x)
        for i in range(k.shape[0]):  # static taps: exact, no TF32 convolution on GPUs
            out = out + k[i] * jax.lax.slice_in_dim(xp, i, i + n, axis=axis)
        return out

    return blur_axis(blur_axis(maps_TxHxW, 1), 2)


@functools.partial(jax.jit, static_argnames=("grid", "image_size", "sigma"))
def anomaly_maps(
    scores_TxP: jax.Array, grid: tuple[int, int], image_size: tuple[int, int], sigma: float
) -> jax.Array:
    """Patch scores [T, h*w] -> pixel maps [T, H, W]: bilinear upsample, then Gaussian blur."""
    t = scores_TxP.shape[0]
    up = embedding.resize_bilinear(scores_TxP.reshape(t, *grid, 1), *image_size)[..., 0]
    return gaussian_blur(up, sigma)


def chunk_size_for(bank_size: int) -> int:
    """Test patches per chunk so the [chunk, M] distance block stays within free memory."""
    return max(256, min(ops.chunk_rows(bytes_per_row=12 * bank_size), 65536))


def predict(
    banks: Banks,
    feats_TxPxD: jax.Array,
    grid: tuple[int, int],
    image_size: tuple[int, int],
    blur_sigma: float = 4.0,
    chunk_size: int = 0,
    *,
    distance: str = "squared",
    parallel: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Library API: image scores [T] and anomaly maps [T, H, W] for test features [T, P, D].

    distance: "squared" (default, the authors' code) or "l2" (the paper's eq. 10); the maps come
      from the same patch scores.
    parallel: shard each memory bank over all devices for the search (`parallel.nearest`).
    """
    kw = dict(distance=distance, parallel=parallel)
    cls_chunk = chunk_size or chunk_size_for(banks.cls.feats_MxD.shape[0])
    cls_scores = patch_scores(banks.cls, feats_TxPxD, cls_chunk, **kw)
    if banks.seg is banks.cls:
        seg_scores = cls_scores
    else:
        seg_chunk = chunk_size or chunk_size_for(banks.seg.feats_MxD.shape[0])
        seg_scores = patch_scores(banks.seg, feats_TxPxD, seg_chunk, **kw)
    maps = anomaly_maps(seg_scores, tuple(grid), tuple(image_size), float(blur_sigma))
    return jnp.max(cls_scores, axis=1), maps
