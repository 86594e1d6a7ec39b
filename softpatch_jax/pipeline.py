"""The driver: for each category and noise setting, decode -> features -> fit every method -> score
-> evaluate, with timings, progress and results written to the workdir. The only module that sees
every stage (DESIGN.md); `main.py` and notebooks call `run(config, workdir)`.
"""

from __future__ import annotations

import contextlib
import os
import time
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from softpatch_jax import data, features, memory_bank, methods, metrics, parallel, report, scoring
from softpatch_jax.data import noise, preprocess
from softpatch_jax.io_utils import write_csv, write_json

METRICS = ("image_auroc", "pixel_auroc")


class Timer:
    """Accumulates wall-clock seconds per stage; callers block on device results inside the block."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


def parse_ratios(text) -> list[float]:
    try:
        ratios = [float(s) for s in str(text).split(",") if s.strip()]
    except ValueError as e:
        raise ValueError(
            f"config.noise.ratios must be comma-separated numbers, got {text!r}"
        ) from e
    if not ratios:
        raise ValueError("config.noise.ratios is empty")
    return ratios


def _check_workdir(workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    if not os.access(workdir, os.W_OK):
        raise PermissionError(f"workdir {workdir!r} is not writable")


def _stable_id(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def _load(records, cfg, timer, stage="decode"):
    with timer(stage):
        return preprocess.load_records(records, cfg.dataset.resize, cfg.dataset.crop)


# embedding.store_dtype: how patch features are kept between stages (they are read in float32).
STORE_DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def _extract(ex, images, timer, what: str, store_dtype: str = "float32"):
    logging.info("  features: %d %s images", images.shape[0], what)
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"embedding.store_dtype {store_dtype!r}; valid: {sorted(STORE_DTYPES)}")
    with timer("features"):
        out = jax.block_until_ready(features.extract(ex, images).astype(STORE_DTYPES[store_dtype]))
    n, h, w, d = out.shape
    return out.reshape(n, h * w, d)


def run_category(config, ex, specs, category: str, ratios) -> list[dict]:
    """All noise settings and methods of one category -> result rows."""
    splits = data.read(config.dataset, category)
    base = Timer()
    train_imgs, _ = _load(splits.train, config, base)
    test_imgs, test_masks = _load(splits.test, config, base)
    store = config.embedding.get("store_dtype", "float32")
    train_feats = _extract(ex, train_imgs, base, "train", store)
    test_feats = _extract(ex, test_imgs, base, "test", store)
    test_pos = {r.path: i for i, r in enumerate(splits.test)}
    root = jax.random.fold_in(jax.random.key(config.seed), _stable_id(category))
    rows = []
    for ratio in ratios:
        timer = Timer()
        spec = noise.NoiseSpec(
            ratio, bool(config.noise.overlap), config.noise.rotation_deg, config.noise.translate
        )
        rng = np.random.default_rng(
            [config.seed, _stable_id(category), round(ratio * 1e6), int(spec.overlap)]
        )
        noisy = noise.inject(splits, spec, rng)
        injected = noisy.train[len(splits.train) :]
        feats = train_feats
        if injected:
            inj_imgs, _ = _load(injected, config, timer)
            feats = jnp.concatenate([train_feats, _extract(ex, inj_imgs, timer, "injected", store)])
        keep_test = np.array([test_pos[r.path] for r in noisy.test])
        labels = np.array([r.label for r in noisy.test])
        logging.info(
            "%s noise %.0f%% (%s): %d train (%d injected), %d test",
            category,
            100 * ratio,
            "overlap" if spec.overlap else "no-overlap",
            feats.shape[0],
            len(injected),
            len(keep_test),
        )
        fitted = memory_bank.fit_many(root, feats, config, specs, timer=timer)
        t_feats = test_feats[keep_test]
        for s in specs:
            mtimer = Timer()
            banks = fitted.banks[s.name]
            with mtimer("scoring"):
                image_scores, maps = scoring.predict(
                    banks,
                    t_feats,
                    ex.grid,
                    ex.image_size,
                    config.scoring.blur_sigma,
                    config.scoring.chunk_size,
                    parallel=parallel.enabled(config),
                )
                jax.block_until_ready(maps)
            with mtimer("metrics"):
                result = metrics.evaluate(image_scores, labels, maps, test_masks[keep_test])
            times = {**base.seconds, **timer.seconds, **mtimer.seconds}
            rows.append(
                {
                    "category": category,
                    "method": s.name,
                    **{k: result[k] for k in METRICS},
                    "noise_ratio": ratio,
                    "overlap": spec.overlap,
                    "seed": config.seed,
                    "weights": ex.info.get("weights"),
                    "arch": config.backbone.arch,
                    "num_train": int(feats.shape[0]),
                    "num_injected": len(injected),
                    "num_test": len(keep_test),
                    "bank_cls": int(banks.cls.feats_MxD.shape[0]),
                    "bank_seg": int(banks.seg.feats_MxD.shape[0]),
                    **{f"time_{k}": round(v, 4) for k, v in times.items()},
                    "injected": [r.path for r in injected],
                }
            )
            logging.info(
                "  %-16s image AUROC %.3f  pixel AUROC %.3f",
                s.name,
                result["image_auroc"],
                result["pixel_auroc"],
            )
    return rows


def write_results(workdir: str, rows: list[dict], meta: dict) -> None:
    write_json(os.path.join(workdir, "results.json"), {**meta, "rows": rows})
    write_csv(
        os.path.join(workdir, "results.csv"),
        [{k: v for k, v in r.items() if k != "injected"} for r in rows],
    )


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Runs the configured experiment; writes config.json, results.json, results.csv and summary.md."""
    _check_workdir(workdir)
    specs = methods.from_config(config)
    ratios = parse_ratios(config.noise.ratios)
    write_json(os.path.join(workdir, "config.json"), config.to_dict())
    categories = data.categories(config.dataset)
    ex = features.build(config)
    if ex.random_init:
        logging.warning("=" * 78)
        logging.warning(report.RANDOM_INIT_WARNING)
        logging.warning("=" * 78)
    meta = {
        "weights": ex.info,
        "devices": [str(d) for d in jax.devices()],
        "jax_version": jax.__version__,
    }
    rows: list[dict] = []
    for i, category in enumerate(categories):
        logging.info("[%d/%d] category %s", i + 1, len(categories), category)
        rows += run_category(config, ex, specs, category, ratios)
        write_results(workdir, rows, meta)  # after each category: partial results survive
    table = report.summary_table(rows)
    with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table, flush=True)
    return rows
