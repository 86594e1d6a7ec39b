"""The sweep's work steps, each a function of its inputs: feature extraction (counted), discriminator
scores through the cache, and bank fitting / scoring either vmapped (batched.py) or one bank at a
time through the library path (memory_bank.fit_many, scoring.predict) that pipeline.run uses.
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


def discriminator_scores(
    store: cache.Cache,
    key: jax.Array,
    feats_NxPxD: jax.Array,
    feats_key: str,
    cfg: ml_collections.ConfigDict,
    names: Sequence[str],
) -> dict[str, jax.Array]:
    """Raw scores {name: [N, P]}: cached ones loaded, the missing ones computed in one call (they
    share the per-position distances) with the run's own projection, then cached."""
    n, p, d = feats_NxPxD.shape
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
    out = {}
    for name in names:
        hit = store.load("scores", keys[name])
        if hit is not None:
            out[name] = jax.numpy.asarray(hit["scores"])
    missing = tuple(name for name in names if name not in out)
    if missing:
        pool = feats_NxPxD.reshape(n * p, d)
        if sp.projection_dim:
            stream = memory_bank.stream(key, "projection")
            pool = memory_bank.project(
                pool, memory_bank.random_projection(stream, d, sp.projection_dim)
            )
        new = memory_bank.discriminator_scores(
            pool.reshape(n, p, -1), missing, sp.lof_k, sp.gaussian_eps
        )
        for name, s in new.items():
            store.save("scores", keys[name], {"scores": np.asarray(s)})
            store.stats.add(f"discriminator_runs_{name}")
        out.update(new)
    return out


def fit(
    key: jax.Array,
    feats_NxPxD: jax.Array,
    cfg: ml_collections.ConfigDict,
    specs: Sequence[methods.MethodSpec],
    scores_NxP: dict[str, jax.Array],
    vmap: bool,
) -> dict[str, Banks]:
    if vmap:
        return batched.fit(key, feats_NxPxD, cfg, specs, scores_NxP)
    return memory_bank.fit_many(key, feats_NxPxD, cfg, specs, scores_NxP=scores_NxP).banks


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
