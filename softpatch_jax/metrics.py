"""Evaluation metrics (METHOD.md: image and pixel AUROC, plus PRO/AUPRO and AP as the field
reports them), computed on the device with exact tie handling:

- AUROC: a tie between a positive and a negative counts one half (as scikit-learn);
- AP: the step-wise sum over distinct thresholds, sum_t (R_t - R_t-1) P_t (scikit-learn's
  average_precision_score), i.e. the mean over positives of the precision at their own score;
- F1-max: the best 2PR / (P + R) over all thresholds;
- AUPRO (MVTec AD): the per-region overlap, averaged over the connected ground-truth regions
  (8-connected, labelled on the host), against the false-positive rate over all normal pixels,
  integrated up to FPR 0.3 and divided by 0.3. A threshold that ties several pixels is one point.
- AUPR (ADEval 1.1.0's `aupr`, the official Real-IAD evaluator's s_aupr / i_aupr / p_aupr): not
  the step AP but a binned one. The score range [min, max] is cut at `ADEVAL_STRIPS` + 1 evenly
  spaced thresholds t_0 = min .. t_1000 = max (float32, as ADEval builds them); at each threshold a
  score >= t is flagged; precision TP / (TP + FP) (1 where nothing is flagged) is integrated over
  recall TP / P by the trapezoid rule, recall ascending. NaN for one class or constant scores
  (where ADEval stops on an assertion).
- sample AUROC / AP / AUPR (Real-IAD, ADEval): the views of one physical sample grouped by the key
  `SAMPLE_KEY` finds in their file names; a sample's score is its views' max score and its label
  their max label. Only where every file name carries that key; otherwise left out.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

from softpatch_jax.io_utils import split_list
from softpatch_jax.results import ALL_METRICS as ALL
from softpatch_jax.results import METRIC_NAMES as NAMES
from softpatch_jax.results import SAMPLE_METRICS

# Every metric `evaluate` can compute (`NAMES`, with its name in logs and tables) is a field of the
# results rows, so the list lives with them, in `results` (no jax there).
SAMPLE = SAMPLE_METRICS
AUPRO_FPR_LIMIT = 0.3
# ADEval's default number of strips of its binned curves (`--nstrips`).
ADEVAL_STRIPS = 1000
# The strips' fractions of the score range, computed in float64 and rounded to float32 as numpy's
# linspace(..., dtype=float32) does in ADEval.
_STRIP_FRACTIONS = np.linspace(0.0, 1.0, ADEVAL_STRIPS + 1).astype(np.float32)
# ADEval's --sample_key_pat for Real-IAD: CATEGORY_NNNN_CLASS, then the view _C<digit>_.
SAMPLE_KEY = re.compile(r"([a-zA-Z][a-zA-Z0-9_]*_[0-9]{4}_[A-Z][A-Z_]*[A-Z])_C[0-9]_")


def check_names(names: str | Sequence[str]) -> tuple[str, ...]:
    """A comma list or sequence of metric names ("all" for every one) -> tuple, in `ALL` order."""
    if isinstance(names, str):
        names = split_list(names)
    if "all" in names:
        return ALL
    bad = [n for n in names if n not in ALL]
    if bad or not names:
        raise ValueError(f"eval.metrics: unknown metric(s) {bad or list(names)}; valid: all, {ALL}")
    return tuple(n for n in ALL if n in names)


def _tie_groups(asc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For ascending scores: each element's tie group as [start, end) indices, in O(n) (running
    max of the group boundaries) instead of a binary search per element."""
    n = asc.shape[0]
    idx = jnp.arange(n)
    differs = asc[1:] != asc[:-1]
    start = jax.lax.cummax(jnp.where(jnp.concatenate([jnp.ones(1, bool), differs]), idx, 0))
    # The end is the next group's start: a running max from the top, on the reversed array.
    closes = jnp.concatenate([differs, jnp.ones(1, bool)])[::-1]
    end = n - jax.lax.cummax(jnp.where(closes, idx, 0))[::-1]
    return start, end


