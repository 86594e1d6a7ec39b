"""Many memory banks scored at once: a sweep asks for many banks from one noisy training set that
differ only in array values (tau thresholds, discriminator subsets, patch- or image-level removal);
they are fitted together by `memory_bank.fit_banks` (every keep mask in one coreset pass), and the
distinct banks of equal size are scored here in one vmapped call."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from softpatch_jax import scoring
from softpatch_jax.memory_bank import Banks, MemoryBank


def predict(
    banks: dict[str, Banks],
    feats_TxPxD: jax.Array,
    grid: tuple[int, int],
    image_size: tuple[int, int],
    blur_sigma: float,
    chunk_size: int = 0,
    distance: str = "squared",
    progress: Callable[[int], None] | None = None,
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{name: (image scores [T], anomaly maps [T, H, W])}, as `scoring.predict` for each name.

    Distinct memory banks of equal size are scored in one vmapped call.
    progress: called with the number of images scored by every bank, per segment of the test set
      (`scoring.in_segments`)."""
    unique: dict[int, MemoryBank] = {}
    for b in banks.values():
        unique.setdefault(id(b.cls), b.cls)
        unique.setdefault(id(b.seg), b.seg)
    by_size: dict[int, list[int]] = {}
    for i, bank in unique.items():
        by_size.setdefault(int(bank.feats_MxD.shape[0]), []).append(i)
    groups = []  # (bank ids, stacked banks, the vmapped scoring of their patches)
    for m, ids in by_size.items():
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[unique[i] for i in ids])
        chunk = chunk_size or scoring.chunk_size_for(m * len(ids))
        fn = functools.partial(scoring.patch_scores, chunk_size=chunk, distance=distance)
        groups.append((ids, stacked, chunk, jax.vmap(fn, in_axes=(0, None))))

    def score(feats):
        return {i: s for ids, st, _, fn in groups for i, s in zip(ids, fn(st, feats))}

    chunk = max(g[2] for g in groups)
    patch = scoring.in_segments(score, feats_TxPxD, chunk, progress)
    maps = {
        i: scoring.anomaly_maps(patch[i], tuple(grid), tuple(image_size), blur_sigma)
        for i in dict.fromkeys(id(b.seg) for b in banks.values())
    }
    return {name: (jnp.max(patch[id(b.cls)], axis=1), maps[id(b.seg)]) for name, b in banks.items()}
