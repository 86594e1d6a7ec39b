"""Denoised, soft-weighted memory banks (METHOD.md section 4): project -> discriminate -> remove the
top tau -> greedy coreset of the rest -> keep the picked patches' full features and soft weights.

The fitting path of every driver (pipeline, sweeps, deploy, the held-out threshold): `prepare` once
per training set (projection, the pool streamed once, discriminator scores, coreset starts and
prepared inputs; pool.py), then `fit_banks` (keep masks -> one coreset pass for every mask -> soft
weights -> banks). Only the projected pool [N*P, R] is resident through discrimination and coreset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from softpatch_jax import contamination, coreset, discriminators, inreach, methods, pool, progress
from softpatch_jax import parallel as parallel_lib


@flax.struct.dataclass
class MemoryBank:
    feats_MxD: jax.Array
    weights_M: jax.Array  # soft weight multiplying the distance to each memory patch
    index_M: jax.Array  # flat training-patch index n*P + p of each memory patch


@flax.struct.dataclass
class Banks:
    cls: MemoryBank  # image scores
    seg: MemoryBank  # pixel maps (the same bank unless the method builds two)


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """What the fitting path reads (the driver builds it from `config.softpatch`, `config.coreset`
    and `config.parallel`; defaults live in configs/base.py)."""

    projection_dim: int  # R; 0 = discriminators and coreset on the full D
    discriminator_params: Mapping[str, Any]  # `discriminators.config_defaults()` keys -> values
    score_dtype: str  # `discriminators.resolve_precision`
    num_starts: int  # coreset start points
    coreset_ratio: float  # of ALL N*P patches
    strict_parity: bool  # reproduce the reference's unmasked first pick
    parallel: str | bool  # `parallel.enabled`'s setting


@dataclasses.dataclass
class FitOutput:
    banks: dict[str, Banks]  # method name -> banks
    scores_NxP: dict[str, jax.Array]  # raw discriminator scores (for audits and sweeps)
    keep_NxP: dict[str, jax.Array]  # method name -> the classification bank's keep mask
    projection_DxR: jax.Array | None


@dataclasses.dataclass
class Prepared:
    """What every bank of one training set shares, computed once per training set (`prepare`)."""

    shape: tuple[int, int]  # (N, P)
    projection_DxR: jax.Array | None
    scores_NxP: dict[str, jax.Array]  # raw discriminator scores, given and computed
    computed: tuple[str, ...]  # the discriminators computed here (not given): what to cache
    starts: jax.Array  # coreset start indices into the N*P pool
    coreset: coreset.Prepared  # the greedy loop's inputs (any keep mask)
    parallel: bool  # `coreset` was prepared sharded (`parallel.prepare`)


def discriminator_scores(
    proj_NxPxR: jax.Array,
    names: Sequence[str],
    params: Mapping[str, Any] | None = None,
    *,
    score_dtype: str = "auto",
    parallel: bool = False,
    key: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Raw per-position scores {name: [N, P]} of every training patch (a score computed in float64
    adds its low part under `discriminators.low_key(name)`; rank them with `order_key`).

    params: discriminator parameters by config key (`discriminators.config_defaults` for the rest).
    key: for discriminators that draw random numbers (`Discriminator.needs_key`).
    parallel: shard the positions over all devices (`parallel.discriminator_scores`); same values.
    """
    n, _, r = proj_NxPxR.shape
    if not names:
        return {}
    chunk = discriminators.chunk_size_for(n, r)
    args = (proj_NxPxR, tuple(names), params, chunk, score_dtype, key)
    if parallel:
        out = parallel_lib.discriminator_scores(*args)
    else:
        out = discriminators.score_pool(*args)
    return {name: s.T for name, s in out.items()}


def score_settings(
    options: FitOptions, num_images: int, dim: int, names: Sequence[str]
) -> dict[str, tuple[discriminators.Params, str]]:
    """{name: (parameters, precision)} as `prepare` computes each discriminator's raw score on N
    training images of D dims: the parameters resolved for N (e.g. LOF's k reduced to N - 1) and
    "float32" / "float64" by each discriminator's rule at R = `options.projection_dim` (D without a
    projection). What a score's cache key records (`discriminators.cache_param`)."""
    r = options.projection_dim or dim
    dtypes = discriminators.resolve_precision(options.score_dtype, num_images, r, names)
    return {
        name: (
            discriminators.settings((name,), options.discriminator_params, num_images),
            dtypes[name],
        )
        for name in names
    }