def _from(x: jax.Array) -> jax.Array:
    """[sum(x[j:]) for j in 0..n]: suffix sums, with a trailing 0 for "nothing from here"."""
    return jnp.concatenate([jnp.cumsum(x[::-1])[::-1], jnp.zeros(1, x.dtype)])


@jax.jit
def _curves(
    scores: jax.Array, labels: jax.Array, overlap_weight: jax.Array, thresholds: jax.Array
) -> dict:
    """AUROC, AP, F1-max, AUPRO and ADEval's binned AUPR (at `thresholds`, `adeval_thresholds`)
    from one sort of the scores.

    At the threshold t = an element's score, every element from the start of its tie group upwards
    is flagged. overlap_weight: 1 / (regions * region size) for each defect pixel, 0 elsewhere (its
    suffix sums are the mean per-region overlap); AUPRO is meaningless for all-zero weights.
    """
    asc, pos, overlap_weight = jax.lax.sort(
        (scores.astype(jnp.float32).reshape(-1), labels.reshape(-1), overlap_weight.reshape(-1)),
        num_keys=1,
    )
    n = asc.shape[0]
    start, end = _tie_groups(asc)
    pos_from = _from(pos.astype(jnp.int32))  # integer counts: exact
    neg_from = (n - jnp.arange(n + 1)) - pos_from
    n_pos, n_neg = pos_from[0], neg_from[0]
    # AUROC, per negative: the positives above its tie group, plus half those tied with it,
    # normalised per element before summing so the float32 sum stays accurate for many pixels.
    above = pos_from[end]
    per_neg = (above + 0.5 * (pos_from[start] - above)) / jnp.maximum(n_pos, 1)
    auroc = jnp.sum(jnp.where(pos, 0.0, per_neg)) / jnp.maximum(n_neg, 1)
    # AP: the mean over positives of the precision at their own score; F1 = 2 TP / (flagged + P).
    tp, flagged = pos_from[start], n - start
    ap = jnp.sum(jnp.where(pos, tp / flagged / jnp.maximum(n_pos, 1), 0.0))
    f1_max = jnp.max(2.0 * tp / (flagged + n_pos))
    # AUPRO: the curve from (0, 0) through the thresholds in decreasing order; tied pixels share
    # one point, so the repeated points add segments of zero width.
    fpr = neg_from[start] / jnp.maximum(n_neg, 1)
    pro = _from(overlap_weight)[start]
    x = jnp.concatenate([jnp.zeros(1), fpr[::-1]])
    y = jnp.concatenate([jnp.zeros(1), pro[::-1]])
    x0, x1, y0, y1 = x[:-1], x[1:], y[:-1], y[1:]
    xm = jnp.minimum(x1, AUPRO_FPR_LIMIT)
    frac = jnp.where(x1 > x0, (xm - x0) / jnp.where(x1 > x0, x1 - x0, 1.0), 0.0)
    ym = y0 + (y1 - y0) * frac  # the curve at the limit, by linear interpolation
    area = jnp.where(x0 < AUPRO_FPR_LIMIT, (xm - x0) * (y0 + ym) / 2.0, 0.0)
    aupro = jnp.sum(area) / AUPRO_FPR_LIMIT
    return {
        "auroc": auroc,
        "ap": ap,
        "f1_max": f1_max,
        "aupro": aupro,
        "aupr": _binned_aupr(asc, pos, thresholds),
    }


def adeval_thresholds(lo: float, hi: float) -> np.ndarray:
    """ADEval's strip thresholds [ADEVAL_STRIPS + 1] over [lo, hi]: fraction * (hi - lo) + lo in
    float32, each operation rounded as numpy rounds it (host side: XLA may fuse it into an FMA)."""
    return _STRIP_FRACTIONS * np.float32(float(hi) - float(lo)) + np.float32(lo)


