"""The decision threshold on image scores, and the held-out training scores it is chosen from.

Training scores are *held out* (K-fold, K = 5 by default): the training images are split into K
folds at random (seeded); each fold is scored (METHOD.md section 5) against a classification bank
rebuilt by the coreset from the other folds' kept patches, with the full fit's removal mask and soft
weights. Scoring an image against the bank it helped build (leave-in) puts its patches at distance
~0 wherever the coreset kept them, so a threshold chosen on such scores flags many normal images;
masking only the image's own memory patches overshoots instead, because the coreset left the
neighbourhood of a picked patch uncovered. The K folds' coresets run together in one pass of the
greedy loop (`coreset.select_many`), each step reading the pool once per block of folds.

Rules (a string, stored with the model, overridable at predict time):
  "mad:K"       median + K * 1.4826 * MAD of the training scores (default K = 3). The median and
                the MAD ignore the top tail, so the defective images hidden in the training set
                (the premise of SoftPatch) do not drag the threshold up; 1.4826 * MAD estimates the
                standard deviation of the normal scores.
  "quantile:Q"  the Q-quantile of the training scores (Q = 0.95 flags the top 5% of the
                training set); sensible when the contamination rate is known.
  a number      used as given.
Whatever the rule, a threshold that is not a finite float32 number (the scores' type) is refused,
naming the rule: no score could ever exceed it, so every defect would pass silently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from softpatch_jax import memory_bank, scoring

DEFAULT_RULE = "mad:3"
DEFAULT_FOLDS = 5
MAD_TO_SIGMA = 1.4826


def parse(rule: str) -> tuple[str, float]:
    """'mad:3' -> ('mad', 3.0); '0.7' -> ('value', 0.7). ValueError names the bad rule."""
    text = str(rule).strip()
    kind, _, arg = text.partition(":")
    if not arg:
        kind, arg = "value", text
    try:
        value = float(arg)
    except ValueError:
        value = None
    if value is None or kind not in ("mad", "quantile", "value"):
        raise ValueError(
            f"threshold {rule!r} not understood: use a number, 'mad:K' or 'quantile:Q' (0<Q<1)"
        )
    if not np.isfinite(value):
        raise ValueError(f"threshold {rule!r}: the number must be finite (not NaN or inf)")
    if kind == "quantile" and not 0.0 < value < 1.0:
        raise ValueError(f"threshold {rule!r}: the quantile must be in (0, 1)")
    if kind == "mad" and value < 0:
        raise ValueError(f"threshold {rule!r}: K must be >= 0")
    return kind, value


def value(rule: str, train_scores_N: np.ndarray) -> float:
    """The threshold the rule gives on these training scores."""
    kind, arg = parse(rule)
    s = np.asarray(train_scores_N, np.float64)
    if kind == "value":
        return _usable(rule, float(arg))
    if not np.isfinite(s).all():
        raise FloatingPointError(
            f"threshold {rule!r}: {int((~np.isfinite(s)).sum())} training score(s) are NaN/inf "
            "(a damaged model?)"
        )
    if kind == "quantile":
        out = float(np.quantile(s, arg))
    else:
        med = float(np.median(s))
        out = med + arg * MAD_TO_SIGMA * float(np.median(np.abs(s - med)))
    return _usable(rule, out)


def _usable(rule: str, thr: float) -> float:
    """thr, unless no float32 score (the scores' type) can exceed it or fall below it: NaN, inf,
    or beyond float32's range would pass (or flag) every image silently."""
    if not (np.isfinite(thr) and abs(thr) <= float(np.finfo(np.float32).max)):
        raise ValueError(
            f"threshold {rule!r} gives {thr} on these training scores, not a finite float32 number "
            "(the scores' type): every image would pass or be flagged; use a smaller K or another "
            "rule"
        )
    return thr


def spread_warning(train_scores_N: np.ndarray) -> str | None:
    """Says why a threshold from these training scores has no margin, or None when they spread:
    all equal (identical training images, say), or more than half equal (MAD = 0, so "mad:K" is
    the median whatever K)."""
    s = np.asarray(train_scores_N, np.float64)
    if s.size == 0 or not np.isfinite(s).all():
        return None
    med = float(np.median(s))
    if float(np.ptp(s)) == 0.0:
        return (
            f"all {s.size} held-out training scores equal {med:.6g} (identical training images?): "
            "the threshold has no margin, so any change from them (a re-encoded JPEG) is flagged; "
            "fit on images that show the normal variation"
        )
    if float(np.median(np.abs(s - med))) == 0.0:
        return (
            f"more than half of the {s.size} held-out training scores equal {med:.6g} (MAD = 0): "
            "'mad:K' gives that value whatever K; fit on images that show the normal variation "
            "or use a quantile or a number"
        )
    return None


def fold_of(num_images: int, folds: int, seed: int) -> np.ndarray:
    """int [N]: each image's fold, a seeded random permutation dealt round-robin."""
    folds = max(2, min(folds, num_images))
    return np.random.default_rng([seed, 7]).permutation(num_images) % folds


def heldout_patch_scores(
    prepared: memory_bank.Prepared,
    feats_NxPxD: jax.Array,
    keep_NxP: jax.Array,
    weights_NxP: jax.Array,
    ratio: float,
    fold_N: np.ndarray,
    chunk_size: int = 0,
    *,
    distance: str = "squared",
    strict: bool = False,
) -> np.ndarray:
    """float [N, P]: each training patch's score against a bank fitted without its image's fold.

    Args:
      prepared: the fit's prepared training set (`memory_bank.prepare`: its coreset pool and
        starts); every fold's coreset selects on it, in one pass of the greedy loop.
      feats_NxPxD: full training features; keep_NxP / weights_NxP: the fit's classification-bank
        removal mask and soft weights; ratio: coreset ratio.
      fold_N: fold of each image (`fold_of`).
    """
    n, p, _ = feats_NxPxD.shape
    keep = keep_NxP.reshape(-1)
    weights = weights_NxP.reshape(-1)
    out = np.zeros((n, p), np.float32)
    held_KxN = [fold_N == k for k in np.unique(fold_N)]
    keep_KxQ = jnp.stack([keep & ~jnp.asarray(np.repeat(h, p)) for h in held_KxN])
    # A fold's coreset size counts the other folds' patches only.
    sizes = [
        memory_bank.coreset_sizes(ratio, int(n - h.sum()) * p, keep_KxQ[k : k + 1])[0]
        for k, h in enumerate(held_KxN)
    ]
    picked = memory_bank.select_coresets(prepared, keep_KxQ, sizes, strict)
    for held_N, idx, m in zip(held_KxN, picked, sizes):
        bank = memory_bank.assemble(feats_NxPxD, idx, weights)
        held = feats_NxPxD[np.flatnonzero(held_N)]
        chunk = chunk_size or scoring.chunk_size_for(m)
        out[held_N] = np.asarray(scoring.patch_scores(bank, held, chunk, distance=distance))
    return out