def removal_score(bank: methods.BankSpec, scores_NxP: dict[str, jax.Array]) -> jax.Array:
    """The score ranking patches for removal: the raw score, or SoftPatch+'s fused ranks."""
    if len(bank.removal) == 1:
        return discriminators.order_key(scores_NxP, bank.removal[0])
    as_PxN = {n: discriminators.order_key(scores_NxP, n).T for n in bank.removal}
    return discriminators.fuse(as_PxN, bank.removal, bank.rank_scope).T


def keep_mask(
    bank: methods.BankSpec,
    scores_NxP: dict[str, jax.Array],
    shape: tuple,
    pool_NxPxR: jax.Array | None = None,
) -> jax.Array:
    """bool [N, P]: False for the top-tau patches (or all patches of the top-tau images); for a
    bank kept by InReaCh's channels, the channels'
    patches of the projected pool (square grid). Tau "auto" is the training set's estimated
    contamination (`tau_of`)."""
    if bank.channels is not None:
        p = shape[1]
        side = math.isqrt(p)
        if side * side != p or pool_NxPxR is None:
            raise ValueError(f"inreach needs the projected pool on a square grid, got P={p}")
        return inreach.keep_mask(pool_NxPxR, (side, side), bank.channels)
    if not bank.removal or bank.tau == 0.0:
        return jnp.ones(shape, bool)
    tau = tau_of(bank, scores_NxP)
    s = removal_score(bank, scores_NxP)
    if bank.granularity == "image":
        per_image = jnp.max(s, axis=1)
        keep_n = per_image <= jnp.quantile(per_image, 1.0 - tau)
        return jnp.broadcast_to(keep_n[:, None], shape)
    return s <= jnp.quantile(s, 1.0 - tau)


def tau_of(bank: methods.BankSpec, scores_NxP: dict[str, jax.Array]):
    """The bank's removal fraction: its fixed tau, or for "auto" the estimate from the raw scores
    (the patch fraction; the image fraction for image-level removal) raised to the bank's floor
    on a set found contaminated (`contamination.policy_tau`), on device."""
    if bank.tau == "oracle":
        raise ValueError("tau='oracle' must be resolved to the true fraction before fitting")
    if bank.tau != "auto":
        return bank.tau
    return _auto(bank, scores_NxP)[1]


def _auto(bank: methods.BankSpec, scores_NxP: dict[str, jax.Array]):
    """(estimate, tau applied) of tau "auto": the bank's estimator, then its policy (the floor on a
    set found contaminated); the one place both the fit and the reported fields take them from."""
    est = contamination.estimate(scores_NxP, bank.estimator)
    return est, contamination.policy_tau(est, bank.floor, bank.granularity)


def contamination_summary(
    bank: methods.BankSpec, scores_NxP: dict[str, jax.Array]
) -> tuple[str, dict[str, float]]:
    """(estimator, row fields) of a training set for a bank: the bank's estimator under tau "auto"
    (with the tau its policy applies, `tau_of`), else the default estimate, reported beside a
    fixed tau (`contamination.summary`). What experiment rows and deploy's model.json record."""
    if bank.tau == "auto":
        est, applied = _auto(bank, scores_NxP)
        return bank.estimator, contamination.summary(est, applied)
    est = contamination.estimate(scores_NxP, contamination.DEFAULT)
    return contamination.DEFAULT, contamination.summary(est, None)


def soft_weights(
    bank: methods.BankSpec, scores_NxP: dict[str, jax.Array], shape: tuple
) -> jax.Array:
    """float [N, P]: the weight each training patch carries into the memory bank; under tau "auto"
    faded to 1 on the images the estimate finds clean (`contamination.fade_weights`)."""
    if bank.soft_weight == "none":
        return jnp.ones(shape, jnp.float32)
    if bank.soft_weight == "fused":
        # 1 + fused rank in (0, 1]: ordered like the raw scores, bounded like the distance weights.
        w = 1.0 + removal_score(dataclasses.replace(bank, granularity="patch"), scores_NxP)
    else:
        w = discriminators.soft_weight(bank.soft_weight, scores_NxP[bank.soft_weight])
    if bank.tau == "auto":
        w = contamination.fade_weights(
            w, contamination.estimate(scores_NxP, bank.estimator).suspicion_N
        )
    return w


