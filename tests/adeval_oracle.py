"""ADEval 1.1.0's Real-IAD evaluation restated in plain numpy from its documentation and command
line (`python -m adeval`), for the tests: no code of ours and none of ADEval's.

- Binned AUPR: the score range [min, max] cut at 1001 evenly spaced thresholds (float32, as
  numpy's linspace(0, 1, 1001, dtype=float32) * (max - min) + min builds them); at each, scores
  >= t are flagged; precision TP / flagged (1 where none is flagged), recall TP / P; the area by
  the trapezoid rule over ascending recall. Brute force: every threshold against every score.
- Ground truth: the mask file in grayscale, > 127; an image without a mask is all normal; an image
  is anomalous when any pixel is.
- Maps: resized to the mask's size by OpenCV's INTER_LINEAR (half-pixel centres, source
  coordinates clamped to the edge pixels).
- Samples: the views grouped by the --sample_key_pat match, score and label their maxima.
"""

import re

import numpy as np
from PIL import Image

SAMPLE_KEY = r"([a-zA-Z][a-zA-Z0-9_]*_[0-9]{4}_[A-Z][A-Z_]*[A-Z])_C[0-9]_"


def binned_aupr(scores, labels, strips: int = 1000) -> float:
    scores = np.asarray(scores, np.float32).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    lo, hi = float(scores.min()), float(scores.max())
    fractions = np.linspace(0.0, 1.0, strips + 1, dtype=np.float32)
    thr = fractions * np.float32(hi - lo) + np.float32(lo)
    flagged = scores[None, :] >= thr[:, None]  # [thresholds, scores]
    tp = (flagged & labels[None, :]).sum(1)
    n_flagged = flagged.sum(1)
    precision = np.where(n_flagged > 0, tp / np.maximum(n_flagged, 1), 1.0)
    recall = tp / labels.sum()
    r, p = recall[::-1], precision[::-1]  # recall ascending
    return float(sum((r[i + 1] - r[i]) * (p[i + 1] + p[i]) / 2 for i in range(len(r) - 1)))


def read_gt(image_path: str, mask_path: str | None) -> np.ndarray:
    w, h = Image.open(image_path).size
    if mask_path is None:
        return np.zeros((h, w), bool)
    return np.asarray(Image.open(mask_path).convert("L")) > 127


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0, n_in - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0


def inter_linear(a: np.ndarray, h: int, w: int) -> np.ndarray:
    a = np.asarray(a, np.float64)
    y0, y1, fy = _axis_weights(a.shape[0], h)
    x0, x1, fx = _axis_weights(a.shape[1], w)
    rows = a[y0] * (1 - fy)[:, None] + a[y1] * fy[:, None]
    return rows[:, x0] * (1 - fx)[None, :] + rows[:, x1] * fx[None, :]


def evaluate_pickle(doc: dict) -> dict:
    """{s_aupr, i_aupr, p_aupr, i_labels, p_scores, p_labels} of an ADEval input pickle's dict."""
    paths = sorted(doc)
    scores = np.array([doc[p][1] for p in paths])
    gts = [read_gt(p, doc[p][2]) for p in paths]
    labels = np.array([g.any() for g in gts])
    maps = [inter_linear(doc[p][0], *g.shape) for p, g in zip(paths, gts)]
    keys = [re.search(SAMPLE_KEY, p).group(1) for p in paths]
    s_scores = {k: max(s for s, kk in zip(scores, keys) if kk == k) for k in set(keys)}
    s_labels = {k: max(lb for lb, kk in zip(labels, keys) if kk == k) for k in set(keys)}
    order = sorted(s_scores)
    p_scores = np.concatenate([m.ravel() for m in maps])
    p_labels = np.concatenate([g.ravel() for g in gts])
    return {
        "s_aupr": binned_aupr([s_scores[k] for k in order], [s_labels[k] for k in order]),
        "i_aupr": binned_aupr(scores, labels),
        "p_aupr": binned_aupr(p_scores, p_labels),
        "i_labels": dict(zip(paths, labels)),
        "p_scores": p_scores,
        "p_labels": p_labels,
    }
