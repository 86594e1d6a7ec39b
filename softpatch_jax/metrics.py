"""Evaluation metrics: image AUROC and pixel AUROC (the papers' two numbers), computed on the device
with exact tie handling (a tie between a positive and a negative counts one half, as scikit-learn).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _auroc(scores: jax.Array, labels: jax.Array) -> jax.Array:
    scores = scores.astype(jnp.float32).reshape(-1)
    labels = labels.reshape(-1).astype(bool)
    n_pos = jnp.sum(labels)
    n_neg = labels.shape[0] - n_pos
    # Sort positives; for each negative count positives above it (+ half the ties).
    pos_sorted = jnp.sort(jnp.where(labels, scores, jnp.inf))
    lo = jnp.searchsorted(pos_sorted, scores, side="left")
    hi = jnp.searchsorted(pos_sorted, scores, side="right")
    above = n_pos - jnp.minimum(hi, n_pos)
    ties = jnp.minimum(hi, n_pos) - jnp.minimum(lo, n_pos)
    # Normalise per negative before summing so the float32 sum stays accurate for millions of pixels.
    per_neg = (above + 0.5 * ties) / jnp.maximum(n_pos, 1)
    return jnp.sum(jnp.where(labels, 0.0, per_neg)) / jnp.maximum(n_neg, 1)


def auroc(scores, labels) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    labels_np = np.asarray(labels).astype(bool)
    if labels_np.all() or not labels_np.any():
        return float("nan")
    return float(_auroc(jnp.asarray(scores), jnp.asarray(labels_np)))


def evaluate(image_scores, labels, maps, masks) -> dict[str, float]:
    """Library API: {"image_auroc", "pixel_auroc"} from scores [T], labels [T], maps/masks [T, H, W]."""
    return {"image_auroc": auroc(image_scores, labels), "pixel_auroc": auroc(maps, masks)}
