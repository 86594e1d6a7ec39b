"""Nearest-neighbour discriminator (METHOD.md section 3): W_nn[p, i] = min over j != i of
||X[p, i] - X[p, j]||. Soft weight = distance + 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from softpatch_jax import ops
from softpatch_jax.discriminators.registry import Discriminator, Position, float32_parts, register

# Candidates re-ranked in float64 for the nearest distance: the true nearest is among the float32
# expanded form's few nearest unless that many neighbours lie within its ~1e-3 relative error.
NEAREST_CANDIDATES = 4


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
        return float32_parts(jnp.sqrt(jnp.min(d2, axis=1)))


def _position(pos: Position, dtype: str):
    d2 = pos.get("sqdist")
    if dtype == "float64":
        _, cand = ops.smallest_k(d2, min(NEAREST_CANDIDATES, pos.n - 1))
        return _nearest_float64(pos.x, cand)
    return jnp.sqrt(jnp.min(d2, axis=1))


def _precision(setting: str, n: int, r: int, platform: str) -> str:
    """auto: float64 candidates (`_nearest_float64`), except on TPUs (no native float64)."""
    if setting == "auto":
        return "float32" if platform == "tpu" else "float64"
    return setting


register(
    Discriminator(
        name="nearest",
        position=_position,
        soft_weight=lambda raw: raw + 1.0,
        precision=_precision,
        order=10,
        summary="distance to the nearest other image's patch at the same position (METHOD.md 3)",
    )
)
