"""Patch-level noise discriminators (METHOD.md section 3) and rank fusion (section 4, SoftPatch+).

Training patches are grouped by spatial position: feats_PxNxR holds, for each of the P positions, the
N training images' (projected) patch vectors. Every discriminator scores each patch against the other
images' patches at the same position; higher means more likely noise. All discriminators asked for
share one pairwise-distance computation per position, vmapped over positions and chunked over P.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from softpatch_jax import ops

NAMES = ("nearest", "gaussian", "lof")


def check_names(names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(names)
    bad = [n for n in names if n not in NAMES]
    if bad or not names:
        raise ValueError(f"unknown discriminator(s) {bad or names}; valid: {NAMES}")
    return names


def _lof(knn_d: jax.Array, knn_i: jax.Array) -> jax.Array:
    """Local outlier factor from each point's k nearest distances and indices (self excluded)."""
    k_distance = knn_d[:, -1]
    reach = jnp.maximum(k_distance[knn_i], knn_d)
    # 1e-10 as scikit-learn, so that duplicates give a large finite density, not inf.
    lrd = 1.0 / (ops.fixed_order_mean(reach, axis=1) + 1e-10)
    return ops.fixed_order_mean(lrd[knn_i], axis=1) / lrd


def _tril_inverse(l_RxR: jax.Array) -> jax.Array:
    """Inverse of a lower-triangular matrix by recursive 2x2 blocking, level by level.

    [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]: every level is a batch of small
    matmuls. XLA's CPU triangular solve runs a scalar loop per batch element, which made the
    Gaussian discriminator ~20x slower than this for R = 128 vmapped over positions.
    """
    r = l_RxR.shape[0]
    size = 1 << max(0, (r - 1).bit_length())
    if size != r:  # pad to a power of two with an identity block: the inverse stays block-exact
        l_RxR = jnp.pad(l_RxR, ((0, size - r), (0, size - r)))
        l_RxR = l_RxR + jnp.diag(jnp.arange(size) >= r).astype(l_RxR.dtype)
    inv = (1.0 / jnp.diagonal(l_RxR)).reshape(size, 1, 1)  # diagonal blocks of the inverse
    b = 1
    while b < size:
        nb = size // (2 * b)
        # The merged diagonal blocks of L: [nb, 2b, 2b], of which the lower-left [b, b] is B.
        blocks = l_RxR.reshape(nb, 2 * b, nb, 2 * b)[jnp.arange(nb), :, jnp.arange(nb), :]
        a_inv, c_inv = inv[0::2], inv[1::2]
        lower = -ops.matmul(c_inv, ops.matmul(blocks[:, b:, :b], a_inv))
        zeros = jnp.zeros_like(lower)
        top = jnp.concatenate([a_inv, zeros], axis=2)
        bottom = jnp.concatenate([lower, c_inv], axis=2)
        inv = jnp.concatenate([top, bottom], axis=1)
        b *= 2
    return inv[0, :r, :r]


def _cholesky_unblocked(s_RxR: jax.Array) -> jax.Array:
    """Lower Cholesky factor, one column per step (for the small diagonal blocks)."""
    r = s_RxR.shape[0]
    l_RxR = jnp.zeros_like(s_RxR)
    rows = jnp.arange(r)
    for j in range(r):
        v = s_RxR[:, j] - ops.matmul(l_RxR, l_RxR[j])  # l[j, j:] is still zero
        l_RxR = l_RxR.at[:, j].set(jnp.where(rows >= j, v / jnp.sqrt(v[j]), 0.0))
    return l_RxR


