"""Scoring (METHOD.md section 5): each test patch's distance to its nearest memory patch times that
patch's soft weight (the SQUARED L2 distance by default, as the authors' faiss `IndexFlatL2` scorer
and the original PatchCore code; `distance="l2"` is the paper's eq. 10); the image score is the max
over the image's patches; the pixel map is the patch scores upsampled bilinearly to the input size
and blurred with a Gaussian (sigma 4). All on device, the nearest-neighbour search chunked over test
patches so memory stays bounded for any bank size.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from softpatch_jax import embedding, ops
from softpatch_jax import parallel as parallel_lib
from softpatch_jax.memory_bank import Banks, MemoryBank


def nearest(
    query_QxD: jax.Array,
    bank_MxD: jax.Array,
    chunk_size: int,
    centre_1xD: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Distance to and index of the nearest bank row for each query row (L2, full D).

    The search uses |q|^2 + |b|^2 - 2qb on bank-centred data; the winner's distance is then recomputed
    as |q - b| directly, since the expanded form loses small distances to cancellation in float32.
    `centre_1xD` (default: the bank mean) is passed in by `patch_scores`, computed by one call of
    `ops.mean_row` as the sharded search (`parallel.nearest`) does, so both give the same bits.
    """
    centre = jnp.mean(bank_MxD.astype(jnp.float32), axis=0, keepdims=True)
    centre = centre if centre_1xD is None else centre_1xD
    bank = bank_MxD.astype(jnp.float32) - centre
    bank_sq = ops.sq_norms(bank)

    def chunk(q):
        _, idx, dist = ops.nearest_rows(q.astype(jnp.float32) - centre, bank, bank_sq)
        return dist, idx

    return ops.chunked_map(chunk, query_QxD, chunk_size)


# How the nearest memory patch is found; every choice gives the exact search's indices and bits.
#   exact     float32 products at full precision (what the others are checked against).
#   bfloat16  candidates from a bfloat16 product (tensor cores), certified or searched exactly
#             (`nearest_certified`); on a CPU it costs more than exact.
#   emulated  the bfloat16 search with the rounding emulated in float32 (tests on CPUs).
#   auto      exact on CPU, bfloat16 on accelerators (there unmeasured so far).
SEARCHES = ("auto", "exact", "bfloat16", "emulated")


def resolve_search(search: str) -> str:
    if search not in SEARCHES:
        raise ValueError(f"scoring.search {search!r}; valid: {SEARCHES}")
    if search == "auto":
        return "exact" if jax.default_backend() == "cpu" else "bfloat16"
    return search


@functools.partial(jax.jit, static_argnames=("chunk_size", "candidates", "emulate"))
def _certified(query_QxD, bank_MxD, centre_1xD, chunk_size: int, candidates: int, emulate: bool):
    bank = bank_MxD.astype(jnp.float32) - centre_1xD
    bank_sq = ops.sq_norms(bank)

    def chunk(q):
        q = q.astype(jnp.float32) - centre_1xD
        return ops.certified_nearest_rows(q, bank, bank_sq, candidates, emulate)

    return ops.chunked_map(chunk, query_QxD, chunk_size)


_nearest = jax.jit(nearest, static_argnames=("chunk_size",))


