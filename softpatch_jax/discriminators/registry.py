"""The discriminator registry: what a patch-level noise discriminator declares, and the per-position
intermediates that discriminators share.

A discriminator is one module in this package that calls `register(Discriminator(...))` at import
time (the package imports every module in it, so a new file is picked up by config validation,
cache keys, sharding, sweeps and the method names with no other edit). It declares:
  name          the config name (`softpatch.discriminator`, `softpatch_<name>`, fusion subsets);
  position      its pure per-position function `position(pos, dtype, **params) -> score [N]`, or
                `(hi, lo)` float32 parts of a float64 score (`float32_parts`); vmapped over P;
  params        {config key under `softpatch`: default}; the defaults are copied into
                configs/base.py's softpatch section, so each default lives here, once;
  needs_key     whether it draws random numbers: `position` then also gets `key=`, its own key
                (`discriminator_key`: the run's "discriminators" stream folded with its name),
                the same for every position (unbatched: drawn once, and sharding keeps its bits);
  soft_weight   raw score -> the weight a memory patch carries (METHOD.md section 4);
  precision     (score_dtype setting, N, R, platform) -> "float32" | "float64";
  resolve       (params, N) -> params actually used (LOF: k reduced to N-1), part of cache keys;
  order         position in `NAMES` (error messages, tables, fusion order);
  checks        {parameter key: (predicate, expected)} for config validation (experiment/config_errors.py).

Shared intermediates (`Position.get(name, *args)`): computed at most once per position for every
discriminator asking for them, in one trace: "centred" [N, R] (rows minus their mean; changes no
distance, keeps the expanded form accurate in float32), "sq_norms" [N], "gram" [N, N] of the
centred rows, "sqdist" [N, N] squared distances with the diagonal at +inf (self excluded),
"knn" (k) -> (squared distances [N, k] ascending, indices [N, k]). A module may add its own with
`register_shared`.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from softpatch_jax import ops


def _always_float32(setting: str, n: int, r: int, platform: str) -> str:
    return "float32"


def _same_params(params: dict, n: int) -> dict:
    return params


@dataclasses.dataclass(frozen=True)
class Discriminator:
    name: str
    position: Callable[..., Any]
    soft_weight: Callable[[jax.Array], jax.Array]
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    needs_key: bool = False
    precision: Callable[[str, int, int, str], str] = _always_float32
    resolve: Callable[[dict, int], dict] = _same_params
    order: int = 100
    # {parameter key: (predicate, what is expected)}: config validation's one-line errors.
    checks: Mapping[str, tuple[Callable[[Any], bool], str]] = dataclasses.field(
        default_factory=dict
    )
    summary: str = ""  # one line for README's method table and error messages


REGISTRY: dict[str, Discriminator] = {}
SHARED: dict[str, Callable[..., Any]] = {}


def register(d: Discriminator) -> Discriminator:
    if d.name in REGISTRY:
        raise ValueError(f"discriminator {d.name!r} is registered twice")
    for other in REGISTRY.values():
        clash = set(other.params) & set(d.params)
        if clash:
            raise ValueError(f"discriminator {d.name!r} reuses {other.name!r}'s parameters {clash}")
    REGISTRY[d.name] = d
    return d


def register_shared(name: str, fn: Callable[..., Any]) -> None:
    """A per-position intermediate `fn(pos, *args)`, memoised per position by (name, args)."""
    if name in SHARED:
        raise ValueError(f"shared intermediate {name!r} is registered twice")
    SHARED[name] = fn


class Position:
    """One position's inputs, x [N, R] float32 and the discriminators' key (None when none needs
    one), with its shared intermediates computed on first request and kept for the others."""

    def __init__(self, x_NxR: jax.Array, key: jax.Array | None):
        self.x = x_NxR
        self.key = key
        self._memo: dict[tuple, Any] = {}

    @property
    def n(self) -> int:
        return self.x.shape[0]

    def get(self, name: str, *args):
        if (name, args) not in self._memo:
            if name not in SHARED:
                raise KeyError(f"unknown shared intermediate {name!r}; valid: {tuple(SHARED)}")
            self._memo[name, args] = SHARED[name](self, *args)
        return self._memo[name, args]


def _sqdist(pos: Position) -> jax.Array:
    xc, sq = pos.get("centred"), pos.get("sq_norms")
    d2 = ops.pairwise_sqdist(xc, xc, sq, sq, ab_MxN=pos.get("gram"))
    return jnp.where(jnp.eye(pos.n, dtype=bool), jnp.inf, d2)


register_shared("centred", lambda pos: pos.x - ops.fixed_order_mean(pos.x, axis=0)[None, :])
register_shared("sq_norms", lambda pos: ops.sq_norms(pos.get("centred")))
register_shared("gram", lambda pos: ops.matmul(pos.get("centred"), pos.get("centred").T))
register_shared("sqdist", _sqdist)
# Neighbours are ranked on squared distances (sqrt is monotone): only the k picked are rooted.
register_shared("knn", lambda pos, k: ops.smallest_k(pos.get("sqdist"), k))


def discriminator_key(key: jax.Array, name: str) -> jax.Array:
    """The key `name` draws with: the run's discriminator key folded with a hash of the name, so
    two drawing discriminators never share draws and adding one changes no other's."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def float32_parts(d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A float64 array as float32 hi = float32(d) and lo = float32(d - hi) (inside `enable_x64`)."""
    hi = d.astype(jnp.float32)
    return hi, (d - hi.astype(jnp.float64)).astype(jnp.float32)
