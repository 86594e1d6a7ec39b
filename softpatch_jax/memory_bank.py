"""Denoised, soft-weighted memory banks (METHOD.md section 4): project -> discriminate -> remove the
top tau -> greedy coreset of the rest -> keep the picked patches' full features and soft weights.

Patches are flattened image-major: patch p of training image n has index n*P + p.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from softpatch_jax import coreset, discriminators, methods, ops

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


def random_projection(key: jax.Array, dim: int, out_dim: int) -> jax.Array:
    """A bias-free linear map D -> R drawn as torch.nn.Linear's default init, U(+-1/sqrt(D))."""
    bound = 1.0 / np.sqrt(dim)
    return jax.random.uniform(key, (dim, out_dim), jnp.float32, -bound, bound)


@jax.jit
def project(feats_NxD: jax.Array, projection_DxR: jax.Array) -> jax.Array:
    return jnp.matmul(feats_NxD.astype(jnp.float32), projection_DxR, precision=ops.PRECISION)


def discriminator_scores(
    proj_NxPxR: jax.Array, names: Sequence[str], lof_k: int, gaussian_eps: float
) -> dict[str, jax.Array]:
    """Raw per-position scores {name: [N, P]} of every training patch."""
    n, _, r = proj_NxPxR.shape
    if not names:
        return {}
    k = discriminators.effective_k(lof_k, n)
    if k != lof_k and "lof" in names:
        logging.warning("LOF k=%d needs more than %d training images: using k=%d", lof_k, n, k)
    out = discriminators.score(
        jnp.transpose(proj_NxPxR, (1, 0, 2)),
        names=tuple(names),
        lof_k=k,
        gaussian_eps=gaussian_eps,
        chunk_size=discriminators.chunk_size_for(n, r),
    )
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


def _null_timer(_stage: str):
    return contextlib.nullcontext()


def fit_many(
    key: jax.Array,
    feats_NxPxD: jax.Array,
    config: ml_collections.ConfigDict,
    specs: Sequence[methods.MethodSpec],
    *,
    projection: jax.Array | None = None,
    starts: jax.Array | None = None,
    scores_NxP: dict[str, jax.Array] | None = None,
    timer: Callable = _null_timer,
) -> FitOutput:
    """Fits every method in `specs` on the same features, sharing projection, discriminator scores
    and coreset runs between them.

    Args:
      key: root key; the projection and coreset starts come from its named streams.
      feats_NxPxD: training patch features (N images, P positions, D dims).
      config: the run config (sections softpatch, coreset).
      projection: explicit [D, R] projection (overrides the random one; R = D for none).
      starts: explicit coreset start indices into the N*P pool.
      scores_NxP: precomputed raw discriminator scores (e.g. from a sweep cache).
      timer: stage name -> context manager, for the pipeline's timings.
    """
    n, p, d = feats_NxPxD.shape
    flat_feats = feats_NxPxD.reshape(n * p, d)
    r = config.softpatch.projection_dim
    if projection is None and r:
        projection = random_projection(stream(key, "projection"), d, r)
    with timer("projection"):
        pool = flat_feats if projection is None else project(flat_feats, projection)
        pool = jax.block_until_ready(pool)
    names = tuple(n_ for n_ in discriminators.NAMES if any(n_ in s.discriminators() for s in specs))
    scores = dict(scores_NxP or {})
    missing = tuple(n_ for n_ in names if n_ not in scores)
    with timer("discriminators"):
        scores.update(
            discriminator_scores(
                pool.reshape(n, p, -1),
                missing,
                config.softpatch.lof_k,
                config.softpatch.gaussian_eps,
            )
        )
        jax.block_until_ready(scores)
    if starts is None:
        starts = coreset.draw_starts(stream(key, "coreset"), n * p, config.coreset.num_starts)
    coresets: dict[tuple, jax.Array] = {}
    banks: dict[str, Banks] = {}
    keeps: dict[str, jax.Array] = {}
    for spec in specs:
        built = []
        for bank in (spec.cls, spec.seg or spec.cls):
            keep = keep_mask(bank, scores, (n, p))
            ck = bank.coreset_key()
            if ck not in coresets:
                with timer("coreset"):
                    kept = int(jnp.sum(keep))
                    m = coreset.num_samples(config.coreset.ratio, n * p, kept)
                    idx = coreset.greedy(pool, keep.reshape(-1), starts, num_samples=m)
                    coresets[ck] = jax.block_until_ready(idx)
            idx = coresets[ck]
            weights = soft_weights(bank, scores, (n, p)).reshape(-1)
            built.append(MemoryBank(flat_feats[idx], weights[idx], idx))
            if bank is spec.cls:
                keeps[spec.name] = keep
        banks[spec.name] = Banks(cls=built[0], seg=built[1])
    return FitOutput(banks, scores, keeps, projection)


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
