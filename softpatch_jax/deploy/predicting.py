"""`predict` for the deployment tool: a saved model + images -> per-image score and decision, heat map
and overlay PNGs, predictions.csv / predictions.json (METHOD.md section 5 for the scores).

Streaming: images are decoded, embedded and scored one fixed-size batch at a time (padded, so the
backbone and the scoring compile once) and each batch's maps are written and dropped before the next,
so memory does not grow with the number of images. Everything is written into a staging folder inside
OUT and moved into place only when the whole run succeeded, so a failure (bad image, full disk)
leaves OUT as it was.

Output names mirror the images' paths relative to their common folder (nested folders may repeat
file names): OUT/heatmaps/<rel>.png, OUT/overlays/<rel>.png.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from softpatch_jax import features, io_utils, scoring
from softpatch_jax.data import folder, images
from softpatch_jax.deploy import fitting, render
from softpatch_jax.deploy import model as model_lib
from softpatch_jax.deploy import threshold as threshold_lib

OUTPUTS = ("predictions.csv", "predictions.json", "heatmaps", "overlays")


def map_scale(model: model_lib.Model, thr: float) -> tuple[float, float]:
    """Heat map colour range: lo = the median held-out training patch score (normal surface shows
    dark), hi = the decision threshold (a region as anomalous as a flagged image's worst patch
    shows at the top of the scale). Maps come from the segmentation bank and are blurred, so this is
    a fixed, comparable scale rather than a calibrated one."""
    lo = float(np.median(model.arrays["train_patch_median"]))
    return lo, max(float(thr), lo + 1e-6)


def build_extractor(
    model: model_lib.Model,
    strict_version: bool = True,
    extractor: features.Extractor | None = None,
) -> features.Extractor:
    """The model's backbone, checked against what it was fitted with."""
    ex = extractor or features.build(model.config)
    for note in model_lib.check_compatible(model, ex, strict_version=strict_version):
        logging.info("model vs install (tolerated): %s", note)
    if ex.random_init:
        logging.warning(features.RANDOM_INIT_WARNING)
    return ex


def _scorer(model: model_lib.Model, ex: features.Extractor):
    """(padded uint8 batch) -> (image scores [B], maps [B, H, W]); shapes fixed, compiled once."""
    cfg = model.config
    banks = model.banks

    def run(batch_BxHxWx3):
        f = ex.apply(ex.variables, jnp.asarray(batch_BxHxWx3))
        f = f.reshape(f.shape[0], -1, f.shape[-1])
        s, maps = scoring.predict(
            banks,
            f,
            ex.grid,
            ex.image_size,
            cfg.scoring.blur_sigma,
            cfg.scoring.chunk_size,
            distance=cfg.scoring.distance,
        )
        return f, s, maps

    return run


def predict(
    model: model_lib.Model,
    sources: str | Sequence[str],
    out_dir: str,
    *,
    threshold: str | None = None,
    skip_bad_images: bool = False,
    allow_upscale: bool = False,
    write_maps: bool = True,
    strict_version: bool = True,
    extractor: features.Extractor | None = None,
) -> list[dict]:
    """Scores every image under `sources`; writes OUT (see module docstring); returns the rows."""
    rule = threshold or model.meta["threshold"]["rule"]
    thr = threshold_lib.value(rule, model.arrays["train_scores"])
    listing = folder.list_images(sources)
    io_utils.check_writable(out_dir)
    ex = build_extractor(model, strict_version, extractor)
    lo, hi = map_scale(model, thr)
    cfg = model.config
    paths = [r.path for r in listing.records]
    run = _scorer(model, ex)
    stage = tempfile.mkdtemp(prefix=".predict-staging-", dir=out_dir)
    rows: list[dict] = []
    bad: list[images.BadImageError] = []
    try:
        t0 = time.perf_counter()
        for batch in images.iter_batches(
            paths,
            ex.batch_size,
            cfg.dataset.resize,
            cfg.dataset.crop,
            skip_bad=skip_bad_images,
            allow_upscale=allow_upscale,
        ):
            bad += batch.bad
            real = len(batch.index)
            if real:
                padded = np.zeros((ex.batch_size, *batch.images.shape[1:]), np.uint8)
                padded[:real] = batch.images
                f, s, maps = run(padded)
                fitting.check_finite(f[:real], [paths[i] for i in batch.index])
                s, maps = np.asarray(s[:real]), np.asarray(maps[:real])
                for j, i in enumerate(batch.index):
                    row = _row(listing, paths[i], float(s[j]), float(maps[j].max()), thr)
                    rows.append(row if write_maps else _without_maps(row))
                    if write_maps:
                        _write_maps(stage, row, batch.images[j], maps[j], lo, hi)
            done = len(rows) + len(bad)
            rate = done / max(time.perf_counter() - t0, 1e-9)
            logging.info("predict: %d/%d images (%.1f img/s)", done, len(paths), rate)
        if not rows:
            raise ValueError(f"no readable image among {len(paths)} under {listing.root!r}")
        summary = {
            "model": model.path,
            "threshold": {"rule": rule, "value": thr},
            "map_scale": {"lo": lo, "hi": hi, "colormap": "inferno"},
            "num_images": len(rows),
            "num_anomalous": int(sum(r["anomalous"] for r in rows)),
            "skipped_bad": [{"path": b.path, "reason": b.reason} for b in bad],
            "ignored_non_images": list(listing.ignored),
            "random_init": ex.random_init,
            "devices": [str(d) for d in jax.devices()],
            "rows": rows,
        }
        io_utils.write_csv(os.path.join(stage, "predictions.csv"), rows)
        io_utils.write_json(os.path.join(stage, "predictions.json"), summary)
        _commit(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    for b in bad:
        logging.warning("skipped bad image %s", b)
    return rows


def _row(listing: folder.Listing, path: str, score: float, map_max: float, thr: float) -> dict:
    rel = listing.relative(path)
    return {
        "image": rel,
        "path": path,
        "score": score,
        "threshold": thr,
        "anomalous": bool(score > thr),
        "map_max": map_max,
        "heatmap": os.path.join("heatmaps", _png_name(rel)),
        "overlay": os.path.join("overlays", _png_name(rel)),
    }


def _png_name(rel: str) -> str:
    """a/b.png -> a/b.png, a/b.jpg -> a/b.jpg.png: unique per input, always a PNG."""
    return rel if rel.lower().endswith(".png") else rel + ".png"


def _without_maps(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("heatmap", "overlay")}


def _write_maps(stage: str, row: dict, image: np.ndarray, map_HxW: np.ndarray, lo, hi) -> None:
    render.save_png(os.path.join(stage, row["heatmap"]), render.heat(map_HxW, lo, hi))
    render.save_png(os.path.join(stage, row["overlay"]), render.overlay(image, map_HxW, lo, hi))


def _commit(stage: str, out_dir: str) -> None:
    """Moves the staged outputs over OUT's previous ones; a leftover from an earlier run of the same
    name is replaced, anything else in OUT is left alone."""
    for name in OUTPUTS:
        src, dst = os.path.join(stage, name), os.path.join(out_dir, name)
        if not os.path.exists(src):
            continue
        if os.path.isdir(dst):
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(dst)
        os.replace(src, dst)