def _cholesky_inverse(s_RxR: jax.Array, base: int = 32) -> jax.Array:
    """L^-1 for the Cholesky factor L of the SPD matrix S (S = L L^T), by recursive 2x2 blocking.

    L11 = chol(S11), L21 = S21 L11^-T, L22 = chol(S22 - L21 L21^T) and
    L^-1 = [[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]]: small matmuls all the way down. Written
    out instead of LAPACK's potrf because jaxlib's CPU kernel spreads a batch over the shared thread
    pool and waits there, which deadlocked the sharded discriminators on host devices
    (`parallel`); this is as fast on one device (float32 error ~1e-6 of the float64 inverse).
    """
    r = s_RxR.shape[0]
    if r <= base:
        return _tril_inverse(_cholesky_unblocked(s_RxR))
    h = r // 2
    inv11 = _cholesky_inverse(s_RxR[:h, :h], base)
    l21 = ops.matmul(s_RxR[h:, :h], inv11.T)
    inv22 = _cholesky_inverse(s_RxR[h:, h:] - ops.matmul(l21, l21.T), base)
    lower = -ops.matmul(inv22, ops.matmul(l21, inv11))
    top = jnp.concatenate([inv11, jnp.zeros((h, r - h), s_RxR.dtype)], axis=1)
    return jnp.concatenate([top, jnp.concatenate([lower, inv22], axis=1)], axis=0)


def _mahalanobis(xc_NxR: jax.Array, eps: float) -> jax.Array:
    """sqrt((x - mu)^T S^-1 (x - mu)), S = cov(x, ddof=1) + eps*I, over all N (self included),
    from the centred rows xc = x - mu: O(N R^2 + R^3)."""
    n, r = xc_NxR.shape
    cov = ops.matmul(xc_NxR.T, xc_NxR) / (n - 1) + eps * jnp.eye(r, dtype=xc_NxR.dtype)
    # S = L L^T, so the squared distance is |L^-1 (x - mu)|^2.
    y = ops.matmul(xc_NxR, _cholesky_inverse(cov).T)
    return jnp.sqrt(jnp.maximum(ops.sq_norms(y), 0.0))


def _mahalanobis_from_gram(gram_NxN: jax.Array, eps: float) -> jax.Array:
    """`_mahalanobis` from the centred Gram matrix K = xc xc^T instead: O(N^3), for N <= R.

    With lam = (N-1) eps, xc (xc^T xc + lam I)^-1 xc^T = K (K + lam I)^-1 = I - lam (K + lam I)^-1,
    so the squared distance is (N-1) (1 - lam [(K + lam I)^-1]_ii), and the diagonal of an SPD
    inverse is the column sums of squares of L^-1. The subtracted term is at most 1/N + the
    share of eps in S, so nothing cancels catastrophically.
    """
    n = gram_NxN.shape[0]
    lam = (n - 1) * eps
    l_inv = _cholesky_inverse(gram_NxN + lam * jnp.eye(n, dtype=gram_NxN.dtype))
    diag_inv = ops.fixed_order_sum(jnp.square(l_inv.T))
    return jnp.sqrt(jnp.maximum((n - 1) * (1.0 - lam * diag_inv), 0.0))


