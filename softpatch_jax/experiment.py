"""What one experiment cell needs around the stages: its seeded noisy training set and root key,
feature extraction with its progress bar, the metrics it reports, which anomaly maps it saves, and
its results row. The driver (sweep/engine.py) is the only caller; `pipeline.run` and sweeps both
go through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import zlib
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from softpatch_jax import data, features, metrics, progress
from softpatch_jax.data import noise
from softpatch_jax.features import STORE_DTYPES
from softpatch_jax.io_utils import atomic_open
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


def check_noise(config: ml_collections.ConfigDict, ratios) -> None:
    """Raises unless every noise ratio is 0 where the dataset's split fixes the training noise
    (Real-IAD's FUIAD lists): injecting test anomalies on top would change the benchmark."""
    if data.fixed_noise(config.dataset) and any(r > 0 for r in ratios):
        raise ValueError(
            f"dataset.split={config.dataset.split!r} fixes the training set's noise (its JSON "
            f"lists the noisy training set), so the project's own noise injection is off: set "
            f"--config.noise.ratios=0.0 (got {config.noise.ratios!r})"
        )


def _stable_id(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


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


def store_dtype(config: ml_collections.ConfigDict):
    """The dtype features are held in on the device (`embedding.store_dtype`), checked."""
    name = config.embedding.get("store_dtype", "float32")
    if name not in STORE_DTYPES:
        raise ValueError(f"embedding.store_dtype {name!r}; valid: {sorted(STORE_DTYPES)}")
    return STORE_DTYPES[name]


def extract(ex: features.Extractor, records, config, category: str, what: str, count=None):
    """Decoded and extracted features [N, P, D] (host, as extracted) and masks of `records`, with
    a progress bar. Decoding goes through data.loader, so a prepared (TFDS) store is used when the
    config asks; `count(name, n)` tallies the work (the driver's counters)."""
    images, masks = data.loader(config.dataset, category)(records)
    logging.info("  features: %d %s images", images.shape[0], what)
    with progress.bar(f"features ({what})", images.shape[0], "img") as update:
        feats = np.asarray(features.extract(ex, images, update))
    n, h, w, d = feats.shape
    if count is not None:
        count(f"extractions_{what}", 1)
        count("images_extracted", n)
    return feats.reshape(n, h * w, d), masks
