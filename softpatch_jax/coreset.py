"""Approximate greedy k-center coreset (PatchCore, METHOD.md section 4) with a removal mask.

Start: every patch's mean distance to `num_starts` random patches (128 by default, as the authors'
code: its `WeightedGreedyCoresetSampler` passes its projection size into the start count). Then,
`num_samples` times: pick the kept patch farthest from the selection (argmax of the running
min-distance) and lower the running min-distance with the distances to the picked patch. Removed
patches are never picked: they sit at -1 from the start, which also holds when every distance is 0.

`strict=True` reproduces the reference loop exactly instead (a defect kept only for parity checks):
it multiplies the distances it ADDS after each pick by the keep mask (0 for removed patches) but
leaves the starting distances unmasked, so its first pick can be a removed (noisy) patch.
The whole loop is one compiled `fori_loop` on the device whose step reads the features once (a
vector-matrix product); everything else in a step touches only [N] vectors. The inputs it needs
(`prepare`) do not depend on the removal mask, so banks with different masks share them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from softpatch_jax import ops


def draw_starts(key: jax.Array, num_patches: int, num_starts: int = 128) -> jax.Array:
    """Random distinct start patches over the whole pool (removed ones included, as the reference)."""
    return jax.random.choice(key, num_patches, (min(num_starts, num_patches),), replace=False)


class Prepared(NamedTuple):
    """The loop's inputs, independent of the keep mask (so banks with different masks share them)."""

    x_RxN: jax.Array  # centred features, feature-major
    x_sq_N: jax.Array  # their squared norms
    start_N: jax.Array  # each patch's mean distance to the start patches


def prepare_rows(
    feats_NxR: jax.Array, centre_1xR: jax.Array, starts_SxR: jax.Array, block: int = 1 << 16
) -> Prepared:
    """Row-local preparation (each output row depends only on its input row), so that running it
    per shard gives the same rows as running it whole. Centring on the pool mean (`ops.mean_row`)
    changes no distance but keeps the float32 |a|^2 + |b|^2 - 2ab form accurate.

    The features are stored feature-major [R, N]: each step's distances are then one vector-matrix
    product c @ x_RxN, which XLA's CPU backend runs multi-threaded near memory bandwidth, where the
    row-major matrix-vector product measured ~5x slower and a direct sum((x - c)^2) slower still.
    The transposed copy is written `block` rows at a time into its buffer, because XLA made the
    one-shot centre+transpose in two full-size temporaries (4x the pool at peak instead of 2x).
    """
    n, r = feats_NxR.shape
    c = min(block, n)
    s = starts_SxR.astype(jnp.float32) - centre_1xR

    def body(i, bufs):
        x_RxN, x_sq, start = bufs
        # The last block is shifted back to end at row n: it rewrites rows with identical values.
        lo = jnp.minimum(i * c, n - c)
        x = jax.lax.dynamic_slice_in_dim(feats_NxR, lo, c, axis=0).astype(jnp.float32) - centre_1xR
        sq = ops.sq_norms(x)
        # Direct differences in a fixed order: the start distances come out bitwise the same
        # whatever the block or shard size (a matmul's or reduce's order depends on the shape).
        dist_CxS = jnp.sqrt(ops.sq_norms(x[:, None, :] - s[None, :, :]))
        st = ops.fixed_order_sum(dist_CxS) / s.shape[0]
        return (
            jax.lax.dynamic_update_slice_in_dim(x_RxN, x.T, lo, axis=1),
            jax.lax.dynamic_update_slice_in_dim(x_sq, sq, lo, axis=0),
            jax.lax.dynamic_update_slice_in_dim(start, st, lo, axis=0),
        )

    init = (
        jnp.zeros((r, n), jnp.float32),
        jnp.zeros((n,), jnp.float32),
        jnp.zeros((n,), jnp.float32),
    )
    return Prepared(*jax.lax.fori_loop(0, -(-n // c), body, init))


_prepare_rows = jax.jit(prepare_rows, static_argnames=("block",))


def prepare(feats_NxR: jax.Array, starts_S: jax.Array) -> Prepared:
    """`prepare_rows` for the whole pool with start patches given by index (one device). The mean is
    computed by its own call, as in the sharded version, so both centre on the same bits."""
    return _prepare_rows(feats_NxR, ops.mean_row(feats_NxR), feats_NxR[starts_S])


def step_distances(x_RxN: jax.Array, x_sq_N: jax.Array, c_R: jax.Array, c_sq: jax.Array):
    """Distance [N] of every (centred, feature-major) patch to the picked patch c: the step's only
    pass over x_RxN."""
    d2 = x_sq_N + c_sq - 2.0 * ops.matmul(c_R, x_RxN)
    return jnp.sqrt(jnp.maximum(d2, 0.0))


def initial_distances(start_N: jax.Array, keep_N: jax.Array, strict: bool) -> jax.Array:
    """The loop's starting min-distances: removed patches at -1 (never picked), or, with `strict`,
    unmasked as in the reference."""
    return start_N if strict else jnp.where(keep_N, start_N, -1.0)


def masked_step(d_N: jax.Array, keep_N: jax.Array, strict: bool) -> jax.Array:
    """A step's new distances with the removal mask applied: -1 for removed patches, or 0 (the
    reference's distance x sampling weight) with `strict`."""
    return jnp.where(keep_N, d_N, 0.0 if strict else -1.0)


@functools.partial(jax.jit, static_argnames=("num_samples", "strict"))
def select(
    prepared: Prepared, keep_N: jax.Array, num_samples: int, strict: bool = False
) -> jax.Array:
    """The greedy loop on prepared inputs: indices [num_samples] in the order picked.

    strict: reproduce the reference's unmasked first pick (see the module docstring)."""
    x_RxN, x_sq, start = prepared
    min_d = initial_distances(start, keep_N, strict)

    def step(i, carry):
        min_d, picked = carry
        j = jnp.argmax(min_d)
        c = jax.lax.dynamic_index_in_dim(x_RxN, j, axis=1, keepdims=False)
        d = masked_step(step_distances(x_RxN, x_sq, c, x_sq[j]), keep_N, strict)
        min_d = jnp.minimum(min_d, d)
        min_d = min_d.at[j].set(-1.0)  # never picked twice, even among exact duplicates
        return min_d, picked.at[i].set(j.astype(jnp.int32))

    _, picked = jax.lax.fori_loop(
        0, num_samples, step, (min_d, jnp.zeros((num_samples,), jnp.int32))
    )
    return picked


def greedy(
    feats_NxR: jax.Array,
    keep_N: jax.Array,
    starts_S: jax.Array,
    num_samples: int,
    strict: bool = False,
) -> jax.Array:
    """Indices [num_samples] of the coreset, in the order picked.

    Args:
      feats_NxR: the pool (projected) features; N here is every training patch.
      keep_N: bool, False for removed patches. At least `num_samples` must be True.
      starts_S: indices of the start patches.
      num_samples: coreset size M (static).
      strict: the reference's unmasked first pick (parity checks only).
    """
    return select(prepare(feats_NxR, starts_S), keep_N, num_samples=num_samples, strict=strict)


def num_samples(ratio: float, num_patches: int, num_kept: int) -> int:
    """Coreset size: int(ratio * all patches) (removed ones counted, as the reference), at most the
    number kept, at least 1."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    return max(1, min(int(ratio * num_patches), num_kept))
