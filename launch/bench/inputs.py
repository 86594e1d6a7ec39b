"""Synthetic inputs of the real shapes: a projected pool [N, P, R] and training features [N, P, D]
on the device, on the host, or generated per image on demand (--source)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from softpatch_jax.features import STORE_DTYPES  # --store_dtype: how training features are held


def synthetic_pool(key, n: int, p: int, r: int) -> jax.Array:
    """[N, P, R]: a per-position mean plus unit noise (positions differ, images vary around them)."""
    k1, k2 = jax.random.split(key)
    return jax.random.normal(k1, (1, p, r)) * 2.0 + jax.random.normal(k2, (n, p, r))


class LazyFeatures:
    """[N, P, D] features generated per image on demand (seeded by the image index), with the
    `.shape`, `.dtype` and slicing that `memory_bank.fit_many` accepts from a host source."""

    def __init__(self, n: int, p: int, d: int, dtype, seed: int):
        self.shape = (n, p, d)
        self.dtype = np.dtype(dtype)
        self.seed = seed
        self.base = np.random.default_rng([seed, 1, 0]).standard_normal((p, d), np.float32) * 2.0
        self.seconds = 0.0  # spent generating images so far (the bench's host-generation stage)

    def image(self, i: int) -> np.ndarray:
        t0 = time.perf_counter()
        noise = np.random.default_rng([self.seed, 0, i]).standard_normal(self.shape[1:], np.float32)
        out = (self.base + noise).astype(self.dtype)
        self.seconds += time.perf_counter() - t0
        return out

    def __getitem__(self, index):
        if isinstance(index, slice):
            return np.stack([self.image(i) for i in range(*index.indices(self.shape[0]))])
        return self.image(int(index))


def make_features(args, n: int, p: int, store_dtype: str | None = None):
    """Training features in the store dtype, generated image by image (never a float32 copy)."""
    lazy = LazyFeatures(n, p, args.d, STORE_DTYPES[store_dtype or args.store_dtype], args.seed)
    if args.source == "lazy":
        return lazy
    feats = lazy[0:n]
    return feats if args.source == "host" else jnp.asarray(feats)


def grid_of(p: int) -> tuple[int, int]:
    h = round(p**0.5)
    return (h, h) if h * h == p else (1, p)


def coreset_size(args, n: int, p: int) -> int:
    return args.coreset_steps or max(1, int(args.coreset_ratio * n * p))
