"""Small dense linear algebra for the Gaussian discriminator, written as batched matmuls: a
Cholesky factor's inverse by recursive 2x2 blocking (jaxlib's CPU LAPACK kernels run a scalar loop
per batch element, or wait on the shared thread pool, which deadlocked the sharded discriminators).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from softpatch_jax import ops


def tril_inverse(l_RxR: jax.Array) -> jax.Array:
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


def cholesky_unblocked(s_RxR: jax.Array) -> jax.Array:
    """Lower Cholesky factor, one column per step (for the small diagonal blocks)."""
    r = s_RxR.shape[0]
    l_RxR = jnp.zeros_like(s_RxR)
    rows = jnp.arange(r)
    for j in range(r):
        v = s_RxR[:, j] - ops.matmul(l_RxR, l_RxR[j])  # l[j, j:] is still zero
        l_RxR = l_RxR.at[:, j].set(jnp.where(rows >= j, v / jnp.sqrt(v[j]), 0.0))
    return l_RxR


def cholesky_inverse(s_RxR: jax.Array, base: int = 32) -> jax.Array:
    """L^-1 for the Cholesky factor L of the SPD matrix S (S = L L^T), by recursive 2x2 blocking.

    L11 = chol(S11), L21 = S21 L11^-T, L22 = chol(S22 - L21 L21^T) and
    L^-1 = [[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]]: small matmuls all the way down. Written
    out instead of LAPACK's potrf because jaxlib's CPU kernel spreads a batch over the shared thread
    pool and waits there, which deadlocked the sharded discriminators on host devices
    (`parallel`); this is as fast on one device (float32 error ~1e-6 of the float64 inverse).
    """
    r = s_RxR.shape[0]
    if r <= base:
        return tril_inverse(cholesky_unblocked(s_RxR))
    h = r // 2
    inv11 = cholesky_inverse(s_RxR[:h, :h], base)
    l21 = ops.matmul(s_RxR[h:, :h], inv11.T)
    inv22 = cholesky_inverse(s_RxR[h:, h:] - ops.matmul(l21, l21.T), base)
    lower = -ops.matmul(inv22, ops.matmul(l21, inv11))
    top = jnp.concatenate([inv11, jnp.zeros((h, r - h), s_RxR.dtype)], axis=1)
    return jnp.concatenate([top, jnp.concatenate([lower, inv22], axis=1)], axis=0)