def _gaussian_float64(x_NxR: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """The Mahalanobis distance computed in float64, returned as two float32 parts hi + lo.

    With fewer images than dimensions (N <= R) the regularised in-sample distances all lie within
    a fraction of a percent of sqrt(N-1) (without eps they would all equal (N-1)/sqrt(N)): only the
    eps term tells patches apart, and neighbours in the ranking differ by ~1e-8 relative, below
    float32's resolution (6e-8). float32 then breaks those near-ties by its rounding, which changes
    which patches the top-tau removal drops. In float64 (traced under `jax.enable_x64` for this
    function only) the ranking is the exact-arithmetic one, and the pair keeps it: hi = float32(d)
    carries the value (soft weights), lo = float32(d - hi) the rest of the order (`order_key`).
    """
    with jax.enable_x64(True):
        x = x_NxR.astype(jnp.float64)
        n, r = x.shape
        xc = x - ops.fixed_order_mean(x, axis=0)[None, :]
        if n <= r:
            d = _mahalanobis_from_gram(ops.matmul(xc, xc.T), eps)
        else:
            d = _mahalanobis(xc, eps)
        return _float32_parts(d)


def _nearest_float64(x_NxR: jax.Array, cand_NxM: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The nearest-neighbour distance in float64 over each row's M candidates (the M nearest by the
    float32 expanded form), as float32 hi + lo.

    The expanded form |a|^2 + |b|^2 - 2ab cancels: its float32 distances carry up to ~1e-3 relative
    error, while neighbours at the tau quantile can differ by ~1e-7 (3e-7 on a piped category),
    which flipped a removal there against the reference's float64. The direct form in float64 over
    a few candidates is exact to rounding and costs O(N M R).
    """
    with jax.enable_x64(True):
        x = x_NxR.astype(jnp.float64)
        d2 = ops.fixed_order_sum(jnp.square(x[:, None, :] - x[cand_NxM]))
        return _float32_parts(jnp.sqrt(jnp.min(d2, axis=1)))


def _float32_parts(d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A float64 array as float32 hi = float32(d) and lo = float32(d - hi) (inside `enable_x64`)."""
    hi = d.astype(jnp.float32)
    return hi, (d - hi.astype(jnp.float64)).astype(jnp.float32)


# Candidates re-ranked in float64 for the nearest distance: the true nearest is among the float32
# expanded form's few nearest unless that many neighbours lie within its ~1e-3 relative error.
NEAREST_CANDIDATES = 4


def _position(
    x_NxR: jax.Array, names: tuple[str, ...], lof_k: int, eps: float, precision: tuple[str, str]
) -> dict:
    n, r = x_NxR.shape
    # Centering changes no distance but keeps |a|^2+|b|^2-2ab accurate in float32.
    xc = x_NxR - ops.fixed_order_mean(x_NxR, axis=0)[None, :]
    knn = "nearest" in names or "lof" in names
    # Fewer images than dimensions: the Gaussian's inverse is cheaper on the [N, N] Gram matrix
    # that the neighbours need anyway (2x faster for N=60, R=128) than on the [R, R] covariance.
    gaussian_dtype, nearest_dtype = precision
    gaussian_by_gram = "gaussian" in names and n <= r and gaussian_dtype == "float32"
    if knn or gaussian_by_gram:
        sq = ops.sq_norms(xc)
        gram = ops.matmul(xc, xc.T)
    out = {}
    if knn:
        d2 = ops.pairwise_sqdist(xc, xc, sq, sq, ab_MxN=gram)
        d2 = jnp.where(jnp.eye(n, dtype=bool), jnp.inf, d2)
        # Neighbours are ranked on squared distances (sqrt is monotone), so only the k picked ones
        # are square-rooted, not the whole [N, N] block; the nearest is the first of them.
        if "lof" in names:
            knn_d2, knn_i = ops.smallest_k(d2, lof_k)
            knn_d = jnp.sqrt(knn_d2)
            out["lof"] = _lof(knn_d, knn_i)
            nearest = knn_d[:, 0]
        else:
            nearest = jnp.sqrt(jnp.min(d2, axis=1))
        if "nearest" in names and nearest_dtype == "float64":
            _, cand = ops.smallest_k(d2, min(NEAREST_CANDIDATES, n - 1))
            out["nearest"], out[low_key("nearest")] = _nearest_float64(x_NxR, cand)
        elif "nearest" in names:
            out["nearest"] = nearest
    if "gaussian" in names and gaussian_dtype == "float64":
        out["gaussian"], out[low_key("gaussian")] = _gaussian_float64(x_NxR, eps)
    elif "gaussian" in names:
        out["gaussian"] = (
            _mahalanobis_from_gram(gram, eps) if gaussian_by_gram else _mahalanobis(xc, eps)
        )
    return out


def low_key(name: str) -> str:
    """The scores-dict key of the low part of a score computed in float64 (`_gaussian_float64`,
    `_nearest_float64`): `scores[name]` holds hi, `scores[low_key(name)]` lo (`_float32_parts`)."""
    return f"{name}_lo"


def resolve_precision(
    setting: str, num_images: int, dim: int, platform: str | None = None
) -> tuple[str, str]:
    """The dtypes (Gaussian, nearest distance) for `setting` ("float32", "float64" for both, or
    "auto"). "auto": the nearest distance's candidates in float64 (`_nearest_float64`) and the
    Gaussian in float64 where N <= R (the distances saturate there, `_gaussian_float64`); all
    float32 on TPUs, which have no native float64. LOF stays float32: its scores are ratios of
    k-distances, already at parity with the reference."""
    if setting == "auto":
        if (platform or jax.default_backend()) == "tpu":
            return ("float32", "float32")
        return ("float64" if num_images <= dim else "float32", "float64")
    if setting not in ("float32", "float64"):
        raise ValueError(f"score_dtype must be 'auto', 'float32' or 'float64', got {setting!r}")
    return (setting, setting)


def order_key(scores: dict[str, jax.Array], name: str) -> jax.Array:
    """What ranks `name`'s patches: its float32 score, or, for a score kept as hi + lo, dense integer
    ranks (ties share one) in the order of hi + lo, so that top-tau removal and rank fusion see the
    float64 order. Same shape as the score."""
    lo = scores.get(low_key(name))
    if lo is None:
        return scores[name]
    return _dense_ranks(scores[name], lo)


@jax.jit
def _dense_ranks(hi: jax.Array, lo: jax.Array) -> jax.Array:
    """int32 ranks of (hi, lo) in lexicographic order (hi + lo's order, as |lo| <= ulp(hi) / 2)."""
    flat_hi, flat_lo = hi.reshape(-1), lo.reshape(-1)
    idx = jnp.arange(flat_hi.shape[0], dtype=jnp.int32)
    s_hi, s_lo, order = jax.lax.sort((flat_hi, flat_lo, idx), num_keys=2)
    step = (s_hi[1:] != s_hi[:-1]) | (s_lo[1:] != s_lo[:-1])
    dense = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(step, dtype=jnp.int32)])
    return jnp.zeros_like(idx).at[order].set(dense).reshape(hi.shape)


