"""Many memory banks from one noisy training set at once: the sweep's fit and vmapped scoring.

A sweep asks for many banks that differ only in array values: tau thresholds, discriminator subsets,
patch- or image-level removal. They share the features, the projection, the discriminator scores and
the coreset start points; only the keep mask differs. Every distinct mask's coreset comes from one
run of the greedy loop (`coreset.select_many` via `memory_bank.select_coresets`: each step reads the
pool once per block of masks, picks one patch per mask; masks with smaller coresets keep a prefix),
the indices identical to one loop per mask. Scoring is vmapped over banks of equal size."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from softpatch_jax import coreset, memory_bank, methods, scoring
from softpatch_jax.memory_bank import Banks, MemoryBank


def fit(
    key: jax.Array,
    feats_NxPxD: jax.Array,
    config: ml_collections.ConfigDict,
    specs: Sequence[methods.MethodSpec],
    scores_NxP: dict[str, jax.Array],
) -> dict[str, Banks]:
    """The banks of every spec (by spec name), equal to `memory_bank.fit_many`'s for the same key.

    Args:
      key: the category's root key (projection and coreset starts come from its streams).
      feats_NxPxD: the noisy training set's features.
      config: run config (softpatch.projection_dim, coreset.ratio, coreset.num_starts).
      specs: methods to fit; names must be distinct.
      scores_NxP: raw scores of every discriminator the specs need.
    """
    n, p, d = feats_NxPxD.shape
    flat = feats_NxPxD.reshape(n * p, d)
    r = config.softpatch.projection_dim
    pool = flat
    if r:
        proj = memory_bank.random_projection(memory_bank.stream(key, "projection"), d, r)
        pool = memory_bank.project(flat, proj)
    starts = coreset.draw_starts(
        memory_bank.stream(key, "coreset"), n * p, config.coreset.num_starts
    )
    keeps: dict[tuple, jax.Array] = {}
    for spec in specs:
        for bank in (spec.cls, spec.seg or spec.cls):
            ck = bank.coreset_key()
            if ck not in keeps:
                keeps[ck] = memory_bank.keep_mask(bank, scores_NxP, (n, p)).reshape(-1)
    prepared = coreset.prepare(pool, starts)
    strict = bool(config.coreset.strict_parity)
    picked = memory_bank.select_coresets(prepared, keeps, config.coreset.ratio, strict)
    out: dict[str, Banks] = {}
    for spec in specs:
        built = {}
        for bank in (spec.cls, spec.seg or spec.cls):
            if bank in built:
                continue
            idx = picked[bank.coreset_key()]
            weights = memory_bank.soft_weights(bank, scores_NxP, (n, p)).reshape(-1)
            built[bank] = MemoryBank(flat[idx], weights[idx], idx)
        # No separate segmentation bank: the same object, so scoring runs once for both.
        out[spec.name] = Banks(cls=built[spec.cls], seg=built[spec.seg or spec.cls])
    return out


def predict(
    banks: dict[str, Banks],
    feats_TxPxD: jax.Array,
    grid: tuple[int, int],
    image_size: tuple[int, int],
    blur_sigma: float,
    chunk_size: int = 0,
    distance: str = "squared",
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{name: (image scores [T], anomaly maps [T, H, W])}, as `scoring.predict` for each name.

    Distinct memory banks of equal size are scored in one vmapped call."""
    unique: dict[int, MemoryBank] = {}
    for b in banks.values():
        unique.setdefault(id(b.cls), b.cls)
        unique.setdefault(id(b.seg), b.seg)
    by_size: dict[int, list[int]] = {}
    for i, bank in unique.items():
        by_size.setdefault(int(bank.feats_MxD.shape[0]), []).append(i)
    patch: dict[int, jax.Array] = {}
    for m, ids in by_size.items():
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[unique[i] for i in ids])
        chunk = chunk_size or scoring.chunk_size_for(m * len(ids))
        fn = functools.partial(scoring.patch_scores, chunk_size=chunk, distance=distance)
        patch.update(zip(ids, jax.vmap(fn, in_axes=(0, None))(stacked, feats_TxPxD)))
    maps = {
        i: scoring.anomaly_maps(patch[i], tuple(grid), tuple(image_size), blur_sigma)
        for i in dict.fromkeys(id(b.seg) for b in banks.values())
    }
    return {name: (jnp.max(patch[id(b.cls)], axis=1), maps[id(b.seg)]) for name, b in banks.items()}
