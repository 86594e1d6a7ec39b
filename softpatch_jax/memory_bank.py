"""Denoised, soft-weighted memory banks (METHOD.md section 4): project -> discriminate -> remove the
top tau -> greedy coreset of the rest -> keep the picked patches' full features and soft weights.

Patches are flattened image-major: patch p of training image n has index n*P + p. Only the projected
pool [N*P, R] is resident through discrimination and coreset; the full-D features may live on the
host (any dtype, or a lazy reader) and are read twice: streamed once into the pool, and for the
picked bank rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from softpatch_jax import coreset, discriminators, methods, ops, progress
from softpatch_jax import parallel as parallel_lib

# Named random streams derived from the root key (STYLE.md: no global RNG).
STREAMS = {"noise": 0, "projection": 1, "coreset": 2}


def stream(key: jax.Array, name: str) -> jax.Array:
    return jax.random.fold_in(key, STREAMS[name])


@flax.struct.dataclass
class MemoryBank:
    feats_MxD: jax.Array
    weights_M: jax.Array  # soft weight multiplying the distance to each memory patch
    index_M: jax.Array  # flat training-patch index n*P + p of each memory patch


@flax.struct.dataclass
class Banks:
    cls: MemoryBank  # image scores
    seg: MemoryBank  # pixel maps (the same bank unless the method builds two)


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


def random_projection(key: jax.Array, dim: int, out_dim: int) -> jax.Array:
    """A bias-free linear map D -> R drawn as torch.nn.Linear's default init, U(+-1/sqrt(D))."""
    bound = 1.0 / np.sqrt(dim)
    return jax.random.uniform(key, (dim, out_dim), jnp.float32, -bound, bound)


@jax.jit
def project(feats_NxD: jax.Array, projection_DxR: jax.Array) -> jax.Array:
    return ops.matmul(feats_NxD.astype(jnp.float32), projection_DxR)


@jax.jit
def _project_device(feats_NxPxD: jax.Array, projection_DxR: jax.Array | None) -> jax.Array:
    # Reshaped inside the jit (a bitcast); outside it, reshaping a device array copies it.
    n, p, d = feats_NxPxD.shape
    flat = feats_NxPxD.reshape(n * p, d)
    out = flat.astype(jnp.float32) if projection_DxR is None else project(flat, projection_DxR)
    return out.reshape(n, p, -1)


@functools.partial(jax.jit, donate_argnums=0)
def _project_into(
    pool_NxPxR: jax.Array, block_BxPxD: jax.Array, projection_DxR: jax.Array | None, start
) -> jax.Array:
    y = block_BxPxD.astype(jnp.float32)
    if projection_DxR is not None:
        y = ops.matmul(y, projection_DxR)
    return jax.lax.dynamic_update_slice_in_dim(pool_NxPxR, y, start, axis=0)


def images_per_block(feats_NxPxD, out_dim: int) -> int:
    """Images per host->device block: input, its float32 cast and the output in 1/4 of free memory."""
    n, p, d = feats_NxPxD.shape
    itemsize = np.dtype(feats_NxPxD.dtype).itemsize
    return max(1, min(n, ops.chunk_rows(p * (d * (itemsize + 4) + 4 * out_dim))))


def project_pool(
    feats_NxPxD, projection_DxR: jax.Array | None, *, block_images: int = 0
) -> jax.Array:
    """The discriminators' and coreset's pool [N, P, R] (float32, on device); R = D without a
    projection.

    `feats_NxPxD` is a device array, or a host source: anything with `.shape`, `.dtype` and numpy
    slicing over images (a numpy array or memmap, possibly float16, or a lazy reader). A host source
    is streamed in blocks of images into the pool, so the full-D features are never on the device
    at once: at N=5000, P=784, D=1024 they are 16 GB in float32, the R=128 pool 2 GB.
    block_images: images per block (0: sized from free memory).
    """
    if isinstance(feats_NxPxD, jax.Array):
        return _project_device(feats_NxPxD, projection_DxR)
    n, p, d = feats_NxPxD.shape
    r = d if projection_DxR is None else projection_DxR.shape[1]
    b = min(n, block_images) if block_images > 0 else images_per_block(feats_NxPxD, r)
    pool = jnp.zeros((n, p, r), jnp.float32)
    # Equal-size blocks (one compile); the last is shifted back to end at image n.
    for lo in sorted({min(i, n - b) for i in range(0, n, b)}):
        block = np.asarray(feats_NxPxD[lo : lo + b])
        pool = _project_into(pool, block, projection_DxR, jnp.int32(lo))
    return pool