def nearest_certified(
    query_QxD: jax.Array,
    bank_MxD: jax.Array,
    chunk_size: int,
    centre_1xD: jax.Array | None = None,
    *,
    candidates: int = 16,
    emulate: bool = False,
) -> tuple[jax.Array, jax.Array, int]:
    """`nearest` with candidates from a bfloat16 product: the same distances and indices, bit for
    bit, and the number of queries that fell back to the exact search.

    Each chunk finds `candidates` rows per query by a bfloat16 distance, re-ranks them by their
    float32 distance and certifies the winner against the error bounds (`ops.certified_nearest_rows`).
    The queries left uncertified (near-ties) are searched again by `nearest`, in chunks of the
    shape the whole search would use (a product's rows can round differently in another shape),
    with one host round trip to gather them.
    """
    centre = ops.mean_row(bank_MxD) if centre_1xD is None else centre_1xD
    idx, dist, ok = _certified(query_QxD, bank_MxD, centre, chunk_size, candidates, emulate)
    bad = np.flatnonzero(~np.asarray(ok))
    if not bad.size:
        return dist, idx, 0
    q = query_QxD.shape[0]
    c = min(chunk_size, q)
    size = -(-bad.size // c) * c
    # As many chunks of c rows as the whole search has, up to two: one chunk runs outside the loop.
    size = max(size, min(q, 2 * c)) if q > c else q
    take = jnp.asarray(np.resize(bad, size))
    d2, i2 = _nearest(query_QxD[take], bank_MxD, c, centre)
    at = jnp.asarray(bad)
    return dist.at[at].set(d2[: bad.size]), idx.at[at].set(i2[: bad.size]), int(bad.size)


DISTANCES = ("squared", "l2")


def check_distance(distance: str) -> str:
    if distance not in DISTANCES:
        raise ValueError(
            f"scoring.distance {distance!r}; valid: 'squared' (the authors' code, faiss "
            "IndexFlatL2) or 'l2' (the paper's eq. 10)"
        )
    return distance


def weigh(weights_M: jax.Array, idx_Q: jax.Array, dist_Q: jax.Array, distance: str) -> jax.Array:
    """The patch score: the nearest memory patch's soft weight times its L2 distance, squared or
    not (`DISTANCES`)."""
    check_distance(distance)
    return weights_M[idx_Q] * (dist_Q * dist_Q if distance == "squared" else dist_Q)


@functools.partial(jax.jit, static_argnames=("chunk_size", "distance"))
def _patch_scores(
    bank: MemoryBank,
    feats_TxPxD: jax.Array,
    centre_1xD: jax.Array,
    chunk_size: int,
    distance: str,
) -> jax.Array:
    t, p, d = feats_TxPxD.shape
    dist, idx = nearest(feats_TxPxD.reshape(t * p, d), bank.feats_MxD, chunk_size, centre_1xD)
    return weigh(bank.weights_M, idx, dist, distance).reshape(t, p)


def patch_scores(
    bank: MemoryBank,
    feats_TxPxD: jax.Array,
    chunk_size: int,
    *,
    distance: str = "squared",
    parallel: bool = False,
    search: str = "exact",
) -> jax.Array:
    """[T, P]: weighted nearest-neighbour distance of every test patch.

    distance: "squared" (the authors' code) or "l2" (the paper's eq. 10).
    parallel: shard the bank over all devices (`parallel.nearest`); same values.
    search: how the nearest patch is found (`SEARCHES`; all give the same values); the sharded
      search is exact.
    """
    check_distance(distance)
    t, p, d = feats_TxPxD.shape
    if parallel:
        dist, idx = parallel_lib.nearest(feats_TxPxD.reshape(t * p, d), bank.feats_MxD, chunk_size)
        return _weigh(bank.weights_M, idx, dist, distance).reshape(t, p)
    mode = resolve_search(search)
    if mode != "exact":
        query = feats_TxPxD.reshape(t * p, d)
        centre = ops.mean_row(bank.feats_MxD)
        dist, idx, fell_back = nearest_certified(
            query, bank.feats_MxD, chunk_size, centre, emulate=mode == "emulated"
        )
        logging.debug("certified search: %d of %d queries searched exactly", fell_back, t * p)
        return _weigh(bank.weights_M, idx, dist, distance).reshape(t, p)
    return _patch_scores(bank, feats_TxPxD, ops.mean_row(bank.feats_MxD), chunk_size, distance)


_weigh = jax.jit(weigh, static_argnames=("distance",))


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage.gaussian_filter's 1-D kernel: radius int(truncate*sigma + 0.5), normalised."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(maps_TxHxW: jax.Array, sigma: float) -> jax.Array:
    """scipy.ndimage.gaussian_filter(map, sigma) per map (mode 'reflect' = numpy 'symmetric')."""
    if sigma <= 0:
        return maps_TxHxW
    k = jnp.asarray(gaussian_kernel(sigma))
    r = (k.shape[0] - 1) // 2

    def blur_axis(x, axis):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (r, r)
        xp = jnp.pad(x, pad, mode="symmetric")
        n = x.shape[axis]
        out = jnp.zeros_like(x)
        for i in range(k.shape[0]):  # static taps: exact, no TF32 convolution on GPUs
            out = out + k[i] * jax.lax.slice_in_dim(xp, i, i + n, axis=axis)
        return out

    return blur_axis(blur_axis(maps_TxHxW, 1), 2)


@functools.partial(jax.jit, static_argnames=("grid", "image_size", "sigma"))
def anomaly_maps(
    scores_TxP: jax.Array, grid: tuple[int, int], image_size: tuple[int, int], sigma: float
) -> jax.Array:
    """Patch scores [T, h*w] -> pixel maps [T, H, W]: bilinear upsample, then Gaussian blur."""
    t = scores_TxP.shape[0]
    up = embedding.resize_bilinear(scores_TxP.reshape(t, *grid, 1), *image_size)[..., 0]
    return gaussian_blur(up, sigma)


# On CPU the [chunk, M] distance block is kept near cache size rather than as large as memory allows:
# measured on a 2-core EPYC (32 MB L3; 12,544 queries, D=1024, interleaved, under load), the
# search ran fastest with 5-10 MB blocks: M=10,000: 6.8 s at 128-256 rows against 8.9 s in one
# 12,544-row chunk (625 MB); M=2,000: 1.5 s at 256-1,024 rows against 1.7 s (launch/bench stage
# "scoring" prints both). Indices are identical for every chunk size; distances are bitwise equal
# across chunked runs and differ from a single unchunked call by float32 rounding only.
CPU_BLOCK_BYTES = 8 << 20


def chunk_size_for(bank_size: int, platform: str | None = None) -> int:
    """Test patches per chunk: the [chunk, M] distance block stays within free memory and, on CPU,
    within `CPU_BLOCK_BYTES` (a power of two, at least 256)."""
    rows = min(ops.chunk_rows(bytes_per_row=12 * bank_size), 65536)
    if (platform or jax.default_backend()) == "cpu":
        rows = min(rows, ops.chunk_rows(4 * bank_size, budget_bytes=CPU_BLOCK_BYTES, fraction=1.0))
    return max(256, rows)


def balanced(chunk: int, queries: int) -> int:
    """The size of `chunk` or fewer rows that splits `queries` into as many chunks as `chunk` does,
    all equal, so the last chunk of `ops.chunked_map` repeats no rows: one image of 784 patches in
    chunks of 512 runs as 2 x 392 rows, not 2 x 512 (measured: 0.17 s against 0.22 s for both banks
    of the deploy demo's model on CPU)."""
    if queries <= chunk:
        return chunk
    num = -(-queries // chunk)
    return -(-queries // num)


def image_segments(t: int, p: int, chunk_size: int, count: int = 20) -> list[tuple[int, int]]:
    """[lo, hi) ranges of test images, all of one length, for scoring with progress: ~`count` of
    them, the last shifted back to end at T (overlapping the one before). Each holds at least two
    search chunks, so every chunk has the whole search's shape and runs in its loop (`ops.chunked_map`),
    and each patch's score keeps its bits; [(0, T)] when T is too small to split."""
    s = max(-(-t // count), -(-2 * chunk_size // p))
    if s >= t:
        return [(0, t)]
    return [(min(lo, t - s), min(lo, t - s) + s) for lo in range(0, t, s)]


def in_segments(fn: Callable, feats_TxPxD, chunk_size: int, progress: Callable | None):
    """fn(feats) -> a pytree of [T, ...] arrays, run on the segments of `image_segments` with
    progress(images newly scored) after each (a host round trip each); one call without progress."""
    if progress is None:
        return fn(feats_TxPxD)
    t, p = feats_TxPxD.shape[:2]
    parts, done = [], 0
    for lo, hi in image_segments(t, p, chunk_size):
        out = jax.block_until_ready(fn(feats_TxPxD[lo:hi]))
        parts.append(jax.tree.map(lambda a, cut=done - lo: a[cut:], out))
        progress(hi - done)
        done = hi
    return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)


@dataclasses.dataclass(frozen=True)
class Options:
    """How a pair of banks scores test patches (the driver builds it from `config.scoring`).

    distance: "squared" (the authors' code) or "l2" (the paper's eq. 10).
    search: how the nearest memory patch is found (`SEARCHES`); the same values whichever.
    blur_sigma: the maps' Gaussian blur. chunk_size: test patches per search chunk; 0 = sized
      from memory (`chunk_size_for`).
    """

    distance: str = "squared"
    search: str = "exact"
    blur_sigma: float = 4.0
    chunk_size: int = 0


def _compose(
    scorer: Callable[[jax.Array], dict[int, jax.Array]],
    chunk_size: int,
    banks: Mapping[str, Banks],
    feats_TxPxD: jax.Array,
    grid: tuple[int, int],
    image_size: tuple[int, int],
    blur_sigma: float,
    progress: Callable[[int], None] | None,
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """The one composition of bank pairs: `scorer(feats)` gives the patch scores [T, P] of every
    distinct memory bank (by `id`) among `banks`' pairs, run over the test set in segments
    (`in_segments`, the largest search chunk `chunk_size`); each distinct segmentation bank's
    scores become anomaly maps once. {name: (classification patch scores [T, P], maps [T, H, W])}."""
    patch = in_segments(scorer, feats_TxPxD, chunk_size, progress)
    maps = {
        i: anomaly_maps(patch[i], tuple(grid), tuple(image_size), float(blur_sigma))
        for i in dict.fromkeys(id(b.seg) for b in banks.values())
    }
    return {name: (patch[id(b.cls)], maps[id(b.seg)]) for name, b in banks.items()}


def _distinct(banks: Mapping[str, Banks]) -> dict[int, MemoryBank]:
    """Every memory bank among the pairs once, by identity (a bank shared by names or serving
    both roles is searched once)."""
    unique: dict[int, MemoryBank] = {}
    for b in banks.values():
        unique.setdefault(id(b.cls), b.cls)
        unique.setdefault(id(b.seg), b.seg)
    return unique


def score_banks(
    banks: Banks,
    feats_TxPxD: jax.Array,
    grid: tuple[int, int],
    image_size: tuple[int, int],
    options: Options = Options(),
    *,
    parallel: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """THE scoring composition of a pair of banks, for experiments, sweeps and deploy: the
    classification bank's patch scores [T, P] and the segmentation bank's anomaly maps [T, H, W]
    (a bank serving both is searched once). Image scores are the max of the first over the image's
    patches (`predict`; deploy takes it over the patches a tile owns).

    parallel: shard each memory bank over all devices for the search (`parallel.nearest`).
    progress: called on the host with the number of images scored after each of ~20 segments
      (`in_segments`; the same values as one call); the sharded search reports once, at the end.
    """
    kw = dict(distance=options.distance, parallel=parallel, search=options.search)
    unique = _distinct({"": banks})
    queries = feats_TxPxD.shape[0] * feats_TxPxD.shape[1]
    chunks = {
        i: options.chunk_size or balanced(chunk_size_for(b.feats_MxD.shape[0]), queries)
        for i, b in unique.items()
    }

    def scorer(feats):
        return {i: patch_scores(b, feats, chunks[i], **kw) for i, b in unique.items()}

    by_segment = None if parallel else progress
    out = _compose(
        scorer,
        max(chunks.values()),
        {"": banks},
        feats_TxPxD,
        grid,
        image_size,
        options.blur_sigma,
        by_segment,
    )
    if parallel and progress is not None:
        progress(feats_TxPxD.shape[0])
    return out[""]


def score_many(
    banks: Mapping[str, Banks],
    feats_TxPxD: jax.Array,
    grid: tuple[int, int],
    image_size: tuple[int, int],
    options: Options = Options(),
    *,
    vmap: bool = False,
    parallel: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{name: (classification patch scores [T, P], anomaly maps [T, H, W])}: `score_banks` for
    each pair of `banks`, or (`vmap`) the same composition with the distinct banks of equal size
    searched in one vmapped call.

    A sweep's banks from one noisy training set differ only in array values (tau thresholds,
    discriminator subsets, patch- or image-level removal), so stacking them costs one search per
    size; a bank shared by several names is searched once. The vmapped search is the exact one
    (every `options.search` gives its values); `parallel` is for one pair at a time only.
    progress: images scored, T per pair one at a time; T in all with `vmap`.
    """
    if not vmap:
        return {
            name: score_banks(
                b, feats_TxPxD, grid, image_size, options, parallel=parallel, progress=progress
            )
            for name, b in banks.items()
        }
    by_size: dict[int, list[int]] = {}
    unique = _distinct(banks)
    for i, bank in unique.items():
        by_size.setdefault(int(bank.feats_MxD.shape[0]), []).append(i)
    groups = []  # (bank ids, stacked banks, chunk, the vmapped scoring of their patches)
    for m, ids in by_size.items():
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[unique[i] for i in ids])
        chunk = options.chunk_size or chunk_size_for(m * len(ids))
        fn = functools.partial(patch_scores, chunk_size=chunk, distance=options.distance)
        groups.append((ids, stacked, chunk, jax.vmap(fn, in_axes=(0, None))))

    def scorer(feats):
        return {i: s for ids, st, _, fn in groups for i, s in zip(ids, fn(st, feats))}

    chunk = max(g[2] for g in groups)
    return _compose(
        scorer, chunk, banks, feats_TxPxD, grid, image_size, options.blur_sigma, progress
    )


def predict(
    banks: Banks,
    feats_TxPxD: jax.Array,
    grid: tuple[int, int],
    image_size: tuple[int, int],
    blur_sigma: float = 4.0,
    chunk_size: int = 0,
    *,
    distance: str = "squared",
    parallel: bool = False,
    search: str = "exact",
    progress: Callable[[int], None] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Library API: image scores [T] and anomaly maps [T, H, W] for test features [T, P, D]
    (`score_banks`, then the max over each image's patches)."""
    options = Options(distance, search, blur_sigma, chunk_size)
    cls_scores, maps = score_banks(
        banks, feats_TxPxD, grid, image_size, options, parallel=parallel, progress=progress
    )
    return jnp.max(cls_scores, axis=1), maps
