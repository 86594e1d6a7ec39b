"""Patch-level noise discriminators (METHOD.md section 3) and rank fusion (section 4, SoftPatch+).

Training patches are grouped by spatial position: feats_PxNxR holds, for each of the P positions, the
N training images' (projected) patch vectors. Every discriminator scores each patch against the other
images' patches at the same position; higher means more likely noise. The discriminators asked for
share their per-position intermediates (centred rows, Gram matrix, pairwise distances, neighbour
lists: `registry.Position`), computed once per position, vmapped over positions and chunked over P.

Each discriminator is one module of this package registering a `registry.Discriminator` (name,
per-position function, parameters with defaults, random key or not, soft weight, precision); the
package imports every module in it, so `NAMES`, config validation, cache keys, the sharded path,
sweep axes and the `softpatch_<name>` methods all follow the registry. See registry.py.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from softpatch_jax import ops
from softpatch_jax.discriminators.registry import (
    REGISTRY,
    SHARED,
    Discriminator,
    Position,
    discriminator_key,
    float32_parts,
    register,
    register_shared,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

NAMES: tuple[str, ...] = tuple(sorted(REGISTRY, key=lambda n: (REGISTRY[n].order, n)))
DTYPES = ("auto", "float32", "float64")

# A discriminator's parameters as static, hashable (key, value) pairs, sorted by key.
Params = tuple[tuple[str, Any], ...]

__all__ = [
    "NAMES",
    "REGISTRY",
    "SHARED",
    "Discriminator",
    "Position",
    "discriminator_key",
    "float32_parts",
    "register",
    "register_shared",
]


def check_names(names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(names)
    bad = [n for n in names if n not in NAMES]
    if bad or not names:
        raise ValueError(f"unknown discriminator(s) {bad or names}; valid: {NAMES}")
    return names


def config_defaults() -> dict[str, Any]:
    """Every registered parameter's default, keyed as in the config's `softpatch` section."""
    return {k: v for name in NAMES for k, v in REGISTRY[name].params.items()}


def needs_key(names: Sequence[str]) -> bool:
    return any(REGISTRY[n].needs_key for n in names)


def settings(names: Sequence[str], values: Mapping[str, Any] | None, num_images: int) -> Params:
    """The parameters `names` read: their registry defaults overridden by `values` (a mapping of
    parameter keys, e.g. {"lof_k": 6}; keys of other registered discriminators are ignored), then
    resolved for N images (e.g. LOF's k reduced to N - 1, with a warning)."""
    if num_images < 2:
        raise ValueError(f"the discriminators need at least 2 training images, got {num_images}")
    values = dict(values or {})
    unknown = set(values) - set(config_defaults())
    if unknown:
        raise ValueError(
            f"unknown discriminator parameter(s) {sorted(unknown)}; valid: {sorted(config_defaults())}"
        )
    out = {}
    for name in check_names(names):
        d = REGISTRY[name]
        asked = {k: values.get(k, default) for k, default in d.params.items()}
        used = d.resolve(asked, num_images)
        if used != asked:
            logging.warning("%s: %s on %d training images: using %s", name, asked, num_images, used)
        out.update(used)
    return tuple(sorted(out.items()))


def low_key(name: str) -> str:
    """The scores-dict key of the low part of a score computed in float64: `scores[name]` holds hi,
    `scores[low_key(name)]` lo (`registry.float32_parts`)."""
    return f"{name}_lo"


def resolve_precision(
    setting: str, num_images: int, dim: int, names: Sequence[str] = (), platform: str | None = None
) -> dict[str, str]:
    """{name: "float32" | "float64"} for `setting` ("auto", or "float32" / "float64" for every
    discriminator with a float64 route): each discriminator's own rule (`Discriminator.precision`;
    "auto" is float32 on TPUs, which have no native float64). names: () = every registered one."""
    if setting not in DTYPES:
        raise ValueError(f"score_dtype must be one of {DTYPES}, got {setting!r}")
    platform = platform or jax.default_backend()
    return {n: REGISTRY[n].precision(setting, num_images, dim, platform) for n in (names or NAMES)}


def cache_param(name: str, params: Params, dtype: str):
    """What a cache key records of `name`'s settings: its one parameter's value (a list for several,
    None for none), tagged "f64" when computed in float64."""
    values = dict(params)
    vals = [values[k] for k in REGISTRY[name].params]
    v = None if not vals else vals[0] if len(vals) == 1 else vals
    if dtype == "float64":
        v = "f64" if v is None else [v, "f64"]
    return v


def order_key(scores: dict[str, jax.Array], name: str) -> jax.Array:
    """What ranks `name`'s patches: its float32 score, or, for a score kept as hi + lo, dense integer
    ranks (ties share one) in the order of hi + lo, so that top-tau removal and rank fusion see the
    float64 order. Same shape as the score."""
    lo = scores.get(low_key(name))
    if lo is None:
        return scores[name]
    return _dense_ranks(scores[name], lo)


@jax.jit
def _dense_ranks(hi: jax.Array, lo: jax.Array) -> jax.Array:
    """int32 ranks of (hi, lo) in lexicographic order (hi + lo's order, as |lo| <= ulp(hi) / 2)."""
    flat_hi, flat_lo = hi.reshape(-1), lo.reshape(-1)
    idx = jnp.arange(flat_hi.shape[0], dtype=jnp.int32)
    s_hi, s_lo, order = jax.lax.sort((flat_hi, flat_lo, idx), num_keys=2)
    step = (s_hi[1:] != s_hi[:-1]) | (s_lo[1:] != s_lo[:-1])
    dense = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(step, dtype=jnp.int32)])
    return jnp.zeros_like(idx).at[order].set(dense).reshape(hi.shape)


