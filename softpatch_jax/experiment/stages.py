"""The driver's work steps, each a function of its inputs: feature extraction (with its progress
bar), the training set prepared once through the library's fitting path (`memory_bank.prepare`,
discriminator scores through the cache), every bank from one coreset pass
(`memory_bank.fit_banks`), and scoring through the one composition (`scoring.score_many`), vmapped
over banks of equal size (a sweep's default) or one bank pair at a time (as a plain run does).
`Timer` times them for the row.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from softpatch_jax import data, discriminators, features, memory_bank, methods, progress, scoring
from softpatch_jax.experiment import cache, options
from softpatch_jax.features import STORE_DTYPES
from softpatch_jax.memory_bank import Banks


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


def store_dtype(config: ml_collections.ConfigDict):
    """The dtype features are held in on the device (`embedding.store_dtype`), checked."""
    name = config.embedding.store_dtype
    if name not in STORE_DTYPES:
        raise ValueError(f"embedding.store_dtype {name!r}; valid: {sorted(STORE_DTYPES)}")
    return STORE_DTYPES[name]


def extractor(cfg: ml_collections.ConfigDict) -> tuple[features.Extractor, str]:
    """The backbone's extractor and the identity of its weights (`cache.weights_id`, part of every
    features key); a random-init backbone is warned about loudly."""
    ex = features.build(options.extractor_options(cfg))
    if ex.random_init:
        logging.warning("=" * 78)
        logging.warning(features.RANDOM_INIT_WARNING)
        logging.warning("=" * 78)
    return ex, cache.weights_id(ex.info, ex.variables)


def decode(records, config, category: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, crop, crop, 3] and masks bool [N, crop, crop] of `records`, through
    data.loader (so a prepared (TFDS) store is used when the config asks)."""
    return data.loader(options.dataset_options(config.dataset), category)(records)


def features_of(ex: features.Extractor, images, what: str, count=None) -> np.ndarray:
    """Extracted features [N, P, D] (host, as extracted) of decoded images, with a progress bar;
    `count(name, n)` tallies the work (the driver's counters)."""
    logging.info("  features: %d %s images", images.shape[0], what)
    with progress.bar(f"features ({what})", images.shape[0], "img") as update:
        feats = np.asarray(features.extract(ex, images, update))
    n, h, w, d = feats.shape
    if count is not None:
        count(f"extractions_{what}", 1)
        count("images_extracted", n)
    return feats.reshape(n, h * w, d)


def extract(ex: features.Extractor, records, config, category: str, what: str, count=None):
    """Decoded and extracted features [N, P, D] (host, as extracted) and masks of `records`
    (`decode`, then `features_of`)."""
    images, masks = decode(records, config, category)
    return features_of(ex, images, what, count), masks


def prepare(
    store: cache.Cache,
    key: jax.Array,
    feats_NxPxD,
    feats_key: str,
    cfg: ml_collections.ConfigDict,
    names: Sequence[str],
) -> memory_bank.Prepared:
    """The training set prepared once for all its banks (`memory_bank.prepare`): the raw scores of
        `names` loaded from the cache where there, the missing ones computed in one call (they share the
        per-position distances) with the run's own projection, then cached. The cache keys record the
    settings the fitting path resolves (`memory_bank.score_settings`)."""
    n, _, d = feats_NxPxD.shape
    fit_opts = options.fit_options(cfg)
    resolved = memory_bank.score_settings(fit_opts, n, d, names)
    keys = {}
    for name in names:
        param = discriminators.cache_param(name, *resolved[name])
        keys[name] = cache.scores_key(feats_key, name, param, fit_opts.projection_dim, cfg.seed)
    cached = {}
    for name in names:
        hit = store.load("scores", keys[name])
        if hit is not None:
            cached[name] = jax.numpy.asarray(hit["scores"])
            if "low" in hit:  # a float64 score's low part (`discriminators.low_key`)
                cached[discriminators.low_key(name)] = jax.numpy.asarray(hit["low"])
    prepared = memory_bank.prepare(key, feats_NxPxD, fit_opts, names, scores_NxP=cached)
    for name in prepared.computed:
        arrays = {"scores": np.asarray(prepared.scores_NxP[name])}
        low = prepared.scores_NxP.get(discriminators.low_key(name))
        if low is not None:
            arrays["low"] = np.asarray(low)
        store.save("scores", keys[name], arrays)
        store.stats.add(f"discriminator_runs_{name}")
    return prepared


def fit(
    prepared: memory_bank.Prepared,
    feats_NxPxD,
    cfg: ml_collections.ConfigDict,
    specs: Sequence[methods.MethodSpec],
) -> dict[str, Banks]:
    """The banks of every spec (by spec name): every distinct keep mask in one coreset pass."""
    return memory_bank.fit_banks(prepared, feats_NxPxD, options.fit_options(cfg), specs).banks


def predict(
    banks: dict[str, Banks],
    feats_TxPxD: jax.Array,
    ex: features.Extractor,
    options: scoring.Options,
    vmap: bool,
    parallel: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{name: (image scores [T], anomaly maps [T, H, W])} through the one scoring composition
    (`scoring.score_many`): one bank pair at a time (`scoring.score_banks`, what deploy uses too),
    or vmapped over banks of equal size (the exact search, which every `search` equals).
    `parallel` shards each bank's search over all devices (one bank at a time only). `progress` is
    called with images scored, `scoring_work(banks, T, vmap)` in all."""
    scored = scoring.score_many(
        banks,
        feats_TxPxD,
        ex.grid,
        ex.image_size,
        options,
        vmap=vmap,
        parallel=parallel,
        progress=progress,
    )
    return {name: (jnp.max(cls, axis=1), maps) for name, (cls, maps) in scored.items()}


def scoring_work(banks: dict[str, Banks], num_images: int, vmap: bool) -> int:
    """What `predict` reports to its progress callback in all: T images, once per method unless
    every bank is scored in one vmapped call."""
    return num_images * (1 if vmap else len(banks))
