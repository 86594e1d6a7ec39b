"""The driver's work steps, each a function of its inputs: the training set prepared once through
the library's fitting path (`memory_bank.prepare`, discriminator scores through the cache), every
bank from one coreset pass (`memory_bank.fit_banks`), and scoring either vmapped over banks of equal
size (batched.py, a sweep's default) or one bank at a time (scoring.predict, as a plain run does).
Feature extraction is `experiment.extract`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np

from softpatch_jax import discriminators, features, memory_bank, methods, scoring
from softpatch_jax.memory_bank import Banks
from softpatch_jax.sweep import batched, cache


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
    parallel: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{name: (image scores, anomaly maps)} with the `config.scoring` section `sc`; `parallel`
    shards each bank's search over all devices (one bank at a time only). `progress` is called with
    images scored, `scoring_work(banks, T, vmap)` in all."""
    if vmap:
        return batched.predict(
            banks,
            feats_TxPxD,
            ex.grid,
            ex.image_size,
            sc.blur_sigma,
            sc.chunk_size,
            sc.distance,
            progress,
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
            parallel=parallel,
            search=sc.get("search", "exact"),
            progress=progress,
        )
        for name, b in banks.items()
    }


def scoring_work(banks: dict[str, Banks], num_images: int, vmap: bool) -> int:
    """What `predict` reports to its progress callback in all: T images, once per method unless
    every bank is scored in one vmapped call."""
    return num_images * (1 if vmap else len(banks))