# On CPU a chunk's [C, N, N] distance block is also kept near cache size (L2/L3): N=200 runs 1.5x
# faster in chunks of 16 positions (2.6 MB) than in one chunk of all 784 (launch/bench.py).
CPU_CHUNK_BYTES = 4 << 20


def chunk_size_for(n: int, r: int, platform: str | None = None) -> int:
    """Positions per chunk: the per-position [N, N] work fits a quarter of free memory, and on CPU
    the chunk's [C, N, N] block fits `CPU_CHUNK_BYTES` (at least 2 positions, see `_batch`)."""
    rows = ops.chunk_rows(bytes_per_row=4 * (4 * n * n + 4 * n * r + 3 * r * r))
    if (platform or jax.default_backend()) == "cpu":
        rows = min(rows, ops.chunk_rows(4 * n * n, budget_bytes=CPU_CHUNK_BYTES, fraction=1.0))
    return max(2, rows)


def _position(
    x_NxR: jax.Array, key: jax.Array | None, names: tuple, params: Params, dtypes: tuple
) -> dict:
    pos = Position(x_NxR, key)
    values, dtype = dict(params), dict(dtypes)
    out = {}
    for name in names:
        d = REGISTRY[name]
        kwargs = {k: values[k] for k in d.params}
        if d.needs_key:
            kwargs["key"] = discriminator_key(key, name)
        s = d.position(pos, dtype[name], **kwargs)
        if isinstance(s, tuple):  # a float64 score as float32 hi + lo
            out[name], out[low_key(name)] = s
        else:
            out[name] = s
    return out


def positions_fn(names: tuple[str, ...], params: Params, dtypes: Mapping[str, str]) -> Callable:
    """The per-chunk discriminator function ([C, N, R], key) -> {name: [C, N]} (float32 inside,
    except scores computed in float64, returned as two float32 parts; see `low_key`). The key is
    not batched: every position sees the same draws."""
    one = functools.partial(
        _position, names=tuple(names), params=params, dtypes=tuple(sorted(dtypes.items()))
    )
    return lambda x_CxNxR, key: jax.vmap(one, in_axes=(0, None))(x_CxNxR.astype(jnp.float32), key)


def _batch(chunk_size: int) -> int:
    """Positions per vmapped chunk: never 1 (where data allow), because XLA drops a batch dimension
    of size 1 and compiles the per-position matmuls differently, changing their last bits; batches
    of 2 and more give every position the same bits whatever the batch (checked by
    tests/test_parallel.py, whose shards hold fewer positions than one device's chunk)."""
    return max(2, chunk_size) if chunk_size > 0 else chunk_size


