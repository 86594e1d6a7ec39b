"""InReaCh's channel selection (McIntosh & Albu, "Inter-Realization Channels: Unsupervised Anomaly
Detection Beyond One-Class Classification", ICCV 2023), written from the paper for this codebase's
pool of projected training patches.

A channel links one patch of a seed image to the patch of every other training image that is its
MUTUAL nearest neighbour (each is the other's nearest, searched within a spatial window around the
same position, which stands in for the paper's positional encoding). A channel that spans many
images (long) with members close to their mean (tight) is a pattern most images share: nominal.
Patches of defects rarely form such channels. The memory bank keeps the patches of the long, tight
channels; then plain nearest-neighbour scoring (no soft weights), as every bank here.

Per seed s and other image j, for every position p of s: q*(j, p) = the nearest patch of j among
the window W(p); mutual if p is the nearest patch of s among W(q*). Channel (s, p) = {(s, p)} and
the mutual (j, q*); length = |channel| / N; spread = mean member distance to the channel mean.
Kept channels: length >= `min_length` and spread <= the `spread_quantile` quantile of the long
channels' spreads (no long channel at all: every patch is kept). Every seed is used: one compiled
map over seeds, O(N^2 P K R) for K window cells.
Deviations from the paper's code path: the window instead of positional embeddings, and the kept
patches go through the same coreset as every method (memory parity); both say so in README.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from softpatch_jax import ops


@dataclasses.dataclass(frozen=True)
class Options:
    """The `config.inreach` fields of the same names (defaults in configs/base.py)."""

    window: int  # search radius in grid cells: W(p) is the (2w+1)^2 block around p
    min_length: float  # a kept channel spans at least this fraction of the training images
    spread_quantile: float  # and its spread is at most this quantile of the long channels'


def window_neighbours(h: int, w: int, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of the h*w positions, the flat indices of its window cells [P, K] and whether each
    lies inside the grid [P, K] (cells outside point at the position itself, marked invalid)."""
    ys, xs = np.divmod(np.arange(h * w), w)
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    nb = np.zeros((h * w, len(offsets)), np.int32)
    valid = np.zeros((h * w, len(offsets)), bool)
    for k, (dy, dx) in enumerate(offsets):
        y, x = ys + dy, xs + dx
        inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        nb[:, k] = np.where(inside, y * w + x, np.arange(h * w))
        valid[:, k] = inside
    return nb, valid


def _sqdist_to_window(a_PxR: jax.Array, b_PxR: jax.Array, nb_PxK, valid_PxK) -> jax.Array:
    """[P, K]: squared distance of a[p] to b[nb[p, k]] (+inf outside the grid)."""
    diff = a_PxR[:, None, :] - b_PxR[nb_PxK]
    return jnp.where(valid_PxK, ops.fixed_order_sum(jnp.square(diff)), jnp.inf)


def _seed_channels(s, pool_NxPxR, nb_PxK, valid_PxK):
    """Seed image s: q* [N, P], mutual [N, P] (False at j = s), channel length and spread [P]."""
    n, p, _ = pool_NxPxR.shape
    seed = pool_NxPxR[s]
    nb, valid = jnp.asarray(nb_PxK), jnp.asarray(valid_PxK)
    fwd = jax.vmap(lambda other: _sqdist_to_window(seed, other, nb, valid))(pool_NxPxR)
    q_star = nb[jnp.arange(p)[None, :], jnp.argmin(fwd, axis=2)]  # [N, P]
    back = jax.vmap(lambda other: _sqdist_to_window(other, seed, nb, valid))(pool_NxPxR)
    back_p = nb[jnp.arange(p)[None, :], jnp.argmin(back, axis=2)]  # [N, P]: s's nearest to j's q
    mutual = jnp.take_along_axis(back_p, q_star, axis=1) == jnp.arange(p)[None, :]
    mutual = mutual & (jnp.arange(n) != s)[:, None]
    members = pool_NxPxR[jnp.arange(n)[:, None], q_star]  # [N, P, R]
    weight = mutual.astype(jnp.float32).at[s].set(1.0)  # the seed patch is its own member
    members = members.at[s].set(seed)
    count = ops.fixed_order_sum(weight.T)  # [P]
    mean = ops.fixed_order_sum(jnp.moveaxis(members * weight[..., None], 0, -1)) / count[:, None]
    dist = jnp.sqrt(jnp.maximum(ops.fixed_order_sum(jnp.square(members - mean[None])), 0.0))
    spread = ops.fixed_order_sum((dist * weight).T) / count
    return q_star, mutual, count / n, spread


@functools.partial(jax.jit, static_argnames=("grid", "options"))
def keep_mask(pool_NxPxR: jax.Array, grid: tuple[int, int], options: Options) -> jax.Array:
    """bool [N, P]: the patches of the long, tight channels (see the module docstring)."""
    n, p, _ = pool_NxPxR.shape
    if grid[0] * grid[1] != p:
        raise ValueError(f"grid {grid} does not hold the pool's {p} positions")
    nb, valid = window_neighbours(*grid, options.window)
    x = pool_NxPxR.astype(jnp.float32)
    x = x - ops.mean_row(x.reshape(n * p, -1))[None]  # centring changes no distance
    q_star, mutual, length, spread = jax.lax.map(
        lambda s: _seed_channels(s, x, nb, valid), jnp.arange(n)
    )  # [S, N, P], [S, N, P], [S, P], [S, P]
    long = length >= options.min_length
    spreads = jnp.where(long, spread, jnp.nan)
    limit = jnp.nanquantile(spreads, options.spread_quantile)
    kept = long & (spread <= limit)  # [S, P]
    is_seed = (jnp.arange(n)[:, None] == jnp.arange(n)[None, :])[..., None]  # [S, N, 1]
    take = (mutual | is_seed) & kept[:, None, :]  # [S, N, P]: members of kept channels
    rows = jnp.broadcast_to(jnp.arange(n)[None, :, None], take.shape)
    cols = jnp.where(is_seed, jnp.arange(p)[None, None, :], q_star)  # the seed's own patch is p
    keep = jnp.zeros((n, p), bool).at[rows.reshape(-1), cols.reshape(-1)].max(take.reshape(-1))
    # No long channel at all (e.g. N = 2 with min_length > 1/2): keep every patch, as PatchCore.
    return jnp.where(jnp.any(keep), keep, True)