# Donated: the flat view reuses the pool's buffer; reshaping outside a jit would copy it.
_flatten_images = jax.jit(lambda x_NxPxR: x_NxPxR.reshape(-1, x_NxPxR.shape[-1]), donate_argnums=0)


@jax.jit
def _gather_device(feats_NxPxD: jax.Array, idx_M: jax.Array) -> jax.Array:
    n, p, d = feats_NxPxD.shape
    return feats_NxPxD.reshape(n * p, d)[idx_M]


def gather_rows(feats_NxPxD, idx_M: jax.Array) -> jax.Array:
    """The full-D features [M, D] of flat patch indices n*P + p, in the source's dtype.

    For a host source only the images holding picked patches are read (see `project_pool`).
    """
    if isinstance(feats_NxPxD, jax.Array):
        return _gather_device(feats_NxPxD, idx_M)
    _, p, d = feats_NxPxD.shape
    img, pos = np.divmod(np.asarray(idx_M), p)
    if isinstance(feats_NxPxD, np.ndarray):  # numpy and memmaps index directly
        return jnp.asarray(feats_NxPxD[img, pos])
    out = np.empty((img.shape[0], d), np.dtype(feats_NxPxD.dtype))
    order = np.argsort(img, kind="stable")
    images, first = np.unique(img[order], return_index=True)
    # Only the images holding picked patches, one at a time.
    for i, rows in zip(images, np.split(order, first[1:])):
        out[rows] = np.asarray(feats_NxPxD[i : i + 1])[0, pos[rows]]
    return jnp.asarray(out)


def discriminator_scores(
    proj_NxPxR: jax.Array,
    names: Sequence[str],
    lof_k: int,
    gaussian_eps: float,
    *,
    parallel: bool = False,
) -> dict[str, jax.Array]:
    """Raw per-position scores {name: [N, P]} of every training patch.

    parallel: shard the positions over all devices (`parallel.discriminator_scores`); same values.
    """
    n, _, r = proj_NxPxR.shape
    if not names:
        return {}
    k = discriminators.effective_k(lof_k, n)
    if k != lof_k and "lof" in names:
        logging.warning("LOF k=%d needs more than %d training images: using k=%d", lof_k, n, k)
    args = (proj_NxPxR, tuple(names), k, gaussian_eps, discriminators.chunk_size_for(n, r))
    if parallel:
        out = parallel_lib.discriminator_scores(*args)
    else:
        out = discriminators.score_pool(*args)
    return {name: s.T for name, s in out.items()}


def removal_score(bank: methods.BankSpec, scores_NxP: dict[str, jax.Array]) -> jax.Array:
    """The score ranking patches for removal: the raw score, or SoftPatch+'s fused ranks."""
    if len(bank.removal) == 1:
        return scores_NxP[bank.removal[0]]
    as_PxN = {n: scores_NxP[n].T for n in bank.removal}
    return discriminators.fuse(as_PxN, bank.removal, bank.rank_scope).T


def keep_mask(bank: methods.BankSpec, scores_NxP: dict[str, jax.Array], shape: tuple) -> jax.Array:
    """bool [N, P]: False for the top-tau patches (or all patches of the top-tau images)."""
    if not bank.removal or bank.tau == 0.0:
        return jnp.ones(shape, bool)
    s = removal_score(bank, scores_NxP)
    if bank.granularity == "image":
        per_image = jnp.max(s, axis=1)
        keep_n = per_image <= jnp.quantile(per_image, 1.0 - bank.tau)
        return jnp.broadcast_to(keep_n[:, None], shape)
    return s <= jnp.quantile(s, 1.0 - bank.tau)


def soft_weights(
    bank: methods.BankSpec, scores_NxP: dict[str, jax.Array], shape: tuple
) -> jax.Array:
    """float [N, P]: the weight each training patch carries into the memory bank."""
    if bank.soft_weight == "none":
        return jnp.ones(shape, jnp.float32)
    if bank.soft_weight == "fused":
        # 1 + fused rank in (0, 1]: ordered like the raw scores, bounded like the distance weights.
        return 1.0 + removal_score(dataclasses.replace(bank, granularity="patch"), scores_NxP)
    return discriminators.soft_weight(bank.soft_weight, scores_NxP[bank.soft_weight])


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
    return list(jax.block_until_ready(picked))


def assemble(feats_NxPxD, idx_M: jax.Array, weights_Q: jax.Array) -> MemoryBank:
    """The bank of the picked flat indices: their full-D features and soft weights."""
    return MemoryBank(gather_rows(feats_NxPxD, idx_M), weights_Q[idx_M], idx_M)


def _null_timer(_stage: str):
    return contextlib.nullcontext()