def coreset_sizes(ratio: float, num_patches: int, keep_KxQ: jax.Array) -> list[int]:
    """Each mask's coreset size, `coreset.num_samples(ratio, num_patches, kept)`."""
    kept = jax.device_get(jnp.sum(keep_KxQ, axis=1))
    return [coreset.num_samples(ratio, num_patches, int(k)) for k in kept]


def select_coresets(
    prepared: Prepared, keep_KxQ: jax.Array, sizes_K: Sequence[int], strict: bool = False
) -> list[jax.Array]:
    """Every mask's coreset in one pass of the greedy loop (`coreset.select_many`, or the sharded
    `parallel.select_many` where the inputs were prepared sharded): indices [sizes_K[k]] per mask.

    keep_KxQ: one keep mask per row over the N*P pool; masks with smaller coresets keep a prefix.
    """
    select = parallel_lib.select_many if prepared.parallel else coreset.select_many
    k = len(sizes_K)
    with progress.bar(f"coreset ({k} mask{'s' if k > 1 else ''})", max(sizes_K), "picks") as update:
        picked = coreset.select_sizes(prepared.coreset, keep_KxQ, sizes_K, strict, update, select)
        # Inside the bar: without one the loop is one asynchronous call, and the log line times it.
        picked = jax.block_until_ready(picked)
    return list(picked)


def assemble(feats_NxPxD, idx_M: jax.Array, weights_Q: jax.Array) -> MemoryBank:
    """The bank of the picked flat indices: their full-D features and soft weights."""
    return MemoryBank(pool.gather_rows(feats_NxPxD, idx_M), weights_Q[idx_M], idx_M)


def _null_timer(_stage: str):
    return contextlib.nullcontext()


def needed_discriminators(specs: Sequence[methods.MethodSpec]) -> tuple[str, ...]:
    """The discriminators any of `specs` uses, in `discriminators.NAMES` order."""
    return tuple(n for n in discriminators.NAMES if any(n in s.discriminators() for s in specs))


def prepare(
    key: jax.Array,
    feats_NxPxD,
    options: FitOptions,
    names: Sequence[str],
    *,
    projection: jax.Array | None = None,
    starts: jax.Array | None = None,
    scores_NxP: dict[str, jax.Array] | None = None,
    timer: Callable = _null_timer,
    parallel: bool | None = None,
) -> Prepared:
    """Everything the banks of one training set share, each computed once: the projection, the
    projected pool (streamed once from `feats_NxPxD`), the raw scores of the discriminators `names`
    (only those not in `scores_NxP`), the coreset starts and the coreset's prepared inputs.

    Args:
      key: root key; the projection and coreset starts come from its named streams.
      feats_NxPxD: training patch features (N images, P positions, D dims): a device array or a host
        source (see `pool.project_pool`), any float dtype (e.g. float16 storage).
      options: projection size, discriminator parameters and precision, coreset starts, sharding.
      names: discriminators whose scores the banks (or an audit) need.
      projection: explicit [D, R] projection (overrides the random one; R = D for none).
      starts: explicit coreset start indices into the N*P pool.
      scores_NxP: precomputed raw discriminator scores (e.g. from a sweep cache); not recomputed.
      timer: stage name -> context manager, for the pipeline's timings.
      parallel: shard discriminators and coreset over all devices (same results); None reads
        `options.parallel` per stage ("auto": when there is more than one device).
    """
    n, p, d = feats_NxPxD.shape
    if parallel is None:
        disc_parallel = parallel_lib.enabled(options.parallel, "discriminators")
        coreset_parallel = parallel_lib.enabled(options.parallel, "coreset")
    else:
        disc_parallel = coreset_parallel = bool(parallel)
    r = options.projection_dim
    if projection is None and r:
        projection = pool.random_projection(pool.stream(key, "projection"), d, r)
    with timer("projection"):
        pool_NxPxR = jax.block_until_ready(pool.project_pool(feats_NxPxD, projection))
    scores = dict(scores_NxP or {})
    missing = tuple(n_ for n_ in discriminators.NAMES if n_ in names and n_ not in scores)
    with timer("discriminators"):
        scores.update(
            discriminator_scores(
                pool_NxPxR,
                missing,
                options.discriminator_params,
                score_dtype=options.score_dtype,
                parallel=disc_parallel,
                key=pool.stream(key, "discriminators"),
            )
        )
        jax.block_until_ready(scores)
    if starts is None:
        starts = coreset.draw_starts(pool.stream(key, "coreset"), n * p, options.num_starts)
    with timer("coreset"):
        flat_pool = pool.flatten_images(pool_NxPxR)
        del pool_NxPxR
        prep = parallel_lib.prepare if coreset_parallel else coreset.prepare
        prepared = jax.block_until_ready(prep(flat_pool, starts))
        del flat_pool  # the loop reads only its feature-major copy
    return Prepared((n, p), projection, scores, missing, starts, prepared, coreset_parallel)