# On CPU a chunk's [C, N, N] distance block is also kept near cache size (L2/L3): N=200 runs 1.5x
# faster in chunks of 16 positions (2.6 MB) than in one chunk of all 784 (launch/bench.py).
CPU_CHUNK_BYTES = 4 << 20


def chunk_size_for(n: int, r: int, platform: str | None = None) -> int:
    """Positions per chunk: the per-position [N, N] work fits a quarter of free memory, and on CPU
    the chunk's [C, N, N] block fits `CPU_CHUNK_BYTES` (at least 2 positions, see `_batch`)."""
    rows = ops.chunk_rows(bytes_per_row=4 * (4 * n * n + 4 * n * r + 3 * r * r))
    if (platform or jax.default_backend()) == "cpu":
        rows = min(rows, ops.chunk_rows(4 * n * n, budget_bytes=CPU_CHUNK_BYTES, fraction=1.0))
    return max(2, rows)


def positions_fn(
    names: tuple[str, ...],
    lof_k: int,
    gaussian_eps: float,
    precision: tuple[str, str] = ("float32", "float32"),
) -> Callable:
    """The per-chunk discriminator function [C, N, R] -> {name: [C, N]} (float32 inside, except
    scores computed in float64, returned as two float32 parts; see `low_key`, `resolve_precision`)."""
    one = functools.partial(
        _position, names=names, lof_k=lof_k, eps=gaussian_eps, precision=precision
    )
    return lambda x_CxNxR: jax.vmap(one)(x_CxNxR.astype(jnp.float32))


def _batch(chunk_size: int) -> int:
    """Positions per vmapped chunk: never 1 (where data allow), because XLA drops a batch dimension
    of size 1 and compiles the per-position matmuls differently, changing their last bits; batches
    of 2 and more give every position the same bits whatever the batch (checked by
    tests/test_parallel.py, whose shards hold fewer positions than one device's chunk)."""
    return max(2, chunk_size) if chunk_size > 0 else chunk_size


def score_local(
    pool_NxPxR: jax.Array,
    names: tuple[str, ...],
    lof_k: int,
    gaussian_eps: float,
    chunk_size: int,
    score_dtype: str = "auto",
) -> dict[str, jax.Array]:
    """Unjitted body of `score_pool`, also run per device shard by `parallel`: {name: [P, N]}.

    Positions are sliced out of the image-major pool and transposed one chunk at a time, so no
    transposed copy of the whole pool is made.
    """
    n, _, r = pool_NxPxR.shape
    fn = positions_fn(names, lof_k, gaussian_eps, resolve_precision(score_dtype, n, r))
    by_position = lambda chunk_NxCxR: fn(jnp.transpose(chunk_NxCxR, (1, 0, 2)))
    return ops.chunked_map(by_position, pool_NxPxR, _batch(chunk_size), axis=1)


