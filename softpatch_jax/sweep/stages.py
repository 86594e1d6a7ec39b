"""The driver's work steps, each a function of its inputs: discriminator scores through the cache,
and bank fitting / scoring either vmapped (batched.py, a sweep's default) or one bank at a time
through the library path (memory_bank.fit_many, scoring.predict), as a plain run does.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from softpatch_jax import discriminators, features, memory_bank, methods, scoring
from softpatch_jax.memory_bank import Banks
from softpatch_jax.sweep import batched, cache


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
    parallel: bool = False,
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{name: (image scores, anomaly maps)} with the `config.scoring` section `sc`; `parallel`
    shards each bank's search over all devices (one bank at a time only)."""
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
            parallel=parallel,
            search=sc.get("search", "exact"),
        )
        for name, b in banks.items()
    }
