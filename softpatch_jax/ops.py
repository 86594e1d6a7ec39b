"""Array primitives shared by every stage: pairwise distances at pinned precision, smallest-k, and a
chunked map over a leading axis that bounds peak memory with a static chunk size.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# GPUs default to TF32 matmuls, which shift distances by ~1e-3 relative: enough to reorder near-ties.
PRECISION = jax.lax.Precision.HIGHEST


def sq_norms(x_NxD: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(x_NxD), axis=-1)


def pairwise_sqdist(
    a_MxD: jax.Array,
    b_NxD: jax.Array,
    a_sq_M: jax.Array | None = None,
    b_sq_N: jax.Array | None = None,
) -> jax.Array:
    """Squared Euclidean distances [M, N] via |a|^2 + |b|^2 - 2ab, clamped at 0."""
    a_sq = sq_norms(a_MxD) if a_sq_M is None else a_sq_M
    b_sq = sq_norms(b_NxD) if b_sq_N is None else b_sq_N
    ab = jnp.matmul(a_MxD, b_NxD.T, precision=PRECISION)
    return jnp.maximum(a_sq[:, None] + b_sq[None, :] - 2.0 * ab, 0.0)


def pairwise_dist(a_MxD: jax.Array, b_NxD: jax.Array) -> jax.Array:
    return jnp.sqrt(pairwise_sqdist(a_MxD, b_NxD))


def smallest_k(x_NxM: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k smallest values per row, ascending, and their column indices."""
    neg, idx = jax.lax.top_k(-x_NxM, k)
    return -neg, idx


def chunked_map(fn: Callable, xs, chunk_size: int):
    """Applies `fn` to chunks of `chunk_size` rows of every leaf of `xs` (sequentially, via lax.map)
    and concatenates the results; the last chunk is padded with copies of row 0 and trimmed.

    `fn` maps a pytree of [chunk_size, ...] arrays to a pytree of [chunk_size, ...] arrays.
    """
    leaves = jax.tree.leaves(xs)
    n = leaves[0].shape[0]
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if n <= chunk_size:
        return fn(xs)
    num_chunks = -(-n // chunk_size)
    pad = num_chunks * chunk_size - n

    def split(x):
        if pad:
            x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad, *x.shape[1:]))], axis=0)
        return x.reshape(num_chunks, chunk_size, *x.shape[1:])

    out = jax.lax.map(fn, jax.tree.map(split, xs))
    return jax.tree.map(lambda y: y.reshape(num_chunks * chunk_size, *y.shape[2:])[:n], out)


def device_memory_bytes(default: int = 4 << 30) -> int:
    """Free memory of the first local device, or `default` where the backend does not say (CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # some backends raise instead of returning None
        stats = {}
    limit = stats.get("bytes_limit")
    if limit is None:
        return default
    return max(int(limit) - int(stats.get("bytes_in_use", 0)), 1 << 28)


def chunk_rows(bytes_per_row: int, budget_bytes: int | None = None, fraction: float = 0.25) -> int:
    """How many rows of `bytes_per_row` fit in `fraction` of the free device memory (at least 1)."""
    budget = device_memory_bytes() if budget_bytes is None else budget_bytes
    return max(1, int(budget * fraction) // max(1, bytes_per_row))
