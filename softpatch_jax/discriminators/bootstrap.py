"""Bootstrap discriminator: the first stage of MeDS ("Memory-Distilled Selection for Noise-Robust
Anomaly Detection", ICML 2026, step 1 "memory score construction"), at SoftPatch's per-position
granularity. LLBNAD's cross-subset scoring is the same idea at the image level.

The noise score of training patch i at a position is its mean nearest-neighbour distance to B small
sub-banks, each drawn at random from the OTHER training images' patches at that position:

    W_boot[p, i] = 1/B * sum_b min over j in S_b(i) of ||X[p, i] - X[p, j]||,
    S_b(i) a uniform draw of m = max(1, round(fraction * (N - 1))) images among the N - 1 others.

A sparse sub-bank holds the patterns most images share and rarely the rare (defective) ones, so a
defective patch is far from most sub-banks while a normal one finds a neighbour in each (the
paper's "low-pass filter"; it subsamples 10% of the features, hence the default fraction 0.1).
Only this first stage is implemented: MeDS's later stages (a distilled score network, fine-tuning
on the selected data) are not part of this codebase.

On the accelerator: the distances come from the shared per-position Gram matrix (one matmul) and
each sub-bank's minimum is a masked min over [B, N, N]; the draws ([B, N, N], from the run's key)
are the same for every position and drawn once per chunk. float32 (expanded form) only. Soft
weight = score + 1, as the nearest distance's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from softpatch_jax import ops
from softpatch_jax.discriminators.registry import Discriminator, Position, register


def bank_size(fraction: float, num_images: int) -> int:
    """Images per sub-bank: round(fraction * (N - 1)), at least 1."""
    return max(1, min(num_images - 1, round(fraction * (num_images - 1))))


def draws(key: jax.Array, num_images: int, num_banks: int, size: int) -> jax.Array:
    """bool [B, N, N]: draws[b, i, j] = image j is in patch i's sub-bank b; each row holds `size`
    images drawn uniformly without replacement from the N - 1 images other than i."""
    u = jax.random.uniform(key, (num_banks, num_images, num_images))
    u = jnp.where(jnp.eye(num_images, dtype=bool), 2.0, u)  # never draw the patch's own image
    ranks = jnp.argsort(jnp.argsort(u, axis=-1), axis=-1)
    return ranks < size


def _position(
    pos: Position, dtype: str, bootstrap_banks: int, bootstrap_fraction: float, key: jax.Array
):
    n = pos.n
    picked_BxNxN = draws(key, n, bootstrap_banks, bank_size(bootstrap_fraction, n))
    d2_NxN = pos.get("sqdist")
    nearest_BxN = jnp.min(jnp.where(picked_BxNxN, d2_NxN[None], jnp.inf), axis=2)
    return ops.fixed_order_mean(jnp.sqrt(jnp.maximum(nearest_BxN, 0.0)), axis=0)


register(
    Discriminator(
        name="bootstrap",
        position=_position,
        soft_weight=lambda raw: raw + 1.0,
        params={"bootstrap_banks": 10, "bootstrap_fraction": 0.1},
        needs_key=True,
        order=40,
        checks={
            "bootstrap_banks": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
            "bootstrap_fraction": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
        },
        summary="mean nearest distance to B random sub-banks of the other images (MeDS step 1)",
    )
)
