"""Approximate greedy k-center coreset (PatchCore, METHOD.md section 4) with a removal mask.

Start: every patch's mean distance to `num_starts` random patches. Then, `num_samples` times: pick
the kept patch farthest from the selection (argmax of the running min-distance) and lower the running
min-distance with the distances to the picked patch. Removed patches are never picked (the reference
multiplies their distances by 0; here they sit at -1, which also holds when every distance is 0).
The whole loop is one compiled `fori_loop` on the device: one pass over the features per step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from softpatch_jax import ops


def draw_starts(key: jax.Array, num_patches: int, num_starts: int = 10) -> jax.Array:
    """Random distinct start patches over the whole pool (removed ones included, as the reference)."""
    return jax.random.choice(key, num_patches, (min(num_starts, num_patches),), replace=False)


@functools.partial(jax.jit, static_argnames=("num_samples",))
def greedy(
    feats_NxR: jax.Array, keep_N: jax.Array, starts_S: jax.Array, num_samples: int
) -> jax.Array:
    """Indices [num_samples] of the coreset, in the order picked.

    Args:
      feats_NxR: the pool (projected) features; N here is every training patch.
      keep_N: bool, False for removed patches. At least `num_samples` must be True.
      starts_S: indices of the start patches.
      num_samples: coreset size M (static).
    """
    x = feats_NxR.astype(jnp.float32)
    x = x - jnp.mean(
        x, axis=0, keepdims=True
    )  # distances unchanged; float32 |a|^2+|b|^2-2ab stays accurate
    x_sq = ops.sq_norms(x)
    start = jnp.mean(jnp.sqrt(ops.pairwise_sqdist(x, x[starts_S], x_sq, x_sq[starts_S])), axis=1)
    min_d = jnp.where(keep_N, start, -1.0)

    def step(i, carry):
        min_d, picked = carry
        j = jnp.argmax(min_d)
        d2 = x_sq + x_sq[j] - 2.0 * jnp.matmul(x, x[j], precision=ops.PRECISION)
        min_d = jnp.minimum(min_d, jnp.sqrt(jnp.maximum(d2, 0.0)))
        min_d = min_d.at[j].set(-1.0)  # never picked twice, even among exact duplicates
        return min_d, picked.at[i].set(j.astype(jnp.int32))

    _, picked = jax.lax.fori_loop(
        0, num_samples, step, (min_d, jnp.zeros((num_samples,), jnp.int32))
    )
    return picked


def num_samples(ratio: float, num_patches: int, num_kept: int) -> int:
    """Coreset size: int(ratio * all patches) (removed ones counted, as the reference), at most the
    number kept, at least 1."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    return max(1, min(int(ratio * num_patches), num_kept))
