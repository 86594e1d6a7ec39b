"""Array primitives shared by every stage: pairwise distances at pinned precision, smallest-k, a
nearest-row search, a chunked map over a leading axis that bounds peak memory with a static chunk
size, and chunk sizes derived from the memory actually free on the device (host RAM on CPU).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

# GPUs default to TF32 matmuls, which shift distances by ~1e-3 relative: enough to reorder near-ties.
PRECISION = jax.lax.Precision.HIGHEST


def fixed_order_sum(x: jax.Array, axis: int = -1) -> jax.Array:
    """Sum over `axis` as a pairwise tree of elementwise adds (zero-padded to a power of two).

    XLA picks a reduction's vectorisation by shape and fusion context, so the same row can sum to
    different bits in a [139, R] block than in a [1110, R] one, or in a vmapped batch of 3 positions
    than of 24; elementwise adds in a fixed order cannot. The sharded stages (`parallel`) rely on
    this to equal one device bit for bit.
    """
    x = jnp.moveaxis(x, axis, -1)
    w = x.shape[-1]
    size = 1 << max(0, (w - 1).bit_length())
    if size != w:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - w)])
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


def fixed_order_mean(x: jax.Array, axis: int = -1) -> jax.Array:
    return fixed_order_sum(x, axis) / x.shape[axis]


def sq_norms(x_NxD: jax.Array) -> jax.Array:
    """Squared row norms, bitwise the same for a row whatever block it sits in (`fixed_order_sum`)."""
    return fixed_order_sum(jnp.square(x_NxD))


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """`jnp.matmul` at `PRECISION`."""
    return jnp.matmul(a, b, precision=PRECISION)


def pairwise_sqdist(
    a_MxD: jax.Array,
    b_NxD: jax.Array,
    a_sq_M: jax.Array | None = None,
    b_sq_N: jax.Array | None = None,
    ab_MxN: jax.Array | None = None,
) -> jax.Array:
    """Squared Euclidean distances [M, N] via |a|^2 + |b|^2 - 2ab, clamped at 0 (norms and the
    products a b^T are computed unless given)."""
    a_sq = sq_norms(a_MxD) if a_sq_M is None else a_sq_M
    b_sq = sq_norms(b_NxD) if b_sq_N is None else b_sq_N
    ab = matmul(a_MxD, b_NxD.T) if ab_MxN is None else ab_MxN
    return jnp.maximum(a_sq[:, None] + b_sq[None, :] - 2.0 * ab, 0.0)


@jax.jit
def mean_row(x_NxD: jax.Array) -> jax.Array:
    """Column means [1, D] in float32. Its own jitted function so that every caller (one device or
    sharded) centres on bitwise the same vector."""
    return jnp.mean(x_NxD.astype(jnp.float32), axis=0, keepdims=True)


def pairwise_dist(a_MxD: jax.Array, b_NxD: jax.Array) -> jax.Array:
    return jnp.sqrt(pairwise_sqdist(a_MxD, b_NxD))


def first_argmax(x_KxN: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` (first index of the max; no NaNs) as two plain reductions: XLA's CPU
    backend runs argmax's (value, index) reduce over rows of a [4, N] array ~7x slower than one
    [N] row, where a max and an index min stay vectorised (measured at N = 156,800)."""
    n = x_KxN.shape[-1]
    top = jnp.max(x_KxN, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x_KxN.shape, x_KxN.ndim - 1)
    return jnp.min(jnp.where(x_KxN == top, iota, n), axis=-1)


