"""Local outlier factor discriminator (METHOD.md section 3), k nearest neighbours among the other
images' patches at the same position; equals scikit-learn's LocalOutlierFactor on data without
ties. Soft weight = LOF clamped at 0. Always float32: its scores are ratios of k-distances, already
at parity with the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from softpatch_jax import ops
from softpatch_jax.discriminators.registry import Discriminator, Position, register


def _lof(knn_d: jax.Array, knn_i: jax.Array) -> jax.Array:
    """Local outlier factor from each point's k nearest distances and indices (self excluded)."""
    k_distance = knn_d[:, -1]
    reach = jnp.maximum(k_distance[knn_i], knn_d)
    # 1e-10 as scikit-learn, so that duplicates give a large finite density, not inf.
    lrd = 1.0 / (ops.fixed_order_mean(reach, axis=1) + 1e-10)
    return ops.fixed_order_mean(lrd[knn_i], axis=1) / lrd


def effective_k(lof_k: int, num_images: int) -> int:
    """scikit-learn's rule: n_neighbors larger than N-1 is reduced to N-1."""
    return max(1, min(lof_k, num_images - 1))


def _position(pos: Position, dtype: str, lof_k: int):
    knn_d2, knn_i = pos.get("knn", lof_k)
    return _lof(jnp.sqrt(knn_d2), knn_i)


register(
    Discriminator(
        name="lof",
        position=_position,
        soft_weight=lambda raw: jnp.maximum(raw, 0.0),
        params={"lof_k": 6},
        resolve=lambda params, n: {"lof_k": effective_k(params["lof_k"], n)},
        order=30,
        checks={"lof_k": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")},
        summary="local outlier factor over the k nearest other images' patches (METHOD.md 3)",
    )
)