def needed_discriminators(specs: Sequence[methods.MethodSpec]) -> tuple[str, ...]:
    """The discriminators any of `specs` uses, in `discriminators.NAMES` order."""
    return tuple(n for n in discriminators.NAMES if any(n in s.discriminators() for s in specs))


def prepare(
    key: jax.Array,
    feats_NxPxD,
    config: ml_collections.ConfigDict,
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
        source (see `project_pool`), any float dtype (e.g. float16 storage).
      config: the run config (sections softpatch, coreset; parallel.enabled if present).
      names: discriminators whose scores the banks (or an audit) need.
      projection: explicit [D, R] projection (overrides the random one; R = D for none).
      starts: explicit coreset start indices into the N*P pool.
      scores_NxP: precomputed raw discriminator scores (e.g. from a sweep cache); not recomputed.
      timer: stage name -> context manager, for the pipeline's timings.
      parallel: shard discriminators and coreset over all devices (same results); None reads
        `config.parallel.enabled` per stage ("auto": when there is more than one device).
    """
    n, p, d = feats_NxPxD.shape
    if parallel is None:
        disc_parallel = parallel_lib.enabled(config, "discriminators")
        coreset_parallel = parallel_lib.enabled(config, "coreset")
    else:
        disc_parallel = coreset_parallel = bool(parallel)
    r = config.softpatch.projection_dim
    if projection is None and r:
        projection = random_projection(stream(key, "projection"), d, r)
    with timer("projection"):
        pool = jax.block_until_ready(project_pool(feats_NxPxD, projection))
    scores = {k: v for k, v in (scores_NxP or {}).items()}
    missing = tuple(n_ for n_ in discriminators.NAMES if n_ in names and n_ not in scores)
    with timer("discriminators"):
        scores.update(
            discriminator_scores(
                pool,
                missing,
                config.softpatch.lof_k,
                config.softpatch.gaussian_eps,
                parallel=disc_parallel,
            )
        )
        jax.block_until_ready(scores)
    if starts is None:
        starts = coreset.draw_starts(stream(key, "coreset"), n * p, config.coreset.num_starts)
    with timer("coreset"):
        flat_pool = _flatten_images(pool)
        del pool
        prep = parallel_lib.prepare if coreset_parallel else coreset.prepare
        prepared = jax.block_until_ready(prep(flat_pool, starts))
        del flat_pool  # the loop reads only its feature-major copy
    return Prepared((n, p), projection, scores, missing, starts, prepared, coreset_parallel)


def fit_banks(
    prepared: Prepared,
    feats_NxPxD,
    config: ml_collections.ConfigDict,
    specs: Sequence[methods.MethodSpec],
    *,
    timer: Callable = _null_timer,
) -> FitOutput:
    """The banks of every spec (by spec name) on one prepared training set: the keep masks, ONE
    pass of the coreset loop for every distinct mask (`BankSpec.coreset_key`), soft weights, and
    the picked rows gathered from `feats_NxPxD` (the features `prepared` was made from).

    config: sections coreset (ratio, strict_parity). A method without its own segmentation bank
    gets the classification bank object twice, so scoring runs once for both.
    """
    shape = prepared.shape
    scores = prepared.scores_NxP
    masks: dict[tuple, jax.Array] = {}
    keeps: dict[str, jax.Array] = {}
    for spec in specs:
        for bank in (spec.cls, spec.seg or spec.cls):
            keep = keep_mask(bank, scores, shape)
            masks.setdefault(bank.coreset_key(), keep.reshape(-1))
            if bank is spec.cls:
                keeps[spec.name] = keep
    with timer("coreset"):
        strict = bool(config.coreset.get("strict_parity", False))
        keep_KxQ = jnp.stack(list(masks.values()))
        sizes = coreset_sizes(config.coreset.ratio, shape[0] * shape[1], keep_KxQ)
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
    config: ml_collections.ConfigDict,
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
        config,
        needed_discriminators(specs),
        projection=projection,
        starts=starts,
        scores_NxP=scores_NxP,
        timer=timer,
        parallel=parallel,
    )
    return fit_banks(prepared, feats_NxPxD, config, specs, timer=timer)


def fit(
    key: jax.Array,
    feats_NxPxD: jax.Array,
    config: ml_collections.ConfigDict,
    method: str = "softpatch_plus",
    *,
    projection: jax.Array | None = None,
    starts: jax.Array | None = None,
) -> Banks:
    """Library API: the memory bank(s) of one method (see `fit_many`)."""
    spec = methods.spec(method, config.softpatch)
    out = fit_many(key, feats_NxPxD, config, [spec], projection=projection, starts=starts)
    return out.banks[method]