def _binned_aupr(asc: jax.Array, pos: jax.Array, thr: jax.Array) -> jax.Array:
    """ADEval's binned AUPR (module docstring) of ascending float32 scores and their labels."""
    below = jnp.searchsorted(asc, thr, side="left")  # scores < t: not flagged
    pos_below = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(pos.astype(jnp.int32))])[below]
    n_pos = jnp.sum(pos.astype(jnp.int32))
    tp = n_pos - pos_below
    flagged = asc.shape[0] - below
    precision = jnp.where(flagged > 0, tp / jnp.maximum(flagged, 1), 1.0)
    recall = tp / jnp.maximum(n_pos, 1)
    # Thresholds ascend, so recall descends: the trapezoid rule over the reversed points.
    r, p = recall[::-1], precision[::-1]
    return jnp.sum((r[1:] - r[:-1]) * (p[1:] + p[:-1]) / 2.0)


def label_regions(masks_TxHxW) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
    """Host: the 8-connected defect regions of every mask, numbered 1.. over the whole set (0 =
    normal pixel) -> (region ids [T, H, W] int32, pixel count of each region [R]). A list of masks
    of their own sizes gives a list of id arrays."""
    ragged = _ragged(masks_TxHxW)
    masks = [np.asarray(m).astype(bool) for m in masks_TxHxW] if ragged else None
    if not ragged:
        masks = np.asarray(masks_TxHxW).astype(bool)
        if masks.ndim != 3:
            raise ValueError(f"masks must be [T, H, W], got shape {masks.shape}")
    ids = (
        [np.zeros(m.shape, np.int32) for m in masks] if ragged else np.zeros(masks.shape, np.int32)
    )
    offset = 0
    for t, mask in enumerate(masks):
        labelled, count = scipy.ndimage.label(mask, structure=np.ones((3, 3), int))
        ids[t] = np.where(labelled > 0, labelled + offset, 0)
        offset += count
    flat = np.concatenate([i.ravel() for i in ids]) if ragged else ids.ravel()
    sizes = np.bincount(flat, minlength=offset + 1)[1:]
    return ids, sizes


