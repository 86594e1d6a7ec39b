"""The README's "Unknown contamination" table from a contamination sweep's results.jsonl
(configs/sweeps/contamination.py): per noise ratio and method, mean image / pixel AUROC at the
authors' tau 0.15, at `auto`, at the best fixed tau and at the oracle tau; the estimate against
the truth; and the issue's goals, met or missed by how much.

  python -m launch.contamination_table --workdir=/tmp/sw_cont [--workdir=...] [--name=demo]
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np
from absl import app, flags

from softpatch_jax import contamination

METHODS = (("softpatch_lof", "SoftPatch-LOF"), ("softpatch_plus", "SoftPatch+"))


def read(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "results.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# Estimators built on the image gate: where it flags no image (tau 0, every suspicion 0) they all
# give PatchCore's bank, so a clean set's `image` rows stand for the others when every one of them
# flagged nothing.
IMAGE_FAMILY = ("image", "image_share", "image_share_global", "image_floor", "image_contrast")


def _own(r: dict, estimator: str, floor: float) -> bool:
    """Whether an `auto` row is the estimator's with the floor (rows from before the floor existed
    carry no auto_floor: they ran without one)."""
    used = r.get("softpatch.auto_estimator", "image")
    return used == estimator and r.get("softpatch.auto_floor", 0.0) == floor


def _policy(r: dict, estimator: str, floor: float):
    tau, seg = r.get("softpatch.tau"), r.get("softpatch.tau_seg")
    used = r.get("softpatch.auto_estimator", "image")
    if tau == "auto" and not _own(r, estimator, floor):
        stands_in = (
            used in IMAGE_FAMILY
            and estimator in IMAGE_FAMILY
            and r["noise_ratio"] == 0.0
            and r["image_fraction_estimated"] == 0.0
        )
        if not stands_in:
            return None
    if r["method"] == "softpatch_plus":
        if tau in ("auto", "oracle"):
            return tau if seg == tau else None
        return tau if seg == 0.5 else None
    return tau


def cells(rows: list[dict], estimator: str, floor: float = contamination.FLOOR) -> dict:
    """{(noise, method, policy): {category: row}}; PatchCore under policy None; `auto` rows of
    the estimator `estimator` with the floor `floor` only."""
    out: dict = collections.defaultdict(dict)
    for r in sorted(rows, key=lambda r: _own(r, estimator, floor)):
        pol = None if r["method"] == "patchcore" else _policy(r, estimator, floor)
        if r["method"] != "patchcore" and pol is None:
            continue
        out[(r["noise_ratio"], r["method"], pol)][r["category"]] = r
    return out


def mean(d: dict, key: str, cats) -> float:
    return float(np.mean([d[c][key] for c in cats]))


def analyse(
    rows: list[dict], estimator: str, floor: float = contamination.FLOOR
) -> tuple[list[str], list[str], list[str]]:
    """(table lines, goal lines, estimate lines) in markdown."""
    by = cells(rows, estimator, floor)
    noises = sorted({k[0] for k in by})
    cats = sorted({r["category"] for r in rows})
    table = [
        "| noise | method | tau 0.15 I / P | auto I / P | best fixed tau: I / P | oracle I / P |",
        "|---|---|---|---|---|---|",
    ]
    goals, est = [], []
    for noise in noises:
        pc = by.get((noise, "patchcore", None), {})
        done = [c for c in cats if c in pc]
        if not done:
            continue
        table.append(
            f"| {noise:.1f} | PatchCore | {mean(pc, 'image_auroc', done):.4f} / "
            f"{mean(pc, 'pixel_auroc', done):.4f} | | | |"
        )
        for method, label in METHODS:
            fixed = {
                k[2]: v
                for k, v in by.items()
                if k[0] == noise and k[1] == method and not isinstance(k[2], str | None)
            }
            auto = by.get((noise, method, "auto"), {})
            oracle = by.get((noise, method, "oracle"), {})
            here = [c for c in done if c in auto and all(c in v for v in fixed.values())]
            if not here or not fixed:
                continue

            def cell(d, here=here):
                if not all(c in d for c in here):
                    return "-"
                return f"{mean(d, 'image_auroc', here):.4f} / {mean(d, 'pixel_auroc', here):.4f}"

            best_i = max(fixed, key=lambda t: mean(fixed[t], "image_auroc", here))
            best_p = max(fixed, key=lambda t: mean(fixed[t], "pixel_auroc", here))
            bi, bp = (
                mean(fixed[best_i], "image_auroc", here),
                mean(fixed[best_p], "pixel_auroc", here),
            )
            ai, ap = mean(auto, "image_auroc", here), mean(auto, "pixel_auroc", here)
            t15 = fixed.get(0.15)
            table.append(
                f"| {noise:.1f} | {label} | {cell(t15) if t15 else '-'} | {cell(auto)} | "
                f"{best_i:g}: {bi:.4f} / {best_p:g}: {bp:.4f} | {cell(oracle) if oracle else '-'} |"
            )
            n = f"{len(here)}/{len(cats)} categories"
            if noise == 0.0:
                pi, pp = mean(pc, "image_auroc", here), mean(pc, "pixel_auroc", here)
                worst = min(auto[c]["image_auroc"] - pc[c]["image_auroc"] for c in here)
                ok = abs(ai - pi) <= 0.002 and worst >= -0.01
                goals.append(
                    f"- noise 0, {label} ({n}): auto - PatchCore = {ai - pi:+.4f} image, "
                    f"{ap - pp:+.4f} pixel; worst category {worst:+.4f} image: "
                    f"{'met' if ok else 'MISSED'}"
                )
            else:
                ti = mean(t15, "image_auroc", here) if t15 else float("nan")
                tp = mean(t15, "pixel_auroc", here) if t15 else float("nan")
                ok_i = ai >= bi - 0.005 and ai >= ti
                ok_p = ap >= bp - 0.005 and ap >= tp
                goals.append(
                    f"- noise {noise:.1f}, {label} ({n}): image auto - best fixed ({best_i:g}) = "
                    f"{ai - bi:+.4f}, auto - tau 0.15 = {ai - ti:+.4f}: "
                    f"{'met' if ok_i else 'MISSED'}; pixel auto - best ({best_p:g}) = "
                    f"{ap - bp:+.4f}, auto - 0.15 = {ap - tp:+.4f}: {'met' if ok_p else 'MISSED'}"
                )
            if method == "softpatch_lof":
                rs = [auto[c] for c in here]
                img_err = [
                    abs(r["image_fraction_estimated"] - r["train_anomalous_fraction"]) for r in rs
                ]
                tau_err = [
                    abs(r["tau_estimated"] - r["tau_true"]) for r in rs if r["tau_true"] is not None
                ]
                applied = [r.get("tau_applied") for r in rs]
                applied = "-" if None in applied else f"{np.mean(applied):.4f}"
                est.append(
                    f"| {noise:.1f} | {np.mean([r['train_anomalous_fraction'] for r in rs]):.3f} | "
                    f"{np.mean([r['image_fraction_estimated'] for r in rs]):.3f} | {np.mean(img_err):.3f} | "
                    f"{np.mean([r['tau_true'] for r in rs]):.4f} | "
                    f"{np.mean([r['tau_estimated'] for r in rs]):.4f} | {np.mean(tau_err):.4f} | "
                    f"{applied} |"
                )
    est = [
        "| noise | true anomalous image fraction | estimated | MAE | true contaminated patch "
        "fraction | estimated tau | MAE | tau applied (floor) |",
        "|---|---|---|---|---|---|---|---|",
        *est,
    ]
    return table, goals, est


def ablation(rows: list[dict]) -> list[str]:
    """The clean-data ablation (a `DATASET_ablation` workdir): removal x soft weights."""
    by: dict = collections.defaultdict(dict)
    for r in rows:
        if r["softpatch.tau"] == r["softpatch.tau_seg"]:
            by[(r["softpatch.tau"], r["softpatch.soft_weight"])][r["category"]] = r
    cats = sorted({c for d in by.values() for c in d})
    base = by.get((0.0, "none"), {})
    out = [
        "| removal (tau) | soft weights | image AUROC | pixel AUROC | worst category vs PatchCore |",
        "|---|---|---|---|---|",
    ]
    for (tau, w), d in sorted(by.items()):
        worst = min(cats, key=lambda c: d[c]["image_auroc"] - base[c]["image_auroc"])
        out.append(
            f"| {tau:g} | {w} | {mean(d, 'image_auroc', cats):.4f} | "
            f"{mean(d, 'pixel_auroc', cats):.4f} | {worst} "
            f"{d[worst]['image_auroc'] - base[worst]['image_auroc']:+.4f} |"
        )
    return out


_WORKDIRS = flags.DEFINE_multi_string("workdir", [], "Sweep workdirs (results.jsonl).")
_NAME = flags.DEFINE_string("name", "", "A title for the output.")
_ABLATION = flags.DEFINE_bool("ablation", False, "The workdirs are ablation sweeps.")
_ESTIMATOR = flags.DEFINE_string(
    "estimator", contamination.DEFAULT, "Whose `auto` rows (auto_estimator)."
)
_FLOOR = flags.DEFINE_float(
    "floor", contamination.FLOOR, "Whose `auto` rows (softpatch.auto_floor; 0: none)."
)


def main(argv):
    del argv
    rows = [r for w in _WORKDIRS.value for r in read(w)]
    if _ABLATION.value:
        print(f"### {_NAME.value}: what costs on clean data\n")
        print("\n".join(ablation(rows)))
        return
    table, goals, est = analyse(rows, _ESTIMATOR.value, _FLOOR.value)
    print(f"### {_NAME.value} (auto: {_ESTIMATOR.value}, floor {_FLOOR.value:g})\n")
    print("\n".join(table), "\n")
    print("\n".join(goals), "\n")
    print("\n".join(est))


if __name__ == "__main__":
    app.run(main)
