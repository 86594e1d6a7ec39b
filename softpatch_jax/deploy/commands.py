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

from softpatch_jax import io_utils, outdir
from softpatch_jax.data import demo, images, mvtec, noise
from softpatch_jax.data import folder as folder_lib
from softpatch_jax.deploy import audit as audit_lib
from softpatch_jax.deploy import fitting, predicting, region, render
from softpatch_jax.deploy import model as model_lib
from softpatch_jax.experiment import config_errors

TRUE_LABELS = ("1", "1.0", "true", "yes", "y", "defective")
FALSE_LABELS = ("0", "0.0", "false", "no", "n", "good", "normal")


def parse_label(text: str, where: str) -> bool:
    """A truth label -> bool; ValueError naming `where` for anything not in TRUE/FALSE_LABELS."""
    t = str(text).strip().lower()
    if t in TRUE_LABELS:
        return True
    if t in FALSE_LABELS:
        return False
    raise ValueError(
        f"{where}: defective={text!r} not understood; use 1/0 (also accepted: "
        f"{'/'.join(TRUE_LABELS[1:])} and {'/'.join(FALSE_LABELS[1:])})"
    )


def read_truth(
    path: str, names: Sequence[str], root: str, known: Sequence[str] | None = None
) -> np.ndarray:
    """bool [N] from a CSV with columns image (path relative to the training folder, or absolute)
    and defective (TRUE_LABELS / FALSE_LABELS, any case). Every one of `names` must be listed; a
    row naming an image that is not among `known` (default `names`: e.g. the training folder's
    images, skipped bad ones included) is an error, as is a label that is not understood."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"truth file {path!r} does not exist (--truth=CSV)")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise ValueError(f"truth file {path!r} is not a UTF-8 text CSV ({e.reason})") from e
    if not rows or not {"image", "defective"} <= set(rows[0]):
        raise ValueError(f"truth file {path!r} needs the columns 'image' and 'defective'")
    truth = {}
    for line, r in enumerate(rows, start=2):
        name = folder_lib.unescape(io_utils.csv_unguard(r["image"] or ""))
        if os.path.isabs(name):
            name = os.path.relpath(name, root)
        name = os.path.normpath(folder_lib.escape(name))  # names as the model and audit carry them
        truth[name] = parse_label(r["defective"] or "", f"truth file {path!r} line {line}")
    known_set = {os.path.normpath(n) for n in (names if known is None else known)}
    unknown = [n for n in truth if n not in known_set]
    if unknown:
        raise ValueError(
            f"truth file {path!r} lists {len(unknown)} image(s) that are not in the training "
            f"folder {root!r}: {unknown[:5]}"
        )
    missing = [n for n in names if os.path.normpath(n) not in truth]
    if missing:
        raise ValueError(
            f"truth file {path!r} does not list {len(missing)} image(s): {missing[:5]}"
        )
    return np.array([truth[os.path.normpath(n)] for n in names])


def check_top(top: int) -> None:
    if top < 0:
        raise ValueError(f"--top={top}: the number of suspects on the contact sheet must be >= 0")


def write_audit(
    model: model_lib.Model, folder: str, *, truth_csv: str | None = None, top: int = 16
) -> dict:
    """The audit report of a model's training set into `folder` (see deploy/audit.py)."""
    audit = fitting.audit_of(model)
    cfg = model.config
    check_top(top)
    root = folder_lib.unescape(model.meta["training"]["root"])
    skipped = [b["path"] for b in model.meta["training"].get("skipped_bad", [])]
    known = [
        *audit.names,
        *(folder_lib.escape(os.path.relpath(folder_lib.unescape(p), root)) for p in skipped),
    ]
    truth = read_truth(truth_csv, audit.names, root, known) if truth_csv else None
    reg = model.meta["region"]
    grid = tuple(model.meta["embedding"]["grid"])
    crop = cfg.dataset.crop

    def load_image(i: int):
        try:
            path = os.path.join(root, folder_lib.unescape(audit.names[i]))
            s16 = model.meta.get("decoding", {}).get("sixteen_bit_max", images.FULL_16_BIT)
            v = region.load(path, cfg.dataset.resize, crop, reg["mode"], True, s16)
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
    # Every input and value is checked before the long part (save checks the target again, under
    # its lock): the config, the contact sheet size, the target and the truth file.
    config_errors.validate(config)
    check_top(top)
    inputs = (sources,) if isinstance(sources, str) else tuple(sources)
    outdir.check_target(model_dir, model_lib.MANIFEST, "model", overwrite=overwrite, inputs=inputs)
    io_utils.check_writable(os.path.dirname(os.path.abspath(model_dir)))
    if truth_csv:
        listing = folder_lib.list_images(sources)
        names = [folder_lib.escape(listing.relative(r.path)) for r in listing.records]
        read_truth(truth_csv, names, listing.root)
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
    check_top(top)
    # MODEL/audit may be refreshed (it has its own record); anything else in MODEL never changes.
    outdir.check_outside(out_dir, model_dir, "model", allowed=(os.path.join(model_dir, "audit"),))
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
    overwrite: bool = False,
) -> dict:
    """OUT/train/ (normal + injected defective, shuffled, neutral names), OUT/truth.csv,
    OUT/test/ (the remaining test images) and OUT/test_truth.csv, from the demo generator and
    noise.inject (no-overlap mode, so no test image is also a training image). OUT is written
    whole (`outdir.staged`); overwrite replaces only an earlier demo of this tool."""
    spec = spec or demo.DemoSpec(num_test_good=6, num_per_defect=4)
    with outdir.staged(out, "truth.csv", "demo", overwrite=overwrite) as (stage, _):
        spec = dataclasses.replace(spec, categories=(category,))
        src = demo.write(os.path.join(stage, "source"), spec)
        splits = mvtec.read_category(src, category)
        rng = np.random.default_rng(seed)
        noisy = noise.inject(splits, noise.NoiseSpec(noise_ratio, False), rng)
        order = np.random.default_rng(seed + 1).permutation(len(noisy.train))
        truth = []
        for j, i in enumerate(order):
            rec = noisy.train[i]
            name = f"img_{j:04d}.png"
            render.save_png(os.path.join(stage, "train", name), images.decode(rec.path))
            source = os.path.join(out, os.path.relpath(rec.path, stage))
            truth.append({"image": name, "defective": int(rec.injected), "source": source})
        io_utils.write_csv(os.path.join(stage, "truth.csv"), truth)
        test_truth = []
        for j, rec in enumerate(noisy.test):
            name = f"test_{j:04d}.png"
            render.save_png(os.path.join(stage, "test", name), images.decode(rec.path))
            test_truth.append({"image": name, "defective": rec.label, "defect": rec.defect})
        io_utils.write_csv(os.path.join(stage, "test_truth.csv"), test_truth)
    n_inj = sum(t["defective"] for t in truth)
    return {"train": len(truth), "injected": n_inj, "test": len(test_truth), "root": out}
