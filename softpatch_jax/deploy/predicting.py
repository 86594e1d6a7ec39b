"""`predict` for the deployment tool: a saved model + images -> per-image score and decision, heat map
and overlay PNGs, predictions.csv / predictions.json (METHOD.md section 5 for the scores).

Region: by default the whole frame, tiled at the fit's scale (deploy/region.py); every row says
which region was inspected ("region" column) and the heat map covers the same frame.

Streaming: images are decoded, tiled, embedded and scored one batch of tiles at a time (shaped
to the work by `features.batch_plan`: one image costs one image, at most log2(batch_size) + 1
compiled shapes) and each group's maps are written and dropped
before the next, so memory does not grow with the number of images. OUT is built whole under a
staging name beside it and renamed into place only when the run succeeded (deploy/outdir.py), so a
failure (bad image, damaged model, full disk) leaves OUT as it was; an earlier prediction in OUT is
replaced whole only with --overwrite.

Decisions are never written from a damaged model: the model's checksums are verified on load
(deploy/model.py), and a non-finite score or map is an error naming the model and the image.

Output names mirror the images' paths relative to their common folder (nested folders may repeat
file names): OUT/heatmaps/<rel>.png, OUT/overlays/<rel>.png; in the CSV/JSON they are escaped
(`folder.escape`), so names that are not UTF-8 survive and the original bytes can be recovered.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from softpatch_jax import features, io_utils, scoring
from softpatch_jax.data import folder, images
from softpatch_jax.deploy import model as model_lib
from softpatch_jax.deploy import outdir, render
from softpatch_jax.deploy import region as region_lib
from softpatch_jax.deploy import threshold as threshold_lib
from softpatch_jax.experiment import options as options_lib

MARKER = "predictions.json"  # marks a folder as a prediction written by this tool


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
    depthwise: str | None = None,
) -> features.Extractor:
    """The model's backbone, checked against what it was fitted with.

    depthwise: overrides the config's depthwise lowering (export uses "conv", which ONNX runtimes
    run as their own grouped convolution); any lowering gives the same features to float32 rounding.
    """
    opts = options_lib.extractor_options(model.config)
    if depthwise is not None:
        opts = dataclasses.replace(
            opts, backbone=dataclasses.replace(opts.backbone, depthwise=depthwise)
        )
    ex = extractor or features.build(opts)
    for note in model_lib.check_compatible(model, ex, strict_version=strict_version):
        logging.info("model vs install (tolerated): %s", note)
    if ex.random_init:
        logging.warning(features.RANDOM_INIT_WARNING)
    return ex


def decision_threshold(model: model_lib.Model, threshold: str | None = None) -> tuple[str, float]:
    """(rule, value) of the accept/reject threshold: `threshold` (a number, `quantile:Q`, `mad:K`)
    or, when None, the rule the model was fitted with, applied to its held-out training scores."""
    rule = threshold or model.meta["threshold"]["rule"]
    return rule, threshold_lib.value(rule, model.arrays["train_scores"])


def inspected_region(model: model_lib.Model, region: str | None = None) -> str:
    """The region mode to inspect ("full" or "center", deploy/region.py): `region`, or the one the
    model was fitted on when None; a warning when they differ (the threshold then comes from
    training scores of another region)."""
    fitted = model.meta["region"]["mode"]
    mode = region_lib.check_mode(region or fitted)
    if mode != fitted:
        logging.warning(
            "--region=%s but the model was fitted on region=%s: its threshold comes from training "
            "scores of that region, so scores are not on the same footing",
            mode,
            fitted,
        )
    return mode


def scoring_options(scoring_cfg) -> scoring.Options:
    """The model's `config.scoring` section as the scoring composition's options (a model saved
    before `scoring.search` existed searches exactly: every search gives the same values)."""
    return scoring.Options(
        distance=scoring_cfg.distance,
        search=scoring_cfg.search if "search" in scoring_cfg else "exact",
        blur_sigma=scoring_cfg.blur_sigma,
        chunk_size=scoring_cfg.chunk_size,
    )


def _scorer(model: model_lib.Model, ex: features.Extractor):
    """(uint8 batch) -> (features, classification patch scores [B, P], maps [B, H, W]):
    `scoring.score_banks`, the composition experiments use; the caller takes the max over the
    patches a tile owns."""
    options = scoring_options(model.config.scoring)

    def run(batch_BxHxWx3):
        f = ex.apply(ex.variables, jnp.asarray(batch_BxHxWx3))
        f = f.reshape(f.shape[0], -1, f.shape[-1])
        cls, maps = scoring.score_banks(
            model.banks, f, tuple(ex.grid), tuple(ex.image_size), options
        )
        return f, cls, maps

    return run


def _score_tiles(run, batch_size: int, tiles_TxHxWx3: np.ndarray):
    """Every tile through `run` in the batches of `features.batch_plan` (no padding; at most
    log2(batch_size) + 1 compiled shapes) -> features-finite flags [T], patch scores [T, P],
    maps [T, H, W] (host)."""
    ok, scores, maps = [], [], []
    for start, size in features.batch_plan(len(tiles_TxHxWx3), batch_size):
        f, s, m = run(tiles_TxHxWx3[start : start + size])
        ok.append(np.asarray(jnp.all(jnp.isfinite(f), axis=(1, 2))))
        scores.append(np.asarray(s))
        maps.append(np.asarray(m))
    return np.concatenate(ok), np.concatenate(scores), np.concatenate(maps)


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
    region: str | None = None,
    overwrite: bool = False,
) -> list[dict]:
    """Scores every image under `sources`; writes OUT (see module docstring); returns the rows.

    region: "full" or "center" (deploy/region.py); default the one the model was fitted with.
    overwrite: replace an OUT that holds an earlier prediction (anything else there is an error).
    """
    rule, thr = decision_threshold(model, threshold)
    if warning := threshold_lib.spread_warning(model.arrays["train_scores"]):
        logging.warning("model %s: %s", model.path, warning)
    mode = inspected_region(model, region)
    listing = folder.list_images(sources)
    inputs = (sources,) if isinstance(sources, str) else tuple(sources)
    outdir.check_target(out_dir, MARKER, "prediction", overwrite=overwrite, inputs=inputs)
    if model.path:
        outdir.check_outside(out_dir, model.path, "model")
    io_utils.check_writable(os.path.dirname(os.path.abspath(out_dir)))
    ex = build_extractor(model, strict_version, extractor)
    lo, hi = map_scale(model, thr)
    cfg = model.config
    paths = [r.path for r in listing.records]
    run = _scorer(model, ex)
    rows: list[dict] = []
    bad: list[images.BadImageError] = []
    with outdir.staged(out_dir, MARKER, "prediction", overwrite=overwrite, inputs=inputs) as (
        stage,
        cleaned,
    ):
        t0 = time.perf_counter()
        for index, views, skipped in region_lib.iter_views(
            paths,
            ex.batch_size,
            cfg.dataset.resize,
            cfg.dataset.crop,
            mode,
            skip_bad=skip_bad_images,
            allow_upscale=allow_upscale,
            sixteen_bit_max=model.meta.get("decoding", {}).get(
                "sixteen_bit_max", images.FULL_16_BIT
            ),
        ):
            bad += skipped
            if index:
                tiles = np.concatenate([v.tiles for v in views])
                ok, s, maps = _score_tiles(run, ex.batch_size, tiles)
                bounds = np.cumsum([0] + [len(v.origins) for v in views])
                for j, (i, v) in enumerate(zip(index, views)):
                    a, b = bounds[j], bounds[j + 1]
                    if not ok[a:b].all():
                        raise FloatingPointError(
                            f"NaN or inf in the backbone features of {paths[i]!r}; check the "
                            "backbone weights and dtype (bfloat16 can overflow)"
                        )
                    frame_hw = v.frame.shape[:2]
                    frame_map = region_lib.stitch(maps[a:b], v.origins, frame_hw)
                    owned = region_lib.owned_patches(v.origins, cfg.dataset.crop, ex.grid, frame_hw)
                    score = float(s[a:b].reshape(-1)[owned].max())
                    if not (np.isfinite(score) and np.isfinite(frame_map).all()):
                        raise model_lib.DamagedModelError(
                            f"model {model.path!r} gives a non-finite score ({score}) for "
                            f"{paths[i]!r}; refusing to decide: the model is damaged"
                        )
                    described = region_lib.describe(mode, v, cfg.dataset.resize, cfg.dataset.crop)
                    row = _row(listing, paths[i], score, float(frame_map.max()), thr, described)
                    rows.append(row if write_maps else _without_maps(row))
                    if write_maps:
                        _write_maps(stage, paths[i], listing, v.frame, frame_map, lo, hi)
            done = len(rows) + len(bad)
            rate = done / max(time.perf_counter() - t0, 1e-9)
            logging.info("predict: %d/%d images (%.1f img/s)", done, len(paths), rate)
        if not rows:
            raise ValueError(f"no readable image among {len(paths)} under {listing.root!r}")
        summary = {
            "model": model.path,
            "threshold": {"rule": rule, "value": thr},
            "region": {"mode": mode, "doc": region_lib.MODE_DOC[mode]},
            "map_scale": {"lo": lo, "hi": hi, "colormap": "inferno"},
            "num_images": len(rows),
            "num_anomalous": int(sum(r["anomalous"] for r in rows)),
            "skipped_bad": [{"path": folder.escape(b.path), "reason": b.reason} for b in bad],
            "ignored_non_images": [folder.escape(p) for p in listing.ignored],
            "skipped_entries": [
                {"path": folder.escape(p), "reason": why} for p, why in listing.skipped
            ],
            "cleaned_leftovers": [folder.escape(p) for p in cleaned],
            "names": "escaped: \\ is a backslash, \\xNN a control character or non-UTF-8 byte",
            "random_init": ex.random_init,
            "devices": [str(d) for d in jax.devices()],
            "rows": rows,
        }
        io_utils.write_csv(os.path.join(stage, "predictions.csv"), rows)
        io_utils.write_json(os.path.join(stage, MARKER), summary, strict=True)
    for b in bad:
        logging.warning("skipped bad image %s", b)
    for p, why in listing.skipped:
        logging.warning("skipped %s: %s", p, why)
    return rows


def _row(
    listing: folder.Listing, path: str, score: float, map_max: float, thr: float, region: str
) -> dict:
    rel = listing.relative(path)
    return {
        "image": folder.escape(rel),
        "path": folder.escape(path),
        "score": score,
        "threshold": thr,
        "anomalous": bool(score > thr),
        "map_max": map_max,
        "region": region,
        "heatmap": folder.escape(os.path.join("heatmaps", _png_name(rel))),
        "overlay": folder.escape(os.path.join("overlays", _png_name(rel))),
    }


def _png_name(rel: str) -> str:
    """a/b.jpg -> a/b.jpg.png, a/b.png -> a/b.png.png: always the input's whole name plus .png,
    so two inputs never share a map (a.jpg and a.jpg.png would, if PNG names were kept)."""
    return rel + ".png"


def _without_maps(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("heatmap", "overlay")}


def _write_maps(stage, path, listing, frame, map_HxW, lo, hi) -> None:
    """Heat map and overlay under their real (unescaped) names, mirroring the input tree."""
    name = _png_name(listing.relative(path))
    render.save_png(os.path.join(stage, "heatmaps", name), render.heat(map_HxW, lo, hi))
    render.save_png(os.path.join(stage, "overlays", name), render.overlay(frame, map_HxW, lo, hi))