def _ragged(x) -> bool:
    """A list or tuple of arrays of their own shapes (maps and masks at each image's original
    resolution), rather than one array."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and np.ndim(x[0]) == 2


def curves(scores, labels, regions: bool = False) -> dict[str, float]:
    """{"auroc", "ap", "f1_max", "aupr"} of scores against binary labels of the same shape, plus
    "aupro" when `regions` (labels are then [T, H, W] masks); NaN where only one class is present.
    Maps and masks may also be lists of [H_t, W_t] arrays, each map the shape of its mask."""
    if _ragged(scores) or _ragged(labels):
        if len(scores) != len(labels):
            raise ValueError(f"{len(scores)} maps but {len(labels)} masks")
        for t, (s, m) in enumerate(zip(scores, labels)):
            if np.shape(s) != np.shape(m):
                raise ValueError(f"map {t} is {np.shape(s)} but its mask is {np.shape(m)}")
        masks = [np.asarray(m).astype(bool) for m in labels]
        scores = np.concatenate([np.asarray(s, np.float32).ravel() for s in scores])
        labels = np.concatenate([m.ravel() for m in masks])
    else:
        scores, labels = np.asarray(scores), np.asarray(labels).astype(bool)
        masks = labels
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must have one shape")
    keys = ("auroc", "ap", "f1_max", "aupr") + (("aupro",) if regions else ())
    if labels.all() or not labels.any():
        return dict.fromkeys(keys, float("nan"))
    weight = np.zeros(labels.shape, np.float32)
    if regions:
        ids, sizes = label_regions(masks)
        ids = np.concatenate([i.ravel() for i in ids]) if isinstance(ids, list) else ids
        weight = np.concatenate([[0.0], 1.0 / (len(sizes) * sizes)]).astype(np.float32)[ids]
    scores = scores.astype(np.float32)
    lo, hi = float(scores.min()), float(scores.max())
    thr = adeval_thresholds(lo, hi)
    out = _curves(*map(jnp.asarray, (scores, labels, weight.reshape(labels.shape), thr)))
    got = {k: float(out[k]) for k in keys}
    if not hi > lo:  # constant scores: ADEval's strips are undefined
        got["aupr"] = float("nan")
    return got


def auroc(scores, labels) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    return curves(scores, labels)["auroc"]


def average_precision(scores, labels) -> float:
    """Average precision (area under the step-wise precision-recall curve); NaN for one class."""
    return curves(scores, labels)["ap"]


def f1_max(scores, labels) -> float:
    """The best F1 over all thresholds; NaN when only one class is present."""
    return curves(scores, labels)["f1_max"]


def aupro(maps_TxHxW, masks_TxHxW) -> float:
    """Normalised area under the per-region-overlap curve up to FPR 0.3; NaN without both defect
    and normal pixels."""
    return curves(maps_TxHxW, masks_TxHxW, regions=True)["aupro"]


def sample_keys(paths: Sequence[str]) -> list[str] | None:
    """The sample key of each file name (`SAMPLE_KEY`, searched in the base name), or None unless
    every name has one (then the names carry no views)."""
    keys = []
    for p in paths:
        m = SAMPLE_KEY.search(os.path.basename(str(p)))
        if m is None:
            return None
        keys.append(m.group(1))
    return keys or None


def by_sample(scores_T, labels_T, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """View-level scores and labels [T] -> per sample (max over its views) [S], in key order."""
    scores_T, labels_T = np.asarray(scores_T, np.float32), np.asarray(labels_T)
    if not (len(scores_T) == len(labels_T) == len(keys)):
        raise ValueError(
            f"{len(scores_T)} scores, {len(labels_T)} labels and {len(keys)} sample keys differ"
        )
    uniq, group_T = np.unique(np.asarray(keys), return_inverse=True)
    scores_S = np.full(len(uniq), -np.inf, np.float32)
    labels_S = np.zeros(len(uniq), labels_T.dtype)
    np.maximum.at(scores_S, group_T, scores_T)
    np.maximum.at(labels_S, group_T, labels_T)
    return scores_S, labels_S


def evaluate(
    image_scores,
    labels,
    maps,
    masks,
    names: str | Sequence[str] = ALL,
    paths: Sequence[str] | None = None,
) -> dict:
    """Library API: {metric: value} for `names` (default all of `ALL`) from image scores [T],
    labels [T], anomaly maps and ground-truth masks [T, H, W] (or lists of [H_t, W_t] maps and
    masks, e.g. at each image's original resolution). The sample metrics need the image `paths` [T]
    and are left out, like any metric not asked for, when their names carry no views.
    """
    names = check_names(names)
    out = {}
    keys = sample_keys(paths) if paths is not None and any(n in SAMPLE for n in names) else None
    if keys is not None:
        got = curves(*by_sample(image_scores, labels, keys))
        out.update({n: got[n.split("_", 1)[1]] for n in SAMPLE if n in names})
    for scope, scores, truth in (("image", image_scores, labels), ("pixel", maps, masks)):
        wanted = [n for n in names if n.startswith(scope + "_")]
        if wanted:  # one sort per scope gives all of its metrics
            got = curves(scores, truth, regions=f"{scope}_aupro" in wanted)
            out.update({n: got[n.split("_", 1)[1]] for n in wanted})
    return {n: out[n] for n in names if n in out}


def describe(result: dict) -> str:
    """ "image AUROC 0.997  pixel AUROC 0.988  ..." for the log, in `ALL` order."""
    return "  ".join(f"{NAMES[k]} {result[k]:.3f}" for k in ALL if k in result)