def score_local(
    pool_NxPxR: jax.Array,
    names: tuple[str, ...],
    params: Params,
    chunk_size: int,
    score_dtype: str = "auto",
    key: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Unjitted body of `score_pool`, also run per device shard by `parallel`: {name: [P, N]}.

    Positions are sliced out of the image-major pool and transposed one chunk at a time, so no
    transposed copy of the whole pool is made.
    """
    n, _, r = pool_NxPxR.shape
    fn = positions_fn(names, params, resolve_precision(score_dtype, n, r, names))
    by_position = lambda chunk_NxCxR: fn(jnp.transpose(chunk_NxCxR, (1, 0, 2)), key)
    return ops.chunked_map(by_position, pool_NxPxR, _batch(chunk_size), axis=1)


_STATIC = ("names", "params", "chunk_size", "score_dtype")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _score_pool(pool_NxPxR, key, names, params, chunk_size, score_dtype):
    return score_local(pool_NxPxR, names, params, chunk_size, score_dtype, key)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _score(feats_PxNxR, key, names, params, chunk_size, score_dtype):
    _, n, r = feats_PxNxR.shape
    fn = positions_fn(names, params, resolve_precision(score_dtype, n, r, names))
    return ops.chunked_map(lambda x: fn(x, key), feats_PxNxR, _batch(chunk_size))


def checked_key(names: Sequence[str], key: jax.Array | None) -> jax.Array | None:
    """The key passed on to the per-position functions: None unless one of `names` draws."""
    if not needs_key(names):
        return None
    if key is None:
        drawing = [n for n in names if REGISTRY[n].needs_key]
        raise ValueError(f"discriminator(s) {drawing} draw random numbers: pass a key")
    return key


def score_pool(
    pool_NxPxR: jax.Array,
    names: Sequence[str] = ("lof",),
    params: Mapping[str, Any] | None = None,
    chunk_size: int = 64,
    score_dtype: str = "auto",
    key: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """As `score`, on the image-major pool [N, P, R] (the layout projection produces), returning
    {name: [P, N]}; positions are sliced and transposed one chunk at a time."""
    names = check_names(names)
    p = settings(names, params, pool_NxPxR.shape[0])
    return _score_pool(pool_NxPxR, checked_key(names, key), names, p, chunk_size, score_dtype)


def score(
    feats_PxNxR: jax.Array,
    names: Sequence[str] = ("lof",),
    params: Mapping[str, Any] | None = None,
    chunk_size: int = 64,
    score_dtype: str = "auto",
    key: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Raw discriminator scores {name: [P, N]} (e.g. nearest distance, Mahalanobis distance, LOF).

    params: parameter values by config key (registry defaults for the rest); key: required when
    one of `names` draws random numbers. score_dtype: "auto" follows each discriminator's rule
    (`resolve_precision`); a score computed in float64 adds the key `low_key(name)`.
    """
    names = check_names(names)
    p = settings(names, params, feats_PxNxR.shape[1])
    return _score(feats_PxNxR, checked_key(names, key), names, p, chunk_size, score_dtype)


def soft_weight(name: str, raw: jax.Array) -> jax.Array:
    """The weight a memory patch carries, from its raw score (the discriminator's rule)."""
    if name not in REGISTRY:
        raise ValueError(f"no soft weight for {name!r}; valid: {NAMES}")
    return REGISTRY[name].soft_weight(raw)


def rank_normalise(w: jax.Array, axis: int | None = None) -> jax.Array:
    """rank(w) / count with ascending ranks, ties given their average rank (scipy's 'average').

    axis=None ranks over all elements; an int ranks independently along that axis.
    """
    if axis is None:
        flat = w.reshape(-1)
        s = jnp.sort(flat)
        lo = jnp.searchsorted(s, flat, side="left")
        hi = jnp.searchsorted(s, flat, side="right")
        return ((lo + hi + 1) / 2.0 / flat.shape[0]).reshape(w.shape).astype(jnp.float32)
    moved = jnp.moveaxis(w, axis, -1)
    lead = moved.shape[:-1]
    ranked = jax.vmap(rank_normalise)(moved.reshape(-1, moved.shape[-1]))
    return jnp.moveaxis(ranked.reshape(*lead, moved.shape[-1]), -1, axis)


def fuse(scores_PxN: dict[str, jax.Array], names: Sequence[str], scope: str = "all") -> jax.Array:
    """SoftPatch+ (eq. 7-8): mean of the rank-normalised scores of `names`, shape [P, N].

    scope: "all" ranks over every training patch, "position" over the N patches of each position.
    """
    if scope not in ("all", "position"):
        raise ValueError(f"rank_scope must be 'all' or 'position', got {scope!r}")
    axis = None if scope == "all" else 1
    ranks = [rank_normalise(scores_PxN[n], axis=axis) for n in check_names(names)]
    return sum(ranks[1:], ranks[0]) / len(ranks)