_STATIC = ("names", "lof_k", "gaussian_eps", "chunk_size", "score_dtype")


@functools.partial(jax.jit, static_argnames=_STATIC)
def score_pool(
    pool_NxPxR: jax.Array,
    names: tuple[str, ...] = ("lof",),
    lof_k: int = 6,
    gaussian_eps: float = 0.01,
    chunk_size: int = 64,
    score_dtype: str = "auto",
) -> dict[str, jax.Array]:
    """As `score`, on the image-major pool [N, P, R] (the layout projection produces), returning
    {name: [P, N]}; positions are sliced and transposed one chunk at a time."""
    return score_local(pool_NxPxR, names, lof_k, gaussian_eps, chunk_size, score_dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
def score(
    feats_PxNxR: jax.Array,
    names: tuple[str, ...] = ("lof",),
    lof_k: int = 6,
    gaussian_eps: float = 0.01,
    chunk_size: int = 64,
    score_dtype: str = "auto",
) -> dict[str, jax.Array]:
    """Raw discriminator scores {name: [P, N]} (nearest distance, Mahalanobis distance, LOF).

    Requires N > lof_k when "lof" is asked for (see `effective_k`). score_dtype: "auto" computes
    the nearest distance, and the Gaussian where N <= R, in float64 (`resolve_precision`); a score
    computed in float64 adds the key `low_key(name)`.
    """
    _, n, r = feats_PxNxR.shape
    fn = positions_fn(names, lof_k, gaussian_eps, resolve_precision(score_dtype, n, r))
    return ops.chunked_map(fn, feats_PxNxR, _batch(chunk_size))


def effective_k(lof_k: int, num_images: int) -> int:
    """scikit-learn's rule: n_neighbors larger than N-1 is reduced to N-1."""
    if num_images < 2:
        raise ValueError(f"the discriminators need at least 2 training images, got {num_images}")
    return max(1, min(lof_k, num_images - 1))


def soft_weight(name: str, raw: jax.Array) -> jax.Array:
    """The reference's soft weights: distance-type scores + 1, LOF clamped at 0."""
    if name in ("nearest", "gaussian"):
        return raw + 1.0
    if name == "lof":
        return jnp.maximum(raw, 0.0)
    raise ValueError(f"no soft weight for {name!r}; valid: {NAMES}")


def rank_normalise(w: jax.Array, axis: int | None = None) -> jax.Array:
    """rank(w) / count with ascending ranks, ties given their average rank (scipy's 'average').

    axis=None ranks over all elements; an int ranks independently along that axis.
    """
    if axis is None:
        flat = w.reshape(-1)
        s = jnp.sort(flat)
        lo = jnp.searchsorted(s, flat, side="left")
        hi = jnp.searchsorted(s, flat, side="right")
        return ((lo + hi + 1) / 2.0 / flat.shape[0]).reshape(w.shape).astype(jnp.float32)
    moved = jnp.moveaxis(w, axis, -1)
    lead = moved.shape[:-1]
    ranked = jax.vmap(rank_normalise)(moved.reshape(-1, moved.shape[-1]))
    return jnp.moveaxis(ranked.reshape(*lead, moved.shape[-1]), -1, axis)


def fuse(scores_PxN: dict[str, jax.Array], names: Sequence[str], scope: str = "all") -> jax.Array:
    """SoftPatch+ (eq. 7-8): mean of the rank-normalised scores of `names`, shape [P, N].

    scope: "all" ranks over every training patch, "position" over the N patches of each position.
    """
    if scope not in ("all", "position"):
        raise ValueError(f"rank_scope must be 'all' or 'position', got {scope!r}")
    axis = None if scope == "all" else 1
    ranks = [rank_normalise(scores_PxN[n], axis=axis) for n in check_names(names)]
    return sum(ranks[1:], ranks[0]) / len(ranks)
