"""Stages timing one kernel each on synthetic arrays (METHOD.md sections 2-5): feature extraction
(backbone + embedding, RANDOM-INIT weights: timing only), the three discriminators, the greedy
coreset, nearest-neighbour scoring and anomaly maps. Each returns its figures and, last, its note
for the table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from launch.bench import hardware, reference
from launch.bench.inputs import coreset_size, grid_of, synthetic_pool
from launch.bench.timing import timed
from softpatch_jax import coreset, discriminators, embedding, memory_bank, models, scoring


def features(args, key) -> dict:
    """Backbone + patch embedding on uint8 images, batch padded to --batch_size (random init)."""
    spec = models.get_spec(args.arch)
    layers = spec.feature_layers
    module = models.build(args.arch, layers)
    variables = module.init(key, jnp.zeros((1, 64, 64, 3), jnp.float32))
    mean = jnp.asarray(spec.mean, jnp.float32) * 255.0
    std = jnp.asarray(spec.std, jnp.float32) * 255.0

    @jax.jit
    def apply(images):
        maps = module.apply(variables, (images.astype(jnp.float32) - mean) / std)
        return embedding.embed(maps, layers, 3, args.d, args.d)

    s = args.image_size
    rng = np.random.default_rng(args.seed)
    batches = [
        jnp.asarray(rng.integers(0, 255, (args.batch_size, s, s, 3), dtype=np.uint8))
        for _ in range(-(-args.feature_images // args.batch_size))
    ]
    res = timed(lambda: [apply(b) for b in batches], args.repeats)
    images = len(batches) * args.batch_size
    out_shape = list(jax.eval_shape(apply, batches[0]).shape)
    ips = images / res["seconds"]
    return {
        **res,
        "weights": "random-init",
        "arch": args.arch,
        "images": images,
        "images_per_s": ips,
        "out_shape": out_shape,
        "notes": f"{args.arch} RANDOM-INIT, {ips:.2f} img/s, out {out_shape}",
    }


def discriminator_scores(args, key, n: int, p: int) -> dict:
    pool = synthetic_pool(key, n, p, args.r)
    names = discriminators.NAMES
    fn = lambda: memory_bank.discriminator_scores(pool, names, {"lof_k": args.lof_k}, key=key)
    res = timed(fn, args.repeats)
    res["chunk_positions"] = discriminators.chunk_size_for(n, args.r)
    for name in names:  # each alone, for the table's breakdown
        one = lambda name=name: memory_bank.discriminator_scores(
            pool, (name,), {"lof_k": args.lof_k}, key=key
        )
        res[f"{name}_s"] = timed(one, args.repeats)["seconds"]
    note = ", ".join(f"{k}_s={res[k + '_s']:.2f}" for k in names)
    if jax.device_count() > 1:  # positions sharded over the devices, as parallel.enabled does
        sharded = lambda: memory_bank.discriminator_scores(
            pool, names, {"lof_k": args.lof_k}, parallel=True, key=key
        )
        res["sharded_s"] = timed(sharded, args.repeats)["seconds"]
        res["sharded_devices"] = jax.device_count()
        note += f"; sharded over {res['sharded_devices']} devices {res['sharded_s']:.3f}s"
    if args.reference_impl:
        ref = res["reference"] = reference.lof(args, np.asarray(pool), np.asarray(fn()["lof"]))
        ref["speedup_all3_vs_sklearn_lof"] = ref["seconds"] / res["seconds"]
        who = "authors'" if ref["impl"].startswith("authors'") else "re-implemented"
        note += f"; {who} sklearn LOF loop {ref['seconds']:.1f}s"
        note += f" = {ref['speedup_all3_vs_sklearn_lof']:.1f}x"
        if "sharded_s" in res:
            ref["speedup_sharded_vs_sklearn_lof"] = ref["seconds"] / res["sharded_s"]
            note += f" ({ref['speedup_sharded_vs_sklearn_lof']:.1f}x sharded)"
    return {**res, "notes": note}


def greedy_coreset(args, key, n: int, p: int) -> dict:
    """The compiled greedy loop: per-step time against the memory-bandwidth bound, and the ops of
    its loop body that read the pool."""
    pool = synthetic_pool(key, n, p, args.r).reshape(n * p, args.r)
    keep = jax.random.uniform(jax.random.fold_in(key, 1), (n * p,)) > 0.15
    starts = coreset.draw_starts(jax.random.fold_in(key, 2), n * p, args.num_starts)
    m = coreset_size(args, n, p)
    prep = timed(lambda: coreset.prepare(pool, starts), args.repeats)
    prepared = coreset.prepare(pool, starts)
    res = timed(lambda: coreset.select(prepared, keep, num_samples=m), args.repeats)
    short = max(1, m // 10)
    t_short = timed(lambda: coreset.select(prepared, keep, num_samples=short), args.repeats)
    step = (res["seconds"] - t_short["seconds"]) / (m - short) if m > short else res["seconds"] / m
    pool_bytes = n * p * args.r * 4
    vec_bytes = n * p * 4 * 4  # squared norms, min-distance read + write, argmax read
    bw = hardware.bandwidth(args.bandwidth_mib)
    bound = (pool_bytes + vec_bytes) / (bw["best_generic"] * 1e9)
    out = {
        **res,
        "prepare_s": prep["seconds"],
        "samples": m,
        "step_s": step,
        "bytes_per_step": pool_bytes + vec_bytes,
        "bandwidth_gb_s": bw,
        "bound_step_s": bound,
        "step_over_bound": step / bound,
        "step_over_vecmat_bound": step / ((pool_bytes + vec_bytes) / (bw["jnp_vecmat_read"] * 1e9)),
        "loop_body": hardware.loop_body_reads(prepared, keep, m),
    }
    note = (
        f"M={m}, {1e3 * step:.2f} ms/step = {out['step_over_bound']:.2f}x "
        f"bandwidth bound ({bw['best_generic']:.1f} GB/s), prepare {out['prepare_s']:.2f}s"
    )
    if args.coreset_masks > 1:  # a tau sweep's masks, tau 0 .. 0.4, in one pass
        k = args.coreset_masks
        u = jax.random.uniform(jax.random.fold_in(key, 3), (n * p,))
        keeps = u[None, :] >= jnp.linspace(0.0, 0.4, k)[:, None]
        many = timed(lambda: coreset.select_many(prepared, keeps, m), args.repeats)
        out["masks"] = {
            "k": k,
            "seconds": many["seconds"],
            "over_one_mask": many["seconds"] / res["seconds"],
        }
        note += f"; {k} masks in one pass {many['seconds']:.2f}s = {out['masks']['over_one_mask']:.2f}x one"
    if args.reference_impl:
        out["reference"] = reference.coreset(args, np.asarray(pool), step)
        note += f"; torch ref {1e3 * out['reference']['step_s']:.2f} ms/step"
    return {**out, "notes": note}


def nn_scoring(args, key, n: int, p: int) -> dict:
    m = coreset_size(args, n, p)
    k1, k2 = jax.random.split(key)
    bank = memory_bank.MemoryBank(
        jax.random.normal(k1, (m, args.d)), jnp.ones((m,), jnp.float32), jnp.arange(m)
    )
    test = jax.random.normal(k2, (args.test_images, p, args.d))
    chunk = scoring.chunk_size_for(m)
    res = timed(lambda: scoring.patch_scores(bank, test, chunk), args.repeats)
    queries = args.test_images * p
    return {
        **res,
        "bank_size": m,
        "query_patches": queries,
        "chunk": chunk,
        "notes": f"bank {m}, {queries} queries",
    }


def anomaly_maps(args, key, n: int, p: int) -> dict:
    grid = grid_of(p)
    size = [grid[0] * 8, grid[1] * 8]
    s = jax.random.uniform(key, (args.test_images, p))
    res = timed(lambda: scoring.anomaly_maps(s, grid, tuple(size), 4.0), args.repeats)
    note = f"{args.test_images} maps at {size}"
    return {**res, "maps": args.test_images, "image_size": size, "notes": note}
