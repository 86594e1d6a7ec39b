"""Gaussian discriminator (METHOD.md section 3): the Mahalanobis distance of each patch to the
Gaussian of its position's N patches, covariance cov (ddof 1) + eps I, the patch itself included.
Soft weight = distance + 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from softpatch_jax import ops
from softpatch_jax.discriminators import linalg
from softpatch_jax.discriminators.registry import Discriminator, Position, float32_parts, register


def _mahalanobis(xc_NxR: jax.Array, eps: float) -> jax.Array:
    """sqrt((x - mu)^T S^-1 (x - mu)), S = cov(x, ddof=1) + eps*I, over all N (self included),
    from the centred rows xc = x - mu: O(N R^2 + R^3)."""
    n, r = xc_NxR.shape
    cov = ops.matmul(xc_NxR.T, xc_NxR) / (n - 1) + eps * jnp.eye(r, dtype=xc_NxR.dtype)
    # S = L L^T, so the squared distance is |L^-1 (x - mu)|^2.
    y = ops.matmul(xc_NxR, linalg.cholesky_inverse(cov).T)
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
    l_inv = linalg.cholesky_inverse(gram_NxN + lam * jnp.eye(n, dtype=gram_NxN.dtype))
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
        return float32_parts(d)


def _position(pos: Position, dtype: str, gaussian_eps: float):
    n, r = pos.x.shape
    if dtype == "float64":
        return _gaussian_float64(pos.x, gaussian_eps)
    if n <= r:
        # Fewer images than dimensions: the inverse is cheaper on the [N, N] Gram matrix that the
        # neighbours need anyway (2x faster for N=60, R=128) than on the [R, R] covariance.
        return _mahalanobis_from_gram(pos.get("gram"), gaussian_eps)
    return _mahalanobis(pos.get("centred"), gaussian_eps)


def _precision(setting: str, n: int, r: int, platform: str) -> str:
    """auto: float64 where N <= R (the distances saturate there, `_gaussian_float64`)."""
    if setting == "auto":
        return "float64" if platform != "tpu" and n <= r else "float32"
    return setting


register(
    Discriminator(
        name="gaussian",
        position=_position,
        soft_weight=lambda raw: raw + 1.0,
        params={"gaussian_eps": 0.01},
        precision=_precision,
        order=20,
        checks={"gaussian_eps": (lambda v: v > 0, "a number > 0")},
        summary="Mahalanobis distance to the position's Gaussian, cov + eps I (METHOD.md 3)",
    )
)
