"""Training-set audit: which training images were probably defective, judged by the noise
discriminators the fit already ran (METHOD.md sections 3-4), and how well that ranking finds
known injected defects.

Definitions (per auditor: each discriminator nearest/gaussian/lof, and "fusion"):
- patch rank r in (0, 1]: the patch's raw score ranked among all N*P training patches, rank/count
  ascending (`discriminators.rank_normalise`); for "fusion", SoftPatch+'s mean of the configured
  discriminators' ranks (config.softpatch.discriminators, rank_scope). Ranks make the
  discriminators' different scales comparable.
- audit score of an image: the mean of its top 1% patch ranks (at least one patch), i.e. how
  strongly its most outlying region stands out. A defect covers few patches, so an image-wide mean
  would drown it, while a single maximum is the noisiest order statistic.
- removed fraction: the share of the image's patches with rank above 1 - tau, i.e. what SoftPatch
  would remove with that auditor alone (tau = config.softpatch.tau). Reported, not used to rank:
  it ties at 0 for most images.
Images are listed by the fusion's audit score, highest first; the CSV also has every auditor's
score and rank, and the fraction the fitted method's classification bank actually removed.

Precision and recall at k = the number of truly defective images: the share of the top-k that
are defective, and the share of defective images in the top-k (equal at this k by construction);
average precision is reported beside them as a threshold-free summary.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from softpatch_jax import discriminators, io_utils
from softpatch_jax.deploy import render

FUSION = "fusion"
MARKER = "audit.json"  # marks a folder as an audit written by this tool
TOP_FRACTION = 0.01


@dataclasses.dataclass(frozen=True)
class Audit:
    names: tuple[str, ...]  # relative image names, training order
    ranks_NxP: dict[str, np.ndarray]  # auditor -> patch ranks
    score_N: dict[str, np.ndarray]  # auditor -> audit score
    removed_N: dict[str, np.ndarray]  # auditor -> removed fraction
    method_removed_N: np.ndarray  # fraction removed by the fitted classification bank

    @property
    def order(self) -> np.ndarray:
        """Training indices by fusion audit score, highest first (ties: training order)."""
        return np.argsort(-self.score_N[FUSION], kind="stable")


def image_score(ranks_NxP: np.ndarray) -> np.ndarray:
    p = ranks_NxP.shape[1]
    top = max(1, round(TOP_FRACTION * p))
    return np.sort(ranks_NxP, axis=1)[:, -top:].mean(axis=1)


def compute(
    names: Sequence[str],
    scores_NxP: dict[str, np.ndarray],
    fusion_names: Sequence[str],
    rank_scope: str,
    tau: float,
    keep_NxP: np.ndarray,
) -> Audit:
    scores = {n: jnp.asarray(s) for n, s in scores_NxP.items()}
    ranks = {
        n: np.asarray(discriminators.rank_normalise(discriminators.order_key(scores, n)))
        for n in scores
        if n in discriminators.NAMES
    }
    as_PxN = {n: discriminators.order_key(scores, n).T for n in fusion_names}
    ranks[FUSION] = np.asarray(discriminators.fuse(as_PxN, tuple(fusion_names), rank_scope)).T
    return Audit(
        names=tuple(names),
        ranks_NxP=ranks,
        score_N={n: image_score(r) for n, r in ranks.items()},
        removed_N={n: (r > 1.0 - tau).mean(axis=1) for n, r in ranks.items()},
        method_removed_N=1.0 - np.asarray(keep_NxP, bool).mean(axis=1),
    )


def rows(audit: Audit) -> list[dict]:
    auditor_rank = {n: np.empty(len(audit.names), np.int64) for n in audit.score_N}
    for n, s in audit.score_N.items():
        auditor_rank[n][np.argsort(-s, kind="stable")] = np.arange(1, len(s) + 1)
    out = []
    for pos, i in enumerate(audit.order):
        row = {
            "rank": pos + 1,
            "image": audit.names[i],
            "audit_score": float(audit.score_N[FUSION][i]),
        }
        row["method_removed_fraction"] = round(float(audit.method_removed_N[i]), 6)
        for n in audit.score_N:
            row[f"{n}_score"] = round(float(audit.score_N[n][i]), 6)
            row[f"{n}_rank"] = int(auditor_rank[n][i])
            row[f"{n}_removed_fraction"] = round(float(audit.removed_N[n][i]), 6)
        out.append(row)
    return out


def average_precision(score_N: np.ndarray, truth_N: np.ndarray) -> float:
    order = np.argsort(-score_N, kind="stable")
    hits = truth_N[order].astype(np.float64)
    if hits.sum() == 0:
        return float("nan")
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision_at * hits).sum() / hits.sum())


def precision_recall(audit: Audit, truth_N: np.ndarray) -> list[dict]:
    """Per auditor: precision and recall of the top-k, k = number of true defects; AP."""
    truth_N = np.asarray(truth_N, bool)
    k = int(truth_N.sum())
    out = []
    for n, s in audit.score_N.items():
        top = np.argsort(-s, kind="stable")[:k]
        hits = int(truth_N[top].sum())
        out.append(
            {
                "auditor": n,
                "k": k,
                "hits": hits,
                "precision": hits / k if k else float("nan"),
                "recall": hits / k if k else float("nan"),
                "average_precision": round(average_precision(s, truth_N), 4),
            }
        )
    return out


def markdown_table(pr_rows: list[dict]) -> str:
    lines = ["| auditor | k | hits | precision@k | recall@k | AP |", "|---|---|---|---|---|---|"]
    for r in pr_rows:
        lines.append(
            f"| {r['auditor']} | {r['k']} | {r['hits']} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {r['average_precision']:.3f} |"
        )
    return "\n".join(lines)


def write(
    folder: str,
    audit: Audit,
    *,
    load_image: Callable[[int], np.ndarray | None],
    grid: tuple[int, int],
    rank_map: Callable[[np.ndarray, tuple[int, int]], np.ndarray] | None = None,
    top: int = 16,
    tau: float = 0.15,
    truth_N: np.ndarray | None = None,
    note: str = "",
    contamination: dict | None = None,
) -> dict:
    """audit.csv, audit.json (definitions, precision/recall if truth is given, the fit's
    contamination estimate `contamination`: contamination.py), contact_sheet.png of
    the `top` suspects with their fusion patch-rank maps. load_image(i) gives training image i's
    picture (centre crop or whole frame), or None when it can no longer be read; rank_map(ranks_P,
    (H, W)) draws an image's patch ranks at that size (default: a `grid` map upsampled)."""
    io_utils.check_writable(folder)
    table = rows(audit)
    io_utils.write_csv(os.path.join(folder, "audit.csv"), table)
    summary = {
        "definition": (
            "fusion_score (the ranking) = mean of the image's top 1% patch ranks under the "
            "fusion of the configured discriminators; ranks over all training patches, in (0, 1]; "
            "<auditor>_removed_fraction = share of its patches with rank > 1 - tau"
        ),
        "num_images": len(audit.names),
        "top": [r["image"] for r in table[:top]],
        "note": note,
    }
    if contamination is not None:
        summary["contamination"] = contamination
    if truth_N is not None:
        summary["precision_recall"] = precision_recall(audit, truth_N)
        with io_utils.atomic_open(os.path.join(folder, "precision_recall.md")) as f:
            f.write(markdown_table(summary["precision_recall"]) + "\n")
    tiles, captions = [], []
    for pos, i in enumerate(audit.order[:top]):
        img = load_image(int(i))
        r = audit.ranks_NxP[FUSION][i]
        if img is None:
            img = np.full((*grid, 3), 128, np.uint8)
            up = render.upsample(r[: grid[0] * grid[1]].reshape(grid), img.shape[:2])
        elif rank_map is not None:
            up = rank_map(r, img.shape[:2])
        else:
            up = render.upsample(r.reshape(grid), img.shape[:2])
        tiles.append(render.overlay(img, up, 1.0 - tau, 1.0))
        name = audit.names[i]
        known = "" if truth_N is None else (" [defective]" if truth_N[i] else " [normal]")
        captions.append(f"#{pos + 1} {audit.score_N[FUSION][i]:.3f}{known}\n{name[-40:]}")
    render.contact_sheet(
        os.path.join(folder, "contact_sheet.png"),
        tiles,
        captions,
        f"top {len(tiles)} training suspects: fusion patch ranks above 1 - tau = {1 - tau:.2f} "
        f"shown{note}",
    )
    io_utils.write_json(os.path.join(folder, "audit.json"), summary, strict=True)
    return summary
