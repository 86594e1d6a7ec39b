"""The sweep's on-disk cache of features and discriminator scores, and its keys.

One `.npz` per entry under `ROOT/KIND/KEY.npz`, KEY a digest of everything that determines the arrays
(see the `*_key` functions). Entries are written to a temp file in the same folder and renamed into
place, so a crash never leaves a half-written file under a final name; on load every member is read
in full, which checks zip's CRC-32, and the stored key must match, so a file damaged or copied in
half is detected, deleted and recomputed rather than reused.
"""

from __future__ import annotations

import collections
import os
import zipfile
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging

from softpatch_jax import weights
from softpatch_jax.data.noise import NoiseSpec
from softpatch_jax.data.records import Record
from softpatch_jax.experiment.grid import digest
from softpatch_jax.io_utils import atomic_open

# Bump when the feature pipeline's code changes its numbers, so old caches stop matching.
FEATURES_VERSION = 1
SCORES_VERSION = 1


class Stats:
    """Counters the sweep logs and writes: cache hits/misses/corrupt per kind, work done per kind."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


class Cache:
    """Entries under `root`, or held in memory for one process when `root` is None (a plain run:
    nothing to share with a later run, so nothing written)."""

    def __init__(self, root: str | None, stats: Stats):
        self.root = root
        self.stats = stats
        self.memory: dict[tuple[str, str], dict[str, np.ndarray]] = {}

    def path(self, kind: str, key: str) -> str:
        return os.path.join(self.root, kind, f"{key}.npz")

    def load(self, kind: str, key: str) -> dict[str, np.ndarray] | None:
        """The entry's arrays, or None (a miss) when absent or unreadable (then deleted)."""
        if self.root is None:
            arrays = self.memory.get((kind, key))
            self.stats.add(f"{kind}_{'miss' if arrays is None else 'hit'}")
            return arrays
        path = self.path(kind, key)
        if not os.path.exists(path):
            self.stats.add(f"{kind}_miss")
            logging.info("cache miss: %s %s", kind, key)
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}  # full reads: CRC-32 checked
            if str(arrays.pop("__key__")) != key:
                raise ValueError("stored key differs from the file name")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            logging.warning("cache entry %s is damaged (%s): deleting and recomputing", path, e)
            self.stats.add(f"{kind}_corrupt")
            self.stats.add(f"{kind}_miss")
            os.unlink(path)
            return None
        self.stats.add(f"{kind}_hit")
        logging.info("cache hit: %s %s", kind, key)
        return arrays

    def save(self, kind: str, key: str, arrays: dict[str, np.ndarray]) -> None:
        if self.root is None:
            self.memory[kind, key] = arrays
            return
        with atomic_open(self.path(kind, key), "wb") as f:
            np.savez(f, __key__=np.asarray(key), **arrays)

    def get(
        self, kind: str, key: str, compute: Callable[[], dict[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        arrays = self.load(kind, key)
        if arrays is None:
            arrays = {k: np.asarray(v) for k, v in compute().items()}
            self.save(kind, key, arrays)
        return arrays


def weights_id(info: dict, variables) -> str:
    """Identity of the backbone's weights: their provenance and the hash of every parameter's bytes
    (`weights.variables_sha256`: a converted file re-downloaded or a different random init changes
    it)."""
    return digest({"info": info, "variables_sha256": weights.variables_sha256(variables)})


def _files(records: Sequence[Record], base: str) -> list:
    """Relative paths and sizes: a regenerated or edited image changes the key."""
    out = []
    for r in records:
        item = [os.path.relpath(r.path, base), os.path.getsize(r.path)]
        if r.mask_path:
            item += [os.path.relpath(r.mask_path, base), os.path.getsize(r.mask_path)]
        out.append(item)
    return out


def features_key(config, category: str, train, test, weights: str) -> str:
    """Key of a category's clean training and test features (the part shared by all noisy sets)."""
    paths = [r.path for r in (*train, *test)]
    base = os.path.commonpath([os.path.abspath(p) for p in paths])
    ds, bb = config.dataset, config.backbone
    return digest(
        {
            "version": FEATURES_VERSION,
            "layout": ds.layout,
            "root": base,
            "category": category,
            "train": _files(train, base),
            "test": _files(test, base),
            "resize": ds.resize,
            "crop": ds.crop,
            "arch": bb.arch,
            "layers": bb.layers,
            "dtype": bb.dtype,
            "weights": weights,
            "embedding": config.embedding.to_dict(),
        }
    )


def injected_key(base_key: str, spec: NoiseSpec, seed: int, injected: Sequence[Record]) -> str:
    """Key of the injected anomalies' features: which images, how they were augmented."""
    return digest(
        {
            "base": base_key,
            "ratio": spec.ratio,
            "overlap": spec.overlap,
            "rotation_deg": spec.rotation_deg,
            "translate": spec.translate,
            "seed": seed,
            "images": [[r.path, r.augment and list(vars(r.augment).values())] for r in injected],
        }
    )


def scores_key(noisy_key: str, name: str, param, projection_dim: int, seed: int) -> str:
    """Key of one discriminator's raw scores on one noisy training set. `param` is what the
    discriminator reads (LOF: its effective k; Gaussian: the covariance regulariser); the seed and
    the category (inside `noisy_key`) fix the random projection."""
    return digest(
        {
            "version": SCORES_VERSION,
            "features": noisy_key,
            "name": name,
            "param": param,
            "projection_dim": projection_dim,
            "seed": seed,
        }
    )
