"""The deployment tool's commands as plain functions (the CLI in `__main__.py` only parses flags and
calls these; notebooks and tests call them directly):

  fit_and_save  images -> MODEL/ (+ MODEL/audit/)
  run_predict   MODEL + images -> OUT/
  run_audit     MODEL -> OUT/ (+ precision/recall with a truth CSV)
  make_demo     a noisy demo training folder with its truth CSV, and a test folder
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Sequence

import ml_collections
import numpy as np
from absl import logging

from softpatch_jax import io_utils
from softpatch_jax.data import demo, images, mvtec, noise
from softpatch_jax.data import folder as folder_lib
from softpatch_jax.deploy import audit as audit_lib
from softpatch_jax.deploy import fitting, outdir, predicting, region, render
from softpatch_jax.deploy import model as model_lib


def read_truth(path: str, names: Sequence[str], root: str) -> np.ndarray:
    """bool [N] from a CSV with columns image (path relative to the training folder, or absolute)
    and defective (0/1). Every training image must be listed; unknown names are errors."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"image", "defective"} <= set(rows[0]):
        raise ValueError(f"truth file {path!r} needs the columns 'image' and 'defective'")
    truth = {}
    for r in rows:
        name = folder_lib.unescape(r["image"])
        if os.path.isabs(name):
            name = os.path.relpath(name, root)
        name = folder_lib.escape(name)  # names as the model and audit carry them
        truth[os.path.normpath(name)] = r["defective"].strip() in ("1", "true", "True")
    missing = [n for n in names if os.path.normpath(n) not in truth]
    if missing:
        raise ValueError(
            f"truth file {path!r} does not list {len(missing)} image(s): {missing[:5]}"
        )
    return np.array([truth[os.path.normpath(n)] for n in names])


def write_audit(
    model: model_lib.Model, folder: str, *, truth_csv: str | None = None, top: int = 16
) -> dict:
    """The audit report of a model's training set into `folder` (see deploy/audit.py)."""
    audit = fitting.audit_of(model)
    cfg = model.config
    root = folder_lib.unescape(model.meta["training"]["root"])
    truth = read_truth(truth_csv, audit.names, root) if truth_csv else None
    reg = model.meta["region"]
    grid = tuple(model.meta["embedding"]["grid"])
    crop = cfg.dataset.crop

    def load_image(i: int):
        try:
            path = os.path.join(root, folder_lib.unescape(audit.names[i]))
            v = region.load(path, cfg.dataset.resize, crop, reg["mode"], allow_upscale=True)
        except (images.BadImageError, OSError):
            return None  # moved or deleted since the fit: the sheet shows a grey tile
        return v.frame if list(v.frame.shape[:2]) == reg["frame_hw"] else None

    def rank_map(ranks, hw):
        tiles = ranks.reshape(-1, *grid)
        up = np.stack([render.upsample(t, (crop, crop)) for t in tiles])
        return region.stitch(up, np.asarray(reg["origins"]), hw)

    note = " [RANDOM-INIT BACKBONE]" if model.meta.get("random_init") else ""
    return audit_lib.write(
        folder,
        audit,
        load_image=load_image,
        grid=grid,
        rank_map=rank_map,
        top=top,
        tau=fitting.audit_tau(model),
        contamination=model.meta.get("contamination"),
        truth_N=truth,
        note=note,
    )


def fit_and_save(
    config: ml_collections.ConfigDict,
    sources: str | Sequence[str],
    model_dir: str,
    opts: fitting.Options | None = None,
    *,
    overwrite: bool = False,
    truth_csv: str | None = None,
    top: int = 16,
    extractor=None,
) -> model_lib.Model:
    # Refuse an unusable target before the long part (save checks again, under its lock).
    inputs = (sources,) if isinstance(sources, str) else tuple(sources)
    outdir.check_target(model_dir, model_lib.MANIFEST, "model", overwrite=overwrite, inputs=inputs)
    io_utils.check_writable(os.path.dirname(os.path.abspath(model_dir)))
    model, audit, _ = fitting.fit(config, sources, opts or fitting.Options(), extractor)
    path = model_lib.save(
        model,
        model_dir,
        overwrite=overwrite,
        extra_dirs={"audit": lambda d: write_audit(model, d, truth_csv=truth_csv, top=top)},
        inputs=inputs,
    )
    thr = model.meta["threshold"]
    logging.info(
        "saved %s: %d training images, banks %s, threshold %s = %.4f; audit top-5: %s",
        path,
        len(audit.names),
        model.meta["banks"],
        thr["rule"],
        thr["value"],
        [audit.names[i] for i in audit.order[:5]],
    )
    model.path = path
    return model


def run_predict(model_dir: str, sources: str | Sequence[str], out_dir: str, **kwargs) -> list[dict]:
    return predicting.predict(model_lib.load(model_dir), sources, out_dir, **kwargs)


def run_audit(
    model_dir: str,
    out_dir: str,
    *,
    truth_csv: str | None = None,
    top: int = 16,
    overwrite: bool = False,
) -> dict:
    """The audit into OUT, staged and renamed whole (`outdir.staged`)."""
    model = model_lib.load(model_dir)
    with outdir.staged(
        out_dir,
        audit_lib.MARKER,
        "audit",
        overwrite=overwrite,
        inputs=(model_dir,),
        input_folders=False,  # MODEL/audit may be refreshed; MODEL itself never replaced
    ) as (stage, _):
        return write_audit(model, stage, truth_csv=truth_csv, top=top)


def make_demo(
    out: str,
    *,
    category: str = "pill",
    noise_ratio: float = 0.2,
    spec: demo.DemoSpec | None = None,
    seed: int = 0,
) -> dict:
    """OUT/train/ (normal + injected defective, shuffled, neutral names), OUT/truth.csv,
    OUT/test/ (the remaining test images) and OUT/test_truth.csv, from the demo generator and
    noise.inject (no-overlap mode, so no test image is also a training image)."""
    spec = spec or demo.DemoSpec(num_test_good=6, num_per_defect=4)
    src = demo.write(os.path.join(out, "source"), dataclasses.replace(spec, categories=(category,)))
    splits = mvtec.read_category(src, category)
    noisy = noise.inject(splits, noise.NoiseSpec(noise_ratio, False), np.random.default_rng(seed))
    order = np.random.default_rng(seed + 1).permutation(len(noisy.train))
    truth = []
    for j, i in enumerate(order):
        rec = noisy.train[i]
        name = f"img_{j:04d}.png"
        img = images.decode(rec.path)
        render.save_png(os.path.join(out, "train", name), img)
        truth.append({"image": name, "defective": int(rec.injected), "source": rec.path})
    io_utils.write_csv(os.path.join(out, "truth.csv"), truth)
    test_truth = []
    for j, rec in enumerate(noisy.test):
        name = f"test_{j:04d}.png"
        img = images.decode(rec.path)
        render.save_png(os.path.join(out, "test", name), img)
        test_truth.append({"image": name, "defective": rec.label, "defect": rec.defect})
    io_utils.write_csv(os.path.join(out, "test_truth.csv"), test_truth)
    n_inj = sum(t["defective"] for t in truth)
    return {"train": len(truth), "injected": n_inj, "test": len(test_truth), "root": out}