def smallest_k(x_NxM: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k smallest values per row, ascending, and their column indices."""
    neg, idx = jax.lax.top_k(-x_NxM, k)
    return -neg, idx


def chunked_map(fn: Callable, xs, chunk_size: int, axis: int = 0):
    """Applies `fn` to chunks of `chunk_size` entries along `axis` of every leaf of `xs`
    (sequentially, via lax.map) and concatenates the results along their first axis.

    `fn` maps a pytree of chunks (size `chunk_size` on `axis`) to a pytree of [chunk_size, ...]
    arrays. Every chunk has the same static size, so the last one is shifted back to end at the last
    entry (overlapping the one before; its repeated rows are dropped) instead of padding: no padded
    copy of the whole input is ever made. A chunk is sliced where it lies, so `fn` may transpose it
    (`axis` > 0) without a transposed copy of the whole input.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    n = jax.tree.leaves(xs)[0].shape[axis]

    def take(start, size):
        return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis), xs)

    c = min(chunk_size, n)
    num = -(-n // c)
    if num == 1:
        return fn(take(0, c))
    out = jax.lax.map(lambda i: fn(take(jnp.minimum(i * c, n - c), c)), jnp.arange(num))
    seen = num * c - n  # leading rows of the last chunk that the one before already covered

    def stitch(y):
        return jnp.concatenate([y[:-1].reshape(-1, *y.shape[2:]), y[-1, seen:]], axis=0)

    return jax.tree.map(stitch, out)


def nearest_rows(
    query_QxD: jax.Array, bank_MxD: jax.Array, bank_sq_M: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For each query row: the smallest expanded squared distance to a bank row, that row's index
    (first on ties), and the distance recomputed directly as |q - b| (the expanded form loses small
    distances to cancellation in float32). Callers centre both sides on the bank mean first.

    A bank row whose `bank_sq_M` is +inf is never picked (padding in the sharded search).
    """
    d2 = pairwise_sqdist(query_QxD, bank_MxD, b_sq_N=bank_sq_M)
    idx = jnp.argmin(d2, axis=1)
    best = jnp.take_along_axis(d2, idx[:, None], axis=1)[:, 0]
    return best, idx, jnp.sqrt(sq_norms(query_QxD - bank_MxD[idx]))


# Unit roundoff of float32, and of the inputs of the reduced-precision product (round to nearest).
U32 = 2.0**-24
U_BF16 = 2.0**-8


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): bounds the float32 rounding error of an n-term dot product
    |fl(x.y) - x.y| <= gamma_n |x| |y| in any summation order, FMA or not."""
    return n * U32 / (1.0 - n * U32)


def search_bounds(d: int) -> tuple[float, float, float]:
    """Relative error bounds of the certified search (`certified_nearest_rows`), times a safety 2:

    - c_low: |L - T| <= c_low (|q|^2 + |b|^2), L the squared distance from bfloat16-rounded inputs
      (each product q'b' exact in float32, accumulated in float32), T the true one: input rounding
      |q.b - q'.b'| <= (2u + u^2) |q||b|, accumulation gamma_D |q'||b'|, the norms gamma_D each, the
      two float32 sums a few ulps of |q|^2 + |b|^2 + 2|q||b| <= 2 (|q|^2 + |b|^2).
    - c_exact: |E - T| <= c_exact (|q|^2 + |b|^2), E what the exact search compares (`nearest_rows`:
      float32 |q|^2 + |b|^2 - 2 qb at full precision, clamped at 0, which only moves it towards T).
    - delta: |D - T| <= delta T, D the direct float32 sum of (q - b)^2.
    """
    g = gamma(d + 4)
    c_low = 2.0 * ((2 * U_BF16 + U_BF16**2) + g * (1 + U_BF16) ** 2 + g + 8 * U32)
    c_exact = 2.0 * (2 * g + 8 * U32)
    return c_low, c_exact, 2.0 * g


def reduced_products(a_QxD: jax.Array, b_MxD: jax.Array, emulate: bool) -> jax.Array:
    """a b^T [Q, M] from bfloat16-rounded inputs, accumulated in float32: on tensor cores as a
    bfloat16 matmul, or (`emulate`) as the float32 product of the rounded values, which has the
    same error bound (each product of two bfloat16 values is exact in float32)."""
    if emulate:
        r = lambda x: jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)
        return matmul(r(a_QxD), r(b_MxD).T)
    bf = jnp.bfloat16
    return jnp.matmul(a_QxD.astype(bf), b_MxD.astype(bf).T, preferred_element_type=jnp.float32)


def certified_nearest_rows(
    query_QxD: jax.Array,
    bank_MxD: jax.Array,
    bank_sq_M: jax.Array,
    candidates: int,
    emulate: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`nearest_rows`' index and distance from a reduced-precision search, with a certificate.

    Candidates: the `candidates` bank rows of smallest lower bound on E (the exact search's
    expanded squared distance), from the bfloat16 distances L and the bounds of `search_bounds`.
    They are re-ranked by their direct float32 squared distance D; the winner c is certified when
    an upper bound of E_c is below a lower bound of E_j for every other row j: the other candidates
    through D_j, all the rest through the next-smallest lower bound. Then c is the exact search's
    argmin (strictly smaller E, so no tie rule is involved) and its distance, recomputed as there,
    has the same bits. Returns (idx [Q], dist [Q], certified bool [Q]); uncertified rows are for
    the caller to search exactly. Both sides centred on the bank mean, as for `nearest_rows`.
    """
    c_low, c_exact, delta = search_bounds(query_QxD.shape[1])
    q_sq = sq_norms(query_QxD)
    scale_QxM = (q_sq[:, None] + bank_sq_M[None, :]) * (1.0 + 4 * U32)
    low_QxM = (
        q_sq[:, None] + bank_sq_M[None, :] - 2.0 * reduced_products(query_QxD, bank_MxD, emulate)
    )
    lower_QxM = low_QxM - (c_low + c_exact) * scale_QxM
    k = min(candidates, bank_MxD.shape[0])
    lb_QxK1, cand_QxK1 = smallest_k(lower_QxM, min(k + 1, bank_MxD.shape[0]))
    cand_QxK = cand_QxK1[:, :k]
    rest_Q = lb_QxK1[:, k] if k < bank_MxD.shape[0] else jnp.full(q_sq.shape, jnp.inf)
    direct_QxK = sq_norms(query_QxD[:, None, :] - bank_MxD[cand_QxK])
    w = jnp.argmin(direct_QxK, axis=1)
    idx = jnp.take_along_axis(cand_QxK, w[:, None], axis=1)[:, 0]
    scale_QxK = (q_sq[:, None] + bank_sq_M[cand_QxK]) * (1.0 + 4 * U32)
    upper_Q = jnp.take_along_axis(direct_QxK * (1 + delta) + c_exact * scale_QxK, w[:, None], 1)
    others_QxK = direct_QxK * (1 - delta) - c_exact * scale_QxK
    others_QxK = jnp.where(jnp.arange(k)[None, :] == w[:, None], jnp.inf, others_QxK)
    ok = upper_Q[:, 0] < jnp.minimum(jnp.min(others_QxK, axis=1), rest_Q)
    return idx, jnp.sqrt(sq_norms(query_QxD - bank_MxD[idx])), ok


def host_available_bytes() -> int | None:
    """Memory the OS can still hand this process (Linux MemAvailable, else free pages), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def device_memory_bytes(default: int = 4 << 30) -> int:
    """Free memory of the first local device.

    Accelerators report it through `memory_stats()`; the CPU backend does not, and there the device
    *is* host memory, so the system's available memory is used. `default` only where neither says.
    """
    device = jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # some backends raise instead of returning None
        stats = {}
    limit = stats.get("bytes_limit")
    if limit is not None:
        return max(int(limit) - int(stats.get("bytes_in_use", 0)), 1 << 28)
    if device.platform == "cpu":
        avail = host_available_bytes()
        if avail is not None:
            return max(avail, 1 << 28)
    return default


def chunk_rows(bytes_per_row: int, budget_bytes: int | None = None, fraction: float = 0.25) -> int:
    """How many rows of `bytes_per_row` fit in `fraction` of the free device memory (at least 1).

    Rounded down to a power of two: chunk sizes are static arguments of jitted functions, and free
    memory drifts between calls, so exact sizes would recompile on every small change.
    """
    budget = device_memory_bytes() if budget_bytes is None else budget_bytes
    rows = max(1, int(budget * fraction) // max(1, bytes_per_row))
    return 1 << (rows.bit_length() - 1)
