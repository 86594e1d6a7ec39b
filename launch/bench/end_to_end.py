"""The end-to-end stage: fit_many (one method) + predict on --test_images, with a per-stage breakdown
(host generation of the synthetic features, the fit's stages, predict), from training features on
the device, on the host or generated on demand (--source)."""

from __future__ import annotations

import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from launch.bench.inputs import STORE_DTYPES, LazyFeatures, grid_of, make_features
from launch.bench.timing import peak_bytes, reset_peak, timed
from softpatch_jax import memory_bank, methods, scoring
from softpatch_jax.experiment import options


def config(args, n: int, p: int):
    cfg = base.get_config()
    cfg.softpatch.lof_k = args.lof_k
    cfg.softpatch.projection_dim = args.r
    cfg.coreset.num_starts = args.num_starts
    # --coreset_steps fixes the coreset size through the ratio (int(ratio * N * P) samples).
    cfg.coreset.ratio = (
        (args.coreset_steps + 0.5) / (n * p) if args.coreset_steps else args.coreset_ratio
    )
    return cfg


def end_to_end(args, key, n: int, p: int) -> dict:
    """fit_many (one method) + predict on T test images, with the fit's own stage timings."""
    reset_peak()
    t0 = time.perf_counter()
    feats = jax.block_until_ready(make_features(args, n, p))
    generation_s = time.perf_counter() - t0  # lazy: nothing yet, generated inside the projection
    test = jnp.asarray(LazyFeatures(args.test_images, p, args.d, np.float32, args.seed + 1)[:])
    cfg = config(args, n, p)
    spec = methods.spec(args.method, options.method_options(cfg))
    grid = grid_of(p)
    stages: dict[str, float] = {}

    @contextlib.contextmanager
    def timer(stage):
        t0 = time.perf_counter()
        yield
        stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - t0

    def run(timer_=memory_bank._null_timer):
        fitted = memory_bank.fit_many(key, feats, options.fit_options(cfg), [spec], timer=timer_)
        banks = fitted.banks[spec.name]
        with timer_("predict"):
            out = scoring.predict(banks, test, grid, (grid[0] * 8, grid[1] * 8), 4.0)
            jax.block_until_ready(out)
        return out, banks

    reps = max(1, args.repeats if args.source == "device" else 1)
    res = timed(lambda: run()[0], reps - 1) if reps > 1 else {}
    stages.clear()
    made = feats.seconds if isinstance(feats, LazyFeatures) else 0.0
    t0 = time.perf_counter()
    (scores, _maps), banks = run(timer)
    jax.block_until_ready(scores)
    last = time.perf_counter() - t0
    if isinstance(feats, LazyFeatures):  # generated on demand: inside the projection's stream
        stages["of_which_host_generation"] = feats.seconds - made
    if not res:
        res = {"seconds": last, "first_call_s": last, "times": [last]}
    res.update(peak_bytes())
    itemsize = np.dtype(STORE_DTYPES[args.store_dtype]).itemsize
    out = {
        **res,
        "method": args.method,
        "source": args.source,
        "store_dtype": args.store_dtype,
        "bank_sizes": [int(banks.cls.feats_MxD.shape[0]), int(banks.seg.feats_MxD.shape[0])],
        "host_generation_s": generation_s,
        "stages_s": stages,  # where the time went, fit stages and predict
        "resident_pool_gb": n * p * args.r * 4 / 2**30,
        "stored_features_gb": n * p * args.d * itemsize / 2**30,
        "full_features_f32_gb": n * p * args.d * 4 / 2**30,
    }
    if args.store_dtype != "float32" and args.source != "lazy":
        ref_feats = make_features(args, n, p, "float32")
        ref = memory_bank.fit_many(key, ref_feats, options.fit_options(cfg), [spec]).banks[
            spec.name
        ]
        ref_scores, _ = scoring.predict(ref, test, grid, (grid[0] * 8, grid[1] * 8), 4.0)
        same = np.intersect1d(np.asarray(ref.cls.index_M), np.asarray(banks.cls.index_M)).size
        out["vs_float32"] = {
            "bank_overlap": same / ref.cls.index_M.shape[0],
            "image_score_max_rel_diff": float(
                np.max(np.abs(np.asarray(scores) - np.asarray(ref_scores)) / np.asarray(ref_scores))
            ),
        }
    st = ", ".join(f"{k} {v:.1f}s" for k, v in {"host_generation": generation_s, **stages}.items())
    out["notes"] = (
        f"{args.method} {args.source} {args.store_dtype}, banks {out['bank_sizes']}; {st}"
    )
    return out
