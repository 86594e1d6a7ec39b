"""Approximate greedy k-center coreset (PatchCore, METHOD.md section 4) with a removal mask.

Start: every patch's mean distance to `num_starts` random patches (128 by default, as the authors'
code: its `WeightedGreedyCoresetSampler` passes its projection size into the start count). Then,
`num_samples` times: pick the kept patch farthest from the selection (argmax of the running
min-distance) and lower the running min-distance with the distances to the picked patch. Removed
patches are never picked: they sit at -1 from the start, which also holds when every distance is 0.

`strict=True` reproduces the reference loop exactly instead (a defect kept only for parity checks):
it multiplies the distances it ADDS after each pick by the keep mask (0 for removed patches) but
leaves the starting distances unmasked, so its first pick can be a removed (noisy) patch.
The whole loop is one compiled `fori_loop` on the device, and it runs every keep mask of a fit at
once (`select_many`: SoftPatch+'s two banks, a sweep's taus, the threshold's held-out folds): each
step picks one patch per mask and reads the features once for up to 16 masks on CPU (a [B, R] x
[R, N] block product, `block_rows`); everything else in a step touches only [K, N] vectors. The
inputs it needs (`prepare`) do not depend on the removal mask, so all masks share them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
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

    The features are stored feature-major [R, N]: each step's distances are then products
    c_BxR @ x_RxN (`step_distances`), which XLA's CPU backend runs multi-threaded, where the
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


# Most masks in one CPU block product: a [B, 128] x [128, N] block costs less per row as B grows
# (measured at N = 156,800: see `block_rows`); 16 bounds the [B, N] temporaries.
CPU_BLOCK_CAP = 16
# Width of the slices of R that each product reduces over (`block_product`).
SLICE = 128


def block_rows(k: int) -> int:
    """Masks per matrix product in a step of `select_many` for K masks.

    A [B, R] x [R, N] product does not give the bits of B vector-matrix products (at R = 128 on
    XLA's CPU backend), and at R = 512 or 1024 a row's bits change with B itself. Over slices of
    R <= 128 (`block_product`) they do not, for any B >= 2, nor with the row's position or its
    companions (checked by tests/test_coreset.py at R = 128 and 1024). So on CPU a step multiplies
    all K masks in one block of max(K, 2) rows (a lone mask is padded to 2, never a vector product),
    in near-equal blocks beyond `CPU_BLOCK_CAP`, and a mask's picks are the same whichever masks it
    runs with. On accelerators (unmeasured here) every loop keeps blocks of exactly 8 rows.
    """
    if jax.default_backend() != "cpu":
        return 8
    blocks = -(-k // CPU_BLOCK_CAP)
    return max(2, -(-k // blocks))


def block_product(c_BxR: jax.Array, x_RxN: jax.Array) -> jax.Array:
    """c_BxR @ x_RxN as products over slices of `SLICE` features, added in slice order: a row's
    bits then do not depend on B (see `block_rows`)."""
    r = x_RxN.shape[0]
    out = ops.matmul(c_BxR[:, :SLICE], x_RxN[:SLICE])
    for lo in range(SLICE, r, SLICE):
        out = out + ops.matmul(c_BxR[:, lo : lo + SLICE], x_RxN[lo : lo + SLICE])
    return out


def step_products(x_RxN: jax.Array, c_KxR: jax.Array) -> jax.Array:
    """c_KxR @ x_RxN [K, N] in blocks of `block_rows(K)` rows, the last padded with zero rows: one
    pass over x_RxN per block (one block for up to `CPU_BLOCK_CAP` masks on CPU)."""
    k = c_KxR.shape[0]
    b = block_rows(k)
    c = jnp.pad(c_KxR, ((0, (-k) % b), (0, 0)))
    return jnp.concatenate([block_product(c[i : i + b], x_RxN) for i in range(0, c.shape[0], b)])[
        :k
    ]


def step_distances(x_RxN: jax.Array, x_sq_N: jax.Array, c_KxR: jax.Array, c_sq_K: jax.Array):
    """Distances [K, N] of every (centred, feature-major) patch to each mask's picked patch, from
    `step_products` (the step's only pass over x_RxN)."""
    d2 = x_sq_N[None, :] + c_sq_K[:, None] - 2.0 * step_products(x_RxN, c_KxR)
    return jnp.sqrt(jnp.maximum(d2, 0.0))


def initial_distances(start_N: jax.Array, keep_N: jax.Array, strict: bool) -> jax.Array:
    """The loop's starting min-distances (any leading mask axes): removed patches at -1 (never
    picked), or, with `strict`, unmasked as in the reference."""
    return jnp.broadcast_to(start_N, keep_N.shape) if strict else jnp.where(keep_N, start_N, -1.0)


def masked_step(d_N: jax.Array, keep_N: jax.Array, strict: bool) -> jax.Array:
    """A step's new distances with the removal mask applied: -1 for removed patches, or 0 (the
    reference's distance x sampling weight) with `strict`."""
    return jnp.where(keep_N, d_N, 0.0 if strict else -1.0)


class Carry(NamedTuple):
    """The loop's state between segments: running min-distances and the picks so far."""

    min_d_KxN: jax.Array
    picked_KxM: jax.Array


@functools.partial(jax.jit, static_argnames=("num_samples", "strict"))
def _init(prepared: Prepared, keep_KxN: jax.Array, num_samples: int, strict: bool) -> Carry:
    min_d = initial_distances(prepared.start_N, keep_KxN, strict)
    return Carry(min_d, jnp.zeros((keep_KxN.shape[0], num_samples), jnp.int32))


@functools.partial(jax.jit, static_argnames=("strict",), donate_argnums=2)
def _steps(prepared: Prepared, keep_KxN: jax.Array, carry: Carry, lo, hi, strict: bool) -> Carry:
    """Picks lo..hi-1 of every mask (lo, hi traced: segments of any length share one compile)."""
    x_RxN, x_sq, _ = prepared
    rows = jnp.arange(keep_KxN.shape[0])

    def step(i, carry):
        min_d, picked = carry
        j_K = ops.first_argmax(min_d)
        c_KxR = jnp.take(x_RxN, j_K, axis=1).T
        d = masked_step(step_distances(x_RxN, x_sq, c_KxR, x_sq[j_K]), keep_KxN, strict)
        min_d = jnp.minimum(min_d, d)
        min_d = min_d.at[rows, j_K].set(-1.0)  # never picked twice, even among exact duplicates
        return Carry(min_d, picked.at[:, i].set(j_K.astype(jnp.int32)))

    return jax.lax.fori_loop(lo, hi, step, carry)


def segments(num_samples: int, progress: Callable[[int], None] | None, count: int = 50):
    """[lo, hi) pick ranges: one range without progress, else ~`count` of them."""
    if progress is None:
        return [(0, num_samples)]
    size = max(1, -(-num_samples // count))
    return [(lo, min(lo + size, num_samples)) for lo in range(0, num_samples, size)]


def select_many(
    prepared: Prepared,
    keep_KxN: jax.Array,
    num_samples: int,
    strict: bool = False,
    progress: Callable[[int], None] | None = None,
) -> jax.Array:
    """The greedy loop for K keep masks at once: indices [K, num_samples], each row in the order
    picked and identical to `select` on that row's mask alone (ties included).

    Each step reads the pool once per `block_rows()` masks (one [B, R] x [R, N] product) and keeps
    a running min-distance per mask. A mask's first m picks do not depend on how many follow, so
    masks with smaller coresets run to the largest size and keep a prefix (`num_samples` is the
    largest; see `select_sizes`).

    strict: reproduce the reference's unmasked first pick (see the module docstring).
    progress: called on the host with the number of picks done after each of ~50 segments of the
      loop (each segment one device call; nothing runs on the host inside the loop).
    """
    keep = jnp.asarray(keep_KxN, bool)
    carry = _init(prepared, keep, int(num_samples), bool(strict))
    for lo, hi in segments(int(num_samples), progress):
        carry = _steps(prepared, keep, carry, jnp.int32(lo), jnp.int32(hi), bool(strict))
        if progress is not None:
            jax.block_until_ready(carry.picked_KxM)
            progress(hi - lo)
    return carry.picked_KxM


def select(
    prepared: Prepared,
    keep_N: jax.Array,
    num_samples: int,
    strict: bool = False,
    progress: Callable[[int], None] | None = None,
) -> jax.Array:
    """The greedy loop on prepared inputs for one mask: indices [num_samples] in the order picked
    (`select_many` with one mask).

    strict: reproduce the reference's unmasked first pick (see the module docstring)."""
    return select_many(prepared, keep_N[None], num_samples, strict, progress)[0]


def select_sizes(
    prepared: Prepared,
    keep_KxN: jax.Array,
    sizes_K: Sequence[int],
    strict: bool = False,
    progress: Callable[[int], None] | None = None,
    select_fn: Callable | None = None,
) -> list[jax.Array]:
    """`select_many` with a coreset size per mask: a list of K index arrays, row k cut to sizes_K[k].

    select_fn: the loop to run (default `select_many`; `parallel.select_many` for the sharded one).
    """
    fn = select_fn or select_many
    picked = fn(prepared, keep_KxN, max(sizes_K), strict=strict, progress=progress)
    return [picked[i, :m] for i, m in enumerate(sizes_K)]


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
