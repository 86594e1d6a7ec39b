"""The driver: for each category and noise setting, decode -> features -> fit every method -> score
-> evaluate, with timings, progress and results written to the workdir. The only module that sees
every stage (DESIGN.md); `main.py` and notebooks call `run(config, workdir)`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from softpatch_jax import (
    data,
    features,
    memory_bank,
    methods,
    metrics,
    parallel,
    progress,
    report,
    scoring,
)
from softpatch_jax.data import noise
from softpatch_jax.features import STORE_DTYPES
from softpatch_jax.io_utils import atomic_open, write_csv, write_json
from softpatch_jax.results import HEADLINE


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


def check_noise(config: ml_collections.ConfigDict, ratios) -> None:
    """Raises unless every noise ratio is 0 where the dataset's split fixes the training noise
    (Real-IAD's FUIAD lists): injecting test anomalies on top would change the benchmark."""
    if data.fixed_noise(config.dataset) and any(r > 0 for r in ratios):
        raise ValueError(
            f"dataset.split={config.dataset.split!r} fixes the training set's noise (its JSON "
            f"lists the noisy training set), so the project's own noise injection is off: set "
            f"--config.noise.ratios=0.0 (got {config.noise.ratios!r})"
        )


def _check_workdir(workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    if not os.access(workdir, os.W_OK):
        raise PermissionError(f"workdir {workdir!r} is not writable")


def _stable_id(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def _load(load, records, timer, stage="decode"):
    with timer(stage):
        return load(records)


def _extract(ex, images, timer, what: str, store_dtype: str = "float32"):
    logging.info("  features: %d %s images", images.shape[0], what)
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"embedding.store_dtype {store_dtype!r}; valid: {sorted(STORE_DTYPES)}")
    with timer("features"), progress.bar(f"features ({what})", images.shape[0], "img") as update:
        out = features.extract(ex, images, update).astype(STORE_DTYPES[store_dtype])
        out = jax.block_until_ready(out)
    n, h, w, d = out.shape
    return out.reshape(n, h * w, d)


def category_key(seed: int, category: str) -> jax.Array:
    """The root key of one category's run: projection and coreset streams derive from it."""
    return jax.random.fold_in(jax.random.key(seed), _stable_id(category))


def noise_spec(config: ml_collections.ConfigDict, ratio: float) -> noise.NoiseSpec:
    n = config.noise
    return noise.NoiseSpec(ratio, bool(n.overlap), n.rotation_deg, n.translate)


def noisy_splits(config, splits, ratio: float):
    """(noisy splits, injected records, spec): the seeded noisy training set of one ratio.

    The generator is seeded from (seed, category, ratio, mode) only, so a sweep and a run with the
    same values inject the same images.
    """
    spec = noise_spec(config, ratio)
    rng = np.random.default_rng(
        [config.seed, _stable_id(splits.category), round(ratio * 1e6), int(spec.overlap)]
    )
    noisy = noise.inject(splits, spec, rng)
    return noisy, noisy.train[len(splits.train) :], spec


def parse_map_images(spec: str) -> list[tuple[str, str]]:
    """`eval.map_images` ("pill/crack/003.png,wood/good/000.png") -> [(category, path suffix)]."""
    out = []
    for item in (s.strip() for s in str(spec or "").split(",")):
        if not item:
            continue
        category, _, rest = item.replace(os.sep, "/").partition("/")
        if not category or not rest:
            raise ValueError(
                f"eval.map_images entry {item!r}: expected CATEGORY/PATH, e.g. pill/crack/003.png "
                "(the image's path under its category's test images)"
            )
        out.append((category, rest))
    return out


def chosen_indices(
    records, category: str, chosen: Sequence[tuple[str, str]], required: bool = True
) -> list[int]:
    """Indices into `records` of the images of `category` named in `chosen` ((category, path
    suffix) pairs from `parse_map_images`, matched against the end of each record's path).

    Raises ValueError naming a chosen image of this category that no record matches, unless not
    `required` (a no-overlap noisy set has moved some test anomalies into training).
    """
    paths = [str(r.path).replace(os.sep, "/") for r in records]
    picks = []
    for cat, suffix in chosen:
        if cat != category:
            continue
        hits = [i for i, p in enumerate(paths) if p.endswith("/" + suffix.lstrip("/"))]
        if not hits and required:
            example = paths[0].rsplit("/", 2)[-2:] if paths else []
            raise ValueError(
                f"eval.map_images entry {cat + '/' + suffix!r} matches none of the {len(paths)} test "
                f"images of category {cat!r} (e.g. {cat}/{'/'.join(example)})"
            )
        picks += hits
    return picks


def map_indices(
    labels: np.ndarray,
    count: int,
    records=(),
    category: str = "",
    chosen: Sequence[tuple[str, str]] = (),
    required: bool = True,
) -> np.ndarray:
    """Which test images get their anomaly maps saved: `count` of them, one normal image and the
    rest anomalies spread evenly over the (defect-sorted) anomalous ones, so several defect types
    show; plus the images `chosen_indices` finds for `category` in `records`.
    """
    labels = np.asarray(labels)
    anomalous = np.flatnonzero(labels == 1)
    normal = np.flatnonzero(labels == 0)
    picks = list(normal[:1]) if count > 1 else []
    k = min(count - len(picks), len(anomalous))
    if k > 0:
        picks += list(anomalous[np.linspace(0, len(anomalous) - 1, k).round().astype(int)])
    picks += chosen_indices(records, category, chosen, required)
    return np.unique(np.asarray(picks, dtype=int))


def save_maps(path: str, records, images, masks, maps, meta: dict) -> None:
    """Anomaly maps of a few test images, for figures: npz written to a temp file then renamed."""
    with atomic_open(path, "wb") as f:
        np.savez(
            f,
            images=np.asarray(images, np.uint8),
            masks=np.asarray(masks, bool),
            maps=np.asarray(maps, np.float32),
            paths=np.asarray([r.path for r in records]),
            labels=np.asarray([r.label for r in records]),
            meta=np.asarray(json.dumps(meta, default=str)),
        )


def eval_metrics(config) -> tuple[str, ...]:
    """The metrics named by `eval.metrics` (a comma list, or "all"), and always image and pixel
    AUROC: the summary table and the report's curves are drawn from those two."""
    named = metrics.check_names(config.eval.get("metrics", "all"))
    return metrics.check_names([*HEADLINE, *named])


def evaluate_banks(banks, feats_TxPxD, labels, masks, ex, config, timer, paths=None):
    """Scores test features with one method's banks -> (metrics dict, image scores, maps); the
    test images' `paths` give the sample metrics where their names carry views."""
    with timer("scoring"):
        image_scores, maps = scoring.predict(
            banks,
            feats_TxPxD,
            ex.grid,
            ex.image_size,
            config.scoring.blur_sigma,
            config.scoring.chunk_size,
            distance=config.scoring.distance,
            parallel=parallel.enabled(config, "scoring"),
            search=config.scoring.get("search", "exact"),
        )
        jax.block_until_ready(maps)
    with timer("metrics"):
        result = metrics.evaluate(image_scores, labels, maps, masks, eval_metrics(config), paths)
    return result, image_scores, maps


def result_row(
    config,
    category: str,
    method: str,
    result: dict,
    banks,
    spec: noise.NoiseSpec,
    *,
    num_train: int,
    num_test: int,
    times: dict,
    injected,
    weights: str | None,
    source_anomalous: int = 0,
) -> dict:
    """One results row (the fields of results.json/csv, and the core of a sweep's JSONL rows).

    `train_anomalous` counts the training images known to be anomalous: those the dataset's own
    training list holds (`source_anomalous`: Real-IAD's FUIAD splits) plus the injected ones; its
    fraction of `num_train` is the true noise ratio of what the banks were fitted on.
    """
    anomalous = source_anomalous + len(injected)
    return {
        "category": category,
        "method": method,
        **{k: result[k] for k in metrics.ALL if k in result},
        "noise_ratio": spec.ratio,
        "overlap": spec.overlap,
        "seed": config.seed,
        "weights": weights,
        "arch": config.backbone.arch,
        "num_train": num_train,
        "num_injected": len(injected),
        "num_test": num_test,
        "train_anomalous": anomalous,
        "train_anomalous_fraction": round(anomalous / max(num_train, 1), 6),
        **{f"dataset.{k}": v for k, v in data.options(config.dataset).items()},
        "bank_cls": int(banks.cls.feats_MxD.shape[0]),
        "bank_seg": int(banks.seg.feats_MxD.shape[0]),
        **{f"time_{k}": round(v, 4) for k, v in times.items()},
        "injected": [r.path for r in injected],
    }


def run_category(config, ex, specs, category: str, ratios, workdir: str = "") -> list[dict]:
    """All noise settings and methods of one category -> result rows."""
    splits = data.read(config.dataset, category)
    chosen = parse_map_images(config.eval.get("map_images", ""))
    chosen_indices(splits.test, category, chosen)  # a misnamed image fails before any work
    base = Timer()
    with base("prepare"):
        load = data.loader(config.dataset, category)
    train_imgs, _ = _load(load, splits.train, base)
    test_imgs, test_masks = _load(load, splits.test, base)
    store = config.embedding.get("store_dtype", "float32")
    train_feats = _extract(ex, train_imgs, base, "train", store)
    test_feats = _extract(ex, test_imgs, base, "test", store)
    test_pos = {r.path: i for i, r in enumerate(splits.test)}
    root = category_key(config.seed, category)
    num_maps = int(config.eval.get("save_maps", 0))
    rows = []
    for ratio in ratios:
        timer = Timer()
        noisy, injected, spec = noisy_splits(config, splits, ratio)
        feats = train_feats
        if injected:
            inj_imgs, _ = _load(load, injected, timer)
            feats = jnp.concatenate([train_feats, _extract(ex, inj_imgs, timer, "injected", store)])
        keep_test = np.array([test_pos[r.path] for r in noisy.test])
        labels = np.array([r.label for r in noisy.test])
        anomalous = len(noisy.train_anomalous) + len(injected)
        logging.info(
            "%s noise %.0f%% (%s): %d train (%d injected, %d anomalous: %.1f%%), %d test",
            category,
            100 * ratio,
            "overlap" if spec.overlap else "no-overlap",
            feats.shape[0],
            len(injected),
            anomalous,
            100 * anomalous / feats.shape[0],
            len(keep_test),
        )
        fitted = memory_bank.fit_many(root, feats, config, specs, timer=timer)
        t_feats = test_feats[keep_test]
        shown = map_indices(labels, num_maps, noisy.test, category, chosen, required=False)
        bar = progress.bar(f"{category} noise {ratio:.2f}: scoring", len(specs), "method")
        with bar as update:
            for s in specs:
                mtimer = Timer()
                banks = fitted.banks[s.name]
                result, _, maps = evaluate_banks(
                    banks,
                    t_feats,
                    labels,
                    test_masks[keep_test],
                    ex,
                    config,
                    mtimer,
                    [r.path for r in noisy.test],
                )
                times = {**base.seconds, **timer.seconds, **mtimer.seconds}
                rows.append(
                    result_row(
                        config,
                        category,
                        s.name,
                        result,
                        banks,
                        spec,
                        num_train=int(feats.shape[0]),
                        num_test=len(keep_test),
                        times=times,
                        injected=injected,
                        weights=ex.info.get("weights"),
                        source_anomalous=len(noisy.train_anomalous),
                    )
                )
                if len(shown):
                    name = f"{category}_{s.name}_r{ratio:g}_s{config.seed}.npz"
                    save_maps(
                        os.path.join(workdir, "maps", name),
                        [noisy.test[i] for i in shown],
                        test_imgs[keep_test[shown]],
                        test_masks[keep_test[shown]],
                        np.asarray(maps)[shown],
                        {k: v for k, v in rows[-1].items() if k != "injected"},
                    )
                logging.info("  %-16s %s", s.name, metrics.describe(result))
                if update is not None:
                    update(1)
    return rows


def write_results(workdir: str, rows: list[dict], meta: dict) -> None:
    write_json(os.path.join(workdir, "results.json"), {**meta, "rows": rows})
    write_csv(
        os.path.join(workdir, "results.csv"),
        [{k: v for k, v in r.items() if k != "injected"} for r in rows],
    )


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Runs the configured experiment; writes config.json, results.json, results.csv and summary.md
    (and maps/*.npz of a few test images per method when config.eval.save_maps > 0)."""
    _check_workdir(workdir)
    eval_metrics(config)  # a misspelt metric fails here, before any work
    specs = methods.from_config(config)
    ratios = parse_ratios(config.noise.ratios)
    check_noise(config, ratios)
    write_json(os.path.join(workdir, "config.json"), config.to_dict())
    categories = data.categories(config.dataset)
    unknown = sorted(
        {c for c, _ in parse_map_images(config.eval.get("map_images", ""))} - set(categories)
    )
    if unknown:
        raise ValueError(
            f"eval.map_images names categories {unknown} not in this run: {categories}"
        )
    ex = features.build(config)
    if ex.random_init:
        logging.warning("=" * 78)
        logging.warning(features.RANDOM_INIT_WARNING)
        logging.warning("=" * 78)
    meta = {
        "weights": ex.info,
        "devices": [str(d) for d in jax.devices()],
        "jax_version": jax.__version__,
    }
    rows: list[dict] = []
    for i, category in enumerate(categories):
        logging.info("[%d/%d] category %s", i + 1, len(categories), category)
        rows += run_category(config, ex, specs, category, ratios, workdir)
        write_results(workdir, rows, meta)  # after each category: partial results survive
    table = report.summary_table(rows)
    with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table, flush=True)
    return rows