def fit_banks(
    prepared: Prepared,
    feats_NxPxD,
    options: FitOptions,
    specs: Sequence[methods.MethodSpec],
    *,
    timer: Callable = _null_timer,
) -> FitOutput:
    """The banks of every spec (by spec name) on one prepared training set: the keep masks, ONE
    pass of the coreset loop for every distinct mask (`BankSpec.coreset_key`), soft weights, and
    the picked rows gathered from `feats_NxPxD` (the features `prepared` was made from).

    options: the coreset ratio and parity switch. A method without its own segmentation bank
    gets the classification bank object twice, so scoring runs once for both.
    """
    shape = prepared.shape
    scores = prepared.scores_NxP
    masks: dict[tuple, jax.Array] = {}
    keeps: dict[str, jax.Array] = {}
    pool_NxPxR = None
    if any(b.channels is not None for s in specs for b in (s.cls, s.seg) if b is not None):
        # The coreset's centred, feature-major pool (centring moves no distance), unpadded.
        n, p = shape
        pool_NxPxR = prepared.coreset.x_RxN[:, : n * p].T.reshape(n, p, -1)
    for spec in specs:
        for bank in (spec.cls, spec.seg or spec.cls):
            keep = keep_mask(bank, scores, shape, pool_NxPxR)
            masks.setdefault(bank.coreset_key(), keep.reshape(-1))
            if bank is spec.cls:
                keeps[spec.name] = keep
    with timer("coreset"):
        strict = bool(options.strict_parity)
        keep_KxQ = jnp.stack(list(masks.values()))
        sizes = coreset_sizes(options.coreset_ratio, shape[0] * shape[1], keep_KxQ)
        coresets = dict(zip(masks, select_coresets(prepared, keep_KxQ, sizes, strict)))
    banks: dict[str, Banks] = {}
    for spec in specs:
        built: dict[methods.BankSpec, MemoryBank] = {}
        for bank in (spec.cls, spec.seg or spec.cls):
            if bank in built:
                continue
            weights = soft_weights(bank, scores, shape).reshape(-1)
            with timer("bank_gather"):
                built[bank] = assemble(feats_NxPxD, coresets[bank.coreset_key()], weights)
        banks[spec.name] = Banks(cls=built[spec.cls], seg=built[spec.seg or spec.cls])
    return FitOutput(banks, scores, keeps, prepared.projection_DxR)


def fit_many(
    key: jax.Array,
    feats_NxPxD,
    options: FitOptions,
    specs: Sequence[methods.MethodSpec],
    *,
    projection: jax.Array | None = None,
    starts: jax.Array | None = None,
    scores_NxP: dict[str, jax.Array] | None = None,
    timer: Callable = _null_timer,
    parallel: bool | None = None,
) -> FitOutput:
    """Fits every method in `specs` on the same features: `prepare` (projection, discriminator
    scores and the coreset's preparation, shared by all of them), then `fit_banks`.

    Only the projected pool [N*P, R] is resident for the discriminators and the coreset; the full-D
    features are read twice: once to project them, once for the picked bank rows. Arguments as
    `prepare`'s; `specs`' discriminators are the ones scored.
    """
    prepared = prepare(
        key,
        feats_NxPxD,
        options,
        needed_discriminators(specs),
        projection=projection,
        starts=starts,
        scores_NxP=scores_NxP,
        timer=timer,
        parallel=parallel,
    )
    return fit_banks(prepared, feats_NxPxD, options, specs, timer=timer)


def fit(
    key: jax.Array,
    feats_NxPxD: jax.Array,
    options: FitOptions,
    spec: methods.MethodSpec,
    *,
    projection: jax.Array | None = None,
    starts: jax.Array | None = None,
) -> Banks:
    """Library API: the memory bank(s) of one method (see `fit_many`); build `options` and `spec`
    from a config with `experiment.options` (`fit_options`, `method_specs`)."""
    out = fit_many(key, feats_NxPxD, options, [spec], projection=projection, starts=starts)
    return out.banks[spec.name]
