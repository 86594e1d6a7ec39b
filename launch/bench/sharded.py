"""The parallel stage: each sharded stage (discriminators, coreset, scoring) against its one-device
function on the same arrays, timed, and checked bitwise equal (softpatch_jax/parallel.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from launch.bench.inputs import coreset_size, synthetic_pool
from launch.bench.timing import timed
from softpatch_jax import coreset, discriminators, memory_bank, parallel, scoring


def sharded_vs_one_device(args, key, n: int, p: int) -> dict:
    """Each sharded stage against its one-device function on the same arrays: time and equality."""
    devices = jax.device_count()
    pool = synthetic_pool(key, n, p, args.r)
    names = discriminators.NAMES
    chunk = discriminators.chunk_size_for(n, args.r)
    out = {"devices": devices}
    params = {"lof_k": args.lof_k}
    one = lambda: discriminators.score_pool(pool, names, params, chunk, key=key)
    many = lambda: parallel.discriminator_scores(pool, names, params, chunk, key=key)
    out["discriminators"] = _compare(one, many, args.repeats)
    flat = pool.reshape(n * p, args.r)
    keep = jax.random.uniform(jax.random.fold_in(key, 1), (n * p,)) > 0.15
    starts = coreset.draw_starts(jax.random.fold_in(key, 2), n * p, 128)
    m = coreset_size(args, n, p)
    out["coreset"] = _compare(
        lambda: coreset.greedy(flat, keep, starts, num_samples=m),
        lambda: parallel.greedy(flat, keep, starts, num_samples=m),
        args.repeats,
    )
    bank = memory_bank.MemoryBank(
        jax.random.normal(key, (m, args.d)), jnp.ones((m,), jnp.float32), jnp.arange(m)
    )
    test = jax.random.normal(jax.random.fold_in(key, 3), (args.test_images, p, args.d))
    sc = scoring.chunk_size_for(m)
    out["scoring"] = _compare(
        lambda: scoring.patch_scores(bank, test, sc),
        lambda: scoring.patch_scores(bank, test, sc, parallel=True),
        args.repeats,
    )
    out["notes"] = (
        ", ".join(
            f"{k} {out[k]['speedup']:.2f}x eq={out[k]['bitwise_equal']}"
            for k in ("discriminators", "coreset", "scoring")
        )
        + f" on {devices} devices"
    )
    return out


def _compare(one, many, repeats: int) -> dict:
    a, b = timed(one, repeats), timed(many, repeats)
    # One at a time: a one-device program still queued on device 0 while the sharded one waits in
    # a collective can starve XLA CPU's thread pool (see softpatch_jax/parallel.py).
    x = jax.block_until_ready(one())
    y = jax.block_until_ready(many())
    equal = all(
        np.array_equal(np.asarray(u), np.asarray(v))
        for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y))
    )
    return {
        "one_device_s": a["seconds"],
        "sharded_s": b["seconds"],
        "speedup": a["seconds"] / b["seconds"],
        "bitwise_equal": equal,
    }
