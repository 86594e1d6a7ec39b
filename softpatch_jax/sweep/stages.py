"""The sweep's work steps, each a function of its inputs: feature extraction (counted), the training
set prepared once through the library's fitting path (`memory_bank.prepare`, discriminator scores
through the cache), every bank from one coreset pass (`memory_bank.fit_banks`), and scoring either
vmapped over banks of equal size (batched.py) or one bank at a time (scoring.predict).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from softpatch_jax import data, discriminators, features, memory_bank, methods, scoring
from softpatch_jax.memory_bank import Banks
from softpatch_jax.sweep import batched, cache


def extract(stats: cache.Stats, ex: features.Extractor, records, cfg, what: str, category: str):
    """Decoded and extracted features [N, P, D] (host) and masks of `records`; counted in `stats`.
    Decoding goes through data.loader, so a prepared (TFDS) store is used when the config asks."""
    images, masks = data.loader(cfg.dataset, category)(records)
    feats = features.extract(ex, images)
    n, h, w, d = feats.shape
    stats.add(f"extractions_{what}")
    stats.add("images_extracted", n)
    logging.info("feature extraction (%s): %d images", what, n)
    return np.asarray(feats).reshape(n, h * w, d), masks


def clean_features(stats, ex, cfg, splits) -> dict[str, np.ndarray]:
    """A category's cache entry shared by all its noisy sets: clean training and test features,
    and the test masks (so a cache hit decodes nothing)."""
    train, _ = extract(stats, ex, splits.train, cfg, "clean", splits.category)
    test, masks = extract(stats, ex, splits.test, cfg, "test", splits.category)
    return {"train": train, "test": test, "test_masks": masks}


def injected_features(stats, ex, cfg, records, category: str) -> dict[str, np.ndarray]:
    return {"train": extract(stats, ex, records, cfg, "injected", category)[0]}


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
    per-position distances) with the run's own projection, then cached."""
    n = feats_NxPxD.shape[0]
    sp = cfg.softpatch
    params = {
        "nearest": None,
        "gaussian": sp.gaussian_eps,
        "lof": discriminators.effective_k(sp.lof_k, n),
    }
    keys = {
        name: cache.scores_key(feats_key, name, params[name], sp.projection_dim, cfg.seed)
        for name in names
    }
    cached = {}
    for name in names:
        hit = store.load("scores", keys[name])
        if hit is not None:
            cached[name] = jax.numpy.asarray(hit["scores"])
    prepared = memory_bank.prepare(key, feats_NxPxD, cfg, names, scores_NxP=cached)
    for name in prepared.computed:
        store.save("scores", keys[name], {"scores": np.asarray(prepared.scores_NxP[name])})
        store.stats.add(f"discriminator_runs_{name}")
    return prepared


def fit(
    prepared: memory_bank.Prepared,
    feats_NxPxD,
    cfg: ml_collections.ConfigDict,
    specs: Sequence[methods.MethodSpec],
) -> dict[str, Banks]:
    """The banks of every spec (by spec name): every distinct keep mask in one coreset pass."""
    return memory_bank.fit_banks(prepared, feats_NxPxD, cfg, specs).banks


def predict(
    banks: dict[str, Banks],
    feats_TxPxD: jax.Array,
    ex: features.Extractor,
    sc: ml_collections.ConfigDict,
    vmap: bool,
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{name: (image scores, anomaly maps)} with the `config.scoring` section `sc`."""
    if vmap:
        return batched.predict(
            banks, feats_TxPxD, ex.grid, ex.image_size, sc.blur_sigma, sc.chunk_size, sc.distance
        )
    return {
        name: scoring.predict(
            b,
            feats_TxPxD,
            ex.grid,
            ex.image_size,
            sc.blur_sigma,
            sc.chunk_size,
            distance=sc.distance,
        )
        for name, b in banks.items()
    }
