"""Patch-level noise discriminators (METHOD.md section 3) and rank fusion (section 4, SoftPatch+).

Training patches are grouped by spatial position: feats_PxNxR holds, for each of the P positions, the
N training images' (projected) patch vectors. Every discriminator scores each patch against the other
images' patches at the same position; higher means more likely noise. All discriminators asked for
share one pairwise-distance computation per position, vmapped over positions and chunked over P.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

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


def _lof(d_NxN: jax.Array, k: int) -> jax.Array:
    """Local outlier factor from a distance matrix whose diagonal is +inf (self excluded)."""
    knn_d, knn_i = ops.smallest_k(d_NxN, k)  # [N, k]
    k_distance = knn_d[:, -1]
    reach = jnp.maximum(k_distance[knn_i], knn_d)
    # 1e-10 as scikit-learn, so that duplicates give a large finite density, not inf.
    lrd = 1.0 / (jnp.mean(reach, axis=1) + 1e-10)
    return jnp.mean(lrd[knn_i], axis=1) / lrd


def _mahalanobis(x_NxR: jax.Array, eps: float) -> jax.Array:
    """sqrt((x - mu)^T S^-1 (x - mu)), S = cov(x, ddof=1) + eps*I, over all N (self included)."""
    n, r = x_NxR.shape
    xc = x_NxR - jnp.mean(x_NxR, axis=0, keepdims=True)
    cov = jnp.matmul(xc.T, xc, precision=ops.PRECISION) / (n - 1) + eps * jnp.eye(r, dtype=xc.dtype)
    chol = jnp.linalg.cholesky(cov)
    y = jax.scipy.linalg.solve_triangular(chol, xc.T, lower=True)  # [R, N]
    return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(y), axis=0), 0.0))


def _position(x_NxR: jax.Array, names: tuple[str, ...], lof_k: int, eps: float) -> dict:
    out = {}
    if "nearest" in names or "lof" in names:
        # Centering changes no distance but keeps |a|^2+|b|^2-2ab accurate in float32.
        xc = x_NxR - jnp.mean(x_NxR, axis=0, keepdims=True)
        d2 = ops.pairwise_sqdist(xc, xc)
        d = jnp.where(jnp.eye(x_NxR.shape[0], dtype=bool), jnp.inf, jnp.sqrt(d2))
        if "nearest" in names:
            out["nearest"] = jnp.min(d, axis=1)
        if "lof" in names:
            out["lof"] = _lof(d, lof_k)
    if "gaussian" in names:
        out["gaussian"] = _mahalanobis(x_NxR, eps)
    return out


def chunk_size_for(n: int, r: int) -> int:
    """Positions per chunk so that the per-position [N, N] work fits a quarter of free memory."""
    return ops.chunk_rows(bytes_per_row=4 * (4 * n * n + 4 * n * r + 3 * r * r))


@functools.partial(jax.jit, static_argnames=("names", "lof_k", "gaussian_eps", "chunk_size"))
def score(
    feats_PxNxR: jax.Array,
    names: tuple[str, ...] = ("lof",),
    lof_k: int = 6,
    gaussian_eps: float = 0.01,
    chunk_size: int = 64,
) -> dict[str, jax.Array]:
    """Raw discriminator scores {name: [P, N]} (nearest distance, Mahalanobis distance, LOF).

    Requires N > lof_k when "lof" is asked for (see `effective_k`).
    """
    fn = jax.vmap(functools.partial(_position, names=names, lof_k=lof_k, eps=gaussian_eps))
    return ops.chunked_map(fn, feats_PxNxR.astype(jnp.float32), chunk_size)


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
