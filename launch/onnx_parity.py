"""Parity of an exported model's predictions with `deploy predict`'s, image by image, whichever
runtime ran the export (ONNX Runtime or OpenVINO).

  python -m launch.onnx_parity --model=MODEL --deploy_out=PRED_DIR --onnx_out=ONNX_PRED_DIR

PRED_DIR: `python -m softpatch_jax.deploy predict --model=MODEL --images=DIR --out=PRED_DIR`;
ONNX_PRED_DIR: `launch/onnx_predict.py --model=FILE.onnx --images=DIR --out=ONNX_PRED_DIR
--save_maps_npy [--runtime=onnxruntime|openvino]`. The runtime and the exported model's sha256 are
read from ONNX_PRED_DIR/predictions.json (an export of another model is an error). Scores and
decisions are compared from the two predictions.csv; the anomaly maps of the runner (maps/*.npy)
against the package's, recomputed here exactly as `deploy predict` computes them
(`predicting._scorer`, `region.stitch`) for the region the export inspects. Prints one line per
image and a summary; exit status 1 if a score differs by more than --rtol (relative) or a decision
differs.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np

from softpatch_jax import io_utils
from softpatch_jax.data import folder
from softpatch_jax.deploy import export, predicting
from softpatch_jax.deploy import model as model_lib
from softpatch_jax.deploy import region as region_lib


def package_map(model, ex, run, path: str, mode: str) -> np.ndarray:
    cfg = model.config
    v = region_lib.load(path, cfg.dataset.resize, cfg.dataset.crop, mode)
    _, _, maps = predicting._score_tiles(run, ex.batch_size, v.tiles)
    return region_lib.stitch(maps, v.origins, v.frame.shape[:2])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--deploy_out", required=True)
    p.add_argument("--onnx_out", required=True)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--nomaps", dest="maps", action="store_false")
    a = p.parse_args()

    def rows(d):
        with open(os.path.join(d, "predictions.csv"), newline="") as f:
            return {r["image"]: r for r in csv.DictReader(f)}

    ref, got = rows(a.deploy_out), rows(a.onnx_out)
    if set(ref) != set(got):
        print(f"image sets differ: {sorted(set(ref) ^ set(got))[:5]}")
        return 1
    model = model_lib.load(a.model)
    summary = io_utils.read_json(os.path.join(a.onnx_out, predicting.MARKER))
    if summary.get("model_sha256") != export.model_sha256(model.path):
        print(f"{a.onnx_out!r} was not scored by an export of {a.model!r} (model_sha256 differs)")
        return 1
    runtime, mode = summary["runtime"], summary["region"]
    deploy_mode = io_utils.read_json(os.path.join(a.deploy_out, predicting.MARKER))["region"][
        "mode"
    ]
    if deploy_mode != mode:
        print(f"deploy predict inspected region {deploy_mode}, the export region {mode}")
        return 1
    ex = predicting.build_extractor(model)
    run = predicting._scorer(model, ex)
    worst_rel, worst_map, flips = 0.0, 0.0, 0
    for name in sorted(ref):
        r, g = ref[name], got[name]
        s_ref, s_got = float(r["score"]), float(g["score"])
        rel = abs(s_got - s_ref) / max(abs(s_ref), 1e-12)
        flip = r["anomalous"] != g["anomalous"]
        line = (
            f"{name}: deploy {s_ref:.6g} export {s_got:.6g} rel {rel:.2e} decision {r['anomalous']}"
        )
        if flip:
            line += f" vs {g['anomalous']} DIFFERENT"
        if a.maps:
            path = folder.unescape(r["path"])
            m_ref = package_map(model, ex, run, path, mode)
            m_got = np.load(os.path.join(a.onnx_out, "maps", folder.unescape(name) + ".npy"))
            diff = float(np.abs(m_ref - m_got).max())
            worst_map = max(worst_map, diff)
            line += f" map max|diff| {diff:.3g} (map max {m_ref.max():.6g})"
        print(line)
        worst_rel, flips = max(worst_rel, rel), flips + flip
    print(
        f"SUMMARY {runtime} vs deploy predict, {len(ref)} images (region {mode}): "
        f"max relative score difference {worst_rel:.3e} "
        f"(tolerance {a.rtol}), decisions differing {flips}, map max abs difference {worst_map:.4g}"
    )
    return 0 if worst_rel <= a.rtol and flips == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
