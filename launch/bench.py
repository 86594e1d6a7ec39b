"""Benchmark of every heavy stage on synthetic arrays of the real shapes (METHOD.md sections 2-5):
feature extraction (backbone + embedding, RANDOM-INIT weights: timing only), the three
discriminators, the greedy coreset (per-step time against the memory-bandwidth bound, and the ops of
the compiled loop body that read the pool), nearest-neighbour scoring, anomaly maps, end to end
(fit + predict), and with several devices the sharded stages against one device.

Each stage runs once to compile, then --repeats times under block_until_ready; the median is shown
with the stage's peak memory: the process's peak resident set (VmHWM, reset before each stage) on
CPU, the device's peak_bytes_in_use on accelerators. A table goes to stdout, everything to --out.

  python -m launch.bench                                   # N=200, P=784, D=1024, R=128
  python -m launch.bench --reference_impl                  # + the reference's loops, same arrays
  python -m launch.bench --host_devices=8 --stages=parallel
  python -m launch.bench --n=5000 --stages=end_to_end --source=lazy --coreset_steps=200

--reference_impl times the reference algorithm on the same arrays, re-implemented here with the
authors' loop structure and labelled so: scikit-learn's LocalOutlierFactor fitted position by
position, and a greedy coreset in torch that reads each step's argmax back to the host (.item()).
With --reference_path=CHECKOUT (the authors' published code, outside this repository) both are
theirs: the coreset is their src/sampler.py, and the LOF is their SoftPatch._compute_lof, read out of
src/softpatch.py and run on its own (the module's imports, faiss among them, are not needed for it),
on the [P, N, R] torch tensor their _compute_patch_weight hands it.

--source says how end_to_end gets its training features: "device" (one array), "host" (a numpy
array in --store_dtype) or "lazy" (generated per image on demand, standing in for an extractor or a
disk store: the [N, P, D] tensor never exists whole; at N=5000, P=784 it is 16 GB in float32).
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    a = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    a.add_argument("--n", default="200", help="training images N, comma-separated")
    a.add_argument("--p", default="784", help="positions P, a square (784: 224 input; 4096: 512)")
    a.add_argument("--d", type=int, default=1024, help="feature dimension D")
    a.add_argument("--r", type=int, default=128, help="projection R")
    a.add_argument("--lof_k", type=int, default=6)
    a.add_argument("--test_images", type=int, default=8, help="T for scoring, maps, predict")
    a.add_argument("--coreset_ratio", type=float, default=0.01, help="bench default; method: 0.1")
    a.add_argument("--coreset_steps", type=int, default=0, help=">0: this coreset size instead")
    a.add_argument("--repeats", type=int, default=3)
    a.add_argument("--stages", default="features,discriminators,coreset,scoring,maps,end_to_end")
    a.add_argument("--arch", default="wide_resnet50_2")
    a.add_argument("--image_size", type=int, default=224)
    a.add_argument("--feature_images", type=int, default=8)
    a.add_argument("--batch_size", type=int, default=8)
    a.add_argument("--method", default="softpatch_plus", help="end_to_end method")
    a.add_argument("--source", default="device", choices=("device", "host", "lazy"))
    a.add_argument("--store_dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    a.add_argument("--reference_impl", action="store_true")
    a.add_argument("--reference_path", default="", help="checkout of the authors' SoftPatch code")
    a.add_argument("--reference_positions", type=int, default=0, help=">0: LOF on a subset, scaled")
    a.add_argument("--reference_coreset_steps", type=int, default=200)
    a.add_argument("--host_devices", type=int, default=0, help="CPU: split the host into devices")
    a.add_argument("--bandwidth_mib", type=int, default=512)
    a.add_argument("--out", default="/tmp/softpatch_bench.json")
    a.add_argument("--seed", type=int, default=0)
    return a.parse_args(argv)


# JAX fixes its device count when it starts, so --host_devices acts before the imports below.
if __name__ == "__main__":
    _host = parse_args().host_devices
    if _host:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_host}"
        )
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import contextlib  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import base  # noqa: E402
from softpatch_jax import (  # noqa: E402
    coreset,
    discriminators,
    embedding,
    memory_bank,
    methods,
    models,
    ops,
    parallel,
    scoring,
)
from softpatch_jax.io_utils import split_list, write_json  # noqa: E402

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}


# --- measuring -----------------------------------------------------------------------------------


def _reset_peak() -> None:
    """Resets the kernel's peak-RSS mark (VmHWM) so the next reading covers one stage only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_bytes() -> dict:
    out = {"process_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    try:
        with open("/proc/self/status") as f:
            hwm = [ln for ln in f if ln.startswith("VmHWM:")]
        out["stage_peak_rss_gb"] = int(hwm[0].split()[1]) / 2**20
    except (OSError, IndexError):
        pass
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_gb"] = stats["peak_bytes_in_use"] / 2**30
    return out


def timed(fn, repeats: int) -> dict:
    """First call (compile + run), then the median of `repeats` calls, and the stage's peak memory."""
    _reset_peak()
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"seconds": med, "first_call_s": first, "times": times, **_peak_bytes()}


# --- synthetic inputs ----------------------------------------------------------------------------


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

    def image(self, i: int) -> np.ndarray:
        noise = np.random.default_rng([self.seed, 0, i]).standard_normal(self.shape[1:], np.float32)
        return (self.base + noise).astype(self.dtype)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return np.stack([self.image(i) for i in range(*index.indices(self.shape[0]))])
        return self.image(int(index))


def grid_of(p: int) -> tuple[int, int]:
    h = round(p**0.5)
    return (h, h) if h * h == p else (1, p)


def coreset_size(args, n: int, p: int) -> int:
    return args.coreset_steps or max(1, int(args.coreset_ratio * n * p))


# --- stages --------------------------------------------------------------------------------------


def bench_features(args, key) -> dict:
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
    out_shape = jax.eval_shape(apply, batches[0]).shape
    return {
        **res,
        "weights": "random-init",
        "arch": args.arch,
        "images": images,
        "images_per_s": images / res["seconds"],
        "out_shape": list(out_shape),
    }


def bench_discriminators(args, key, n: int, p: int) -> dict:
    pool = synthetic_pool(key, n, p, args.r)
    names = discriminators.NAMES
    fn = lambda: memory_bank.discriminator_scores(pool, names, args.lof_k, 0.01)
    res = timed(fn, args.repeats)
    res["chunk_positions"] = discriminators.chunk_size_for(n, args.r)
    for name in names:  # each alone, for the table's breakdown
        one = lambda name=name: memory_bank.discriminator_scores(pool, (name,), args.lof_k, 0.01)
        res[f"{name}_s"] = timed(one, args.repeats)["seconds"]
    if jax.device_count() > 1:  # positions sharded over the devices, as parallel.enabled does
        sharded = lambda: memory_bank.discriminator_scores(
            pool, names, args.lof_k, 0.01, parallel=True
        )
        res["sharded_s"] = timed(sharded, args.repeats)["seconds"]
        res["sharded_devices"] = jax.device_count()
    if args.reference_impl:
        res["reference"] = reference_lof(args, np.asarray(pool), np.asarray(fn()["lof"]))
        res["reference"]["speedup_all3_vs_sklearn_lof"] = (
            res["reference"]["seconds"] / res["seconds"]
        )
        if "sharded_s" in res:
            res["reference"]["speedup_sharded_vs_sklearn_lof"] = (
                res["reference"]["seconds"] / res["sharded_s"]
            )
    return res


def authors_function(path: str, cls: str, name: str):
    """`cls.name` from the authors' file at `path`, compiled on its own: the module-level imports it
    does not use (faiss, their backbones) are never run. Its globals are torch, numpy and
    scikit-learn's LocalOutlierFactor, which is what the method body calls."""
    import ast

    import torch
    from sklearn.neighbors import LocalOutlierFactor

    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = [
        node
        for top in tree.body
        if isinstance(top, ast.ClassDef) and top.name == cls
        for node in top.body
        if isinstance(node, ast.FunctionDef) and node.name == name
    ]
    if not found:
        raise ValueError(f"{path}: no method {cls}.{name} (is --reference_path the authors' code?)")
    scope = {"torch": torch, "np": np, "LocalOutlierFactor": LocalOutlierFactor}
    exec(compile(ast.Module(found, type_ignores=[]), path, "exec"), scope)
    return scope[name]


def reference_lof(args, pool_NxPxR: np.ndarray, ours_NxP: np.ndarray) -> dict:
    """The reference's LOF, one scikit-learn fit per position on the host: the authors' own method
    with --reference_path, else a re-implementation of it."""
    n, p, _ = pool_NxPxR.shape
    todo = min(p, args.reference_positions or p)
    if args.reference_path:
        import torch

        src = os.path.join(args.reference_path, "src", "softpatch.py")
        compute_lof = authors_function(src, "SoftPatch", "_compute_lof")
        # Their _compute_patch_weight permutes [N, P, R] features to [P, N, R] before the call.
        feats = torch.from_numpy(np.array(pool_NxPxR[:, :todo])).permute(1, 0, 2)
        impl = f"authors' SoftPatch._compute_lof from {src}"
        t0 = time.perf_counter()
        lof = compute_lof(None, args.lof_k, feats).numpy()  # self is unused
    else:
        from sklearn.neighbors import LocalOutlierFactor

        clf = LocalOutlierFactor(n_neighbors=args.lof_k, metric="l2")
        lof = np.empty((todo, n), np.float32)
        impl = "re-implementation: sklearn LocalOutlierFactor fitted per position"
        t0 = time.perf_counter()
        for pos in range(todo):
            clf.fit(pool_NxPxR[:, pos])
            lof[pos] = -clf.negative_outlier_factor_
    seconds = (time.perf_counter() - t0) * p / todo
    rel = np.abs(lof - ours_NxP[:, :todo].T) / np.abs(lof)
    return {
        "impl": impl,
        "positions_run": todo,
        "seconds": seconds,
        "scaled_from_subset": todo < p,
        # Float32 near-ties at the k-th neighbour (distances equal to ~1e-8 relative) can swap a
        # neighbour and move a LOF by ~1e-3 relative; everywhere else they agree to ~1e-6.
        "lof_max_rel_diff_vs_ours": float(rel.max()),
        "lof_frac_within_1e-4": float(np.mean(rel < 1e-4)),
    }


def loop_body_reads(prepared, keep, m: int) -> dict:
    """The compiled coreset loop body's ops that take the [R, N] pool as an operand."""
    text = coreset.select.lower(prepared, keep, num_samples=m).compile().as_text()
    r, n = prepared.x_RxN.shape
    body_name = re.search(r"while\(.*?body=%?([\w.\-]+)", text)
    if body_name is None:
        return {"parsed": False}
    start = text.index(body_name.group(1) + " ")
    block = text[start : text.index("\n}", start)]
    shape = f"f32[{r},{n}]"
    big = {
        m_.group(1)
        for m_ in re.finditer(
            r"%([\w.\-]+) = " + re.escape(shape) + r"\S* get-tuple-element", block
        )
    }
    readers = []
    for line in block.splitlines():
        mm = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\((.*)", line)
        if mm and mm.group(2) not in ("tuple", "get-tuple-element"):
            if any(f"%{b}" in mm.group(3) for b in big):
                readers.append(f"{mm.group(2)} {mm.group(1)}")
    return {"parsed": True, "ops_reading_pool": readers, "ops_in_body": block.count(" = ")}


def bandwidth(mib: int) -> dict:
    """Achievable memory bandwidth (GB/s) by a few streaming kernels on the first device."""
    n = (mib << 20) // 4
    x = jnp.ones((n,), jnp.float32)
    out = {}
    s = jax.jit(jnp.sum)
    out["jnp_sum_read"] = 4 * n / timed(lambda: s(x), 5)["seconds"] / 1e9
    scale = jax.jit(lambda a: a * 1.0001, donate_argnums=0)
    box = [jnp.ones((n,), jnp.float32)]

    def in_place():
        box[0] = scale(box[0])
        return box[0]

    out["jnp_scale_in_place_read_write"] = 8 * n / timed(in_place, 5)["seconds"] / 1e9
    mat = x.reshape(128, n // 128)
    c = jnp.ones((128,), jnp.float32)
    vm = jax.jit(ops.matmul)
    out["jnp_vecmat_read"] = 4 * n / timed(lambda: vm(c, mat), 5)["seconds"] / 1e9
    host = np.ones((n,), np.float32)
    t0 = time.perf_counter()
    for _ in range(5):
        host.sum()
    out["numpy_sum_read"] = 4 * n * 5 / (time.perf_counter() - t0) / 1e9
    out["best_generic"] = max(out["jnp_sum_read"], out["jnp_scale_in_place_read_write"])
    return out


def bench_coreset(args, key, n: int, p: int) -> dict:
    pool = synthetic_pool(key, n, p, args.r).reshape(n * p, args.r)
    keep = jax.random.uniform(jax.random.fold_in(key, 1), (n * p,)) > 0.15
    starts = coreset.draw_starts(jax.random.fold_in(key, 2), n * p, 128)
    m = coreset_size(args, n, p)
    prep = timed(lambda: coreset.prepare(pool, starts), args.repeats)
    prepared = coreset.prepare(pool, starts)
    res = timed(lambda: coreset.select(prepared, keep, num_samples=m), args.repeats)
    short = max(1, m // 10)
    t_short = timed(lambda: coreset.select(prepared, keep, num_samples=short), args.repeats)
    step = (res["seconds"] - t_short["seconds"]) / (m - short) if m > short else res["seconds"] / m
    pool_bytes = n * p * args.r * 4
    vec_bytes = n * p * 4 * 4  # squared norms, min-distance read + write, argmax read
    bw = bandwidth(args.bandwidth_mib)
    bound = (pool_bytes + vec_bytes) / (bw["best_generic"] * 1e9)
    return {
        **res,
        "prepare_s": prep["seconds"],
        "samples": m,
        "step_s": step,
        "bytes_per_step": pool_bytes + vec_bytes,
        "bandwidth_gb_s": bw,
        "bound_step_s": bound,
        "step_over_bound": step / bound,
        "step_over_vecmat_bound": step / ((pool_bytes + vec_bytes) / (bw["jnp_vecmat_read"] * 1e9)),
        "loop_body": loop_body_reads(prepared, keep, m),
        **(
            {"reference": reference_coreset(args, np.asarray(pool), step)}
            if args.reference_impl
            else {}
        ),
    }


def reference_coreset(args, pool: np.ndarray, our_step: float) -> dict:
    """The reference's greedy loop in torch, host-synced every step; per-step time."""
    import torch

    steps = args.reference_coreset_steps
    feats = torch.from_numpy(np.array(pool))  # writable copy for torch
    if args.reference_path:
        sys.path.insert(0, os.path.join(args.reference_path, "src"))
        import sampler  # the authors' file, from the user's checkout

        s = sampler.ApproximateGreedyCoresetSampler(steps / len(feats), torch.device("cpu"))
        impl = f"authors' src/sampler.py from {args.reference_path}"
        run = lambda: s._compute_greedy_coreset_indices(feats)
    else:
        impl = "re-implementation: torch loop, argmax read to host with .item() every step"

        def run():
            starts = np.random.default_rng(0).choice(len(feats), 10, replace=False)
            sq = (feats * feats).sum(1, keepdim=True)
            with torch.no_grad():
                d = (sq + sq[starts].T - 2 * feats @ feats[starts].T).clamp(min=0).sqrt()
                anchor = d.mean(1, keepdim=True)
                picked = []
                for _ in range(steps):
                    j = torch.argmax(anchor).item()
                    picked.append(j)
                    dj = (sq + sq[j] - 2 * feats @ feats[j : j + 1].T).clamp(min=0).sqrt()
                    anchor = torch.min(torch.cat([anchor, dj], 1), 1).values.reshape(-1, 1)
            return picked

    t0 = time.perf_counter()
    run()
    total = time.perf_counter() - t0
    return {
        "impl": impl,
        "steps": steps,
        "step_s": total / steps,
        "speedup_per_step": total / steps / our_step,
        "torch_threads": torch.get_num_threads(),
    }


def bench_scoring(args, key, n: int, p: int) -> dict:
    m = coreset_size(args, n, p)
    k1, k2 = jax.random.split(key)
    bank = memory_bank.MemoryBank(
        jax.random.normal(k1, (m, args.d)), jnp.ones((m,), jnp.float32), jnp.arange(m)
    )
    test = jax.random.normal(k2, (args.test_images, p, args.d))
    chunk = scoring.chunk_size_for(m)
    res = timed(lambda: scoring.patch_scores(bank, test, chunk), args.repeats)
    return {**res, "bank_size": m, "query_patches": args.test_images * p, "chunk": chunk}


def bench_maps(args, key, n: int, p: int) -> dict:
    grid = grid_of(p)
    size = (grid[0] * 8, grid[1] * 8)
    s = jax.random.uniform(key, (args.test_images, p))
    res = timed(lambda: scoring.anomaly_maps(s, grid, size, 4.0), args.repeats)
    return {**res, "maps": args.test_images, "image_size": list(size)}


def make_features(args, n: int, p: int, store_dtype: str | None = None):
    """Training features in the store dtype, generated image by image (never a float32 copy)."""
    lazy = LazyFeatures(n, p, args.d, DTYPES[store_dtype or args.store_dtype], args.seed)
    if args.source == "lazy":
        return lazy
    feats = lazy[0:n]
    return feats if args.source == "host" else jnp.asarray(feats)


def end_to_end_config(args, n: int, p: int):
    cfg = base.get_config()
    cfg.softpatch.lof_k = args.lof_k
    cfg.softpatch.projection_dim = args.r
    # --coreset_steps fixes the coreset size through the ratio (int(ratio * N * P) samples).
    cfg.coreset.ratio = (
        (args.coreset_steps + 0.5) / (n * p) if args.coreset_steps else args.coreset_ratio
    )
    return cfg


def bench_end_to_end(args, key, n: int, p: int) -> dict:
    """fit_many (one method) + predict on T test images, with the fit's own stage timings."""
    _reset_peak()
    feats = make_features(args, n, p)
    test = jnp.asarray(LazyFeatures(args.test_images, p, args.d, np.float32, args.seed + 1)[:])
    cfg = end_to_end_config(args, n, p)
    spec = methods.spec(args.method, cfg.softpatch)
    grid = grid_of(p)
    stages: dict[str, float] = {}

    @contextlib.contextmanager
    def timer(stage):
        t0 = time.perf_counter()
        yield
        stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - t0

    def run(timer_=memory_bank._null_timer):
        fitted = memory_bank.fit_many(key, feats, cfg, [spec], timer=timer_)
        banks = fitted.banks[spec.name]
        return scoring.predict(banks, test, grid, (grid[0] * 8, grid[1] * 8), 4.0), banks

    reps = max(1, args.repeats if args.source == "device" else 1)
    res = timed(lambda: run()[0], reps - 1) if reps > 1 else {}
    stages.clear()
    t0 = time.perf_counter()
    (scores, _maps), banks = run(timer)
    jax.block_until_ready(scores)
    last = time.perf_counter() - t0
    if not res:
        res = {"seconds": last, "first_call_s": last, "times": [last]}
    res.update(_peak_bytes())
    out = {
        **res,
        "method": args.method,
        "source": args.source,
        "store_dtype": args.store_dtype,
        "bank_sizes": [int(banks.cls.feats_MxD.shape[0]), int(banks.seg.feats_MxD.shape[0])],
        "fit_stages_s": stages,
        "resident_pool_gb": n * p * args.r * 4 / 2**30,
        "stored_features_gb": n * p * args.d * np.dtype(DTYPES[args.store_dtype]).itemsize / 2**30,
        "full_features_f32_gb": n * p * args.d * 4 / 2**30,
    }
    if args.store_dtype != "float32" and args.source != "lazy":
        ref_feats = make_features(args, n, p, "float32")
        ref = memory_bank.fit_many(key, ref_feats, cfg, [spec]).banks[spec.name]
        ref_scores, _ = scoring.predict(ref, test, grid, (grid[0] * 8, grid[1] * 8), 4.0)
        same = np.intersect1d(np.asarray(ref.cls.index_M), np.asarray(banks.cls.index_M)).size
        out["vs_float32"] = {
            "bank_overlap": same / ref.cls.index_M.shape[0],
            "image_score_max_rel_diff": float(
                np.max(np.abs(np.asarray(scores) - np.asarray(ref_scores)) / np.asarray(ref_scores))
            ),
        }
    return out


def bench_parallel(args, key, n: int, p: int) -> dict:
    """Each sharded stage against its one-device function on the same arrays: time and equality."""
    devices = jax.device_count()
    pool = synthetic_pool(key, n, p, args.r)
    names = discriminators.NAMES
    chunk = discriminators.chunk_size_for(n, args.r)
    out = {"devices": devices}
    one = lambda: discriminators.score_pool(pool, names, args.lof_k, 0.01, chunk)
    many = lambda: parallel.discriminator_scores(pool, names, args.lof_k, 0.01, chunk)
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


STAGES = {
    "discriminators": bench_discriminators,
    "coreset": bench_coreset,
    "scoring": bench_scoring,
    "maps": bench_maps,
    "end_to_end": bench_end_to_end,
    "parallel": bench_parallel,
}


# --- driver --------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    lines = [
        "| stage | N | P | median s | first call s | peak RSS GB | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r.get('n', '-')} | {r.get('p', '-')} | {r.get('seconds', 0):.3f} | "
            f"{r.get('first_call_s', 0):.2f} | {r.get('stage_peak_rss_gb', 0):.2f} | {r['notes']} |"
        )
    return "\n".join(lines)


def notes(stage: str, r: dict) -> str:
    if stage == "features":
        return f"{r['arch']} RANDOM-INIT, {r['images_per_s']:.2f} img/s, out {r['out_shape']}"
    if stage == "discriminators":
        s = ", ".join(f"{k}_s={r[k + '_s']:.2f}" for k in discriminators.NAMES)
        if "sharded_s" in r:
            s += f"; sharded over {r['sharded_devices']} devices {r['sharded_s']:.3f}s"
        if "reference" in r:
            ref = r["reference"]
            who = "authors'" if ref["impl"].startswith("authors'") else "re-implemented"
            s += f"; {who} sklearn LOF loop {ref['seconds']:.1f}s"
            s += f" = {ref['speedup_all3_vs_sklearn_lof']:.1f}x"
            if "speedup_sharded_vs_sklearn_lof" in ref:
                s += f" ({ref['speedup_sharded_vs_sklearn_lof']:.1f}x sharded)"
        return s
    if stage == "coreset":
        s = (
            f"M={r['samples']}, {1e3 * r['step_s']:.2f} ms/step = {r['step_over_bound']:.2f}x "
            f"bandwidth bound ({r['bandwidth_gb_s']['best_generic']:.1f} GB/s), "
            f"prepare {r['prepare_s']:.2f}s"
        )
        if "reference" in r:
            s += f"; torch ref {1e3 * r['reference']['step_s']:.2f} ms/step"
        return s
    if stage == "scoring":
        return f"bank {r['bank_size']}, {r['query_patches']} queries"
    if stage == "maps":
        return f"{r['maps']} maps at {r['image_size']}"
    if stage == "end_to_end":
        st = ", ".join(f"{k} {v:.1f}s" for k, v in r["fit_stages_s"].items())
        return f"{r['method']} {r['source']} {r['store_dtype']}, banks {r['bank_sizes']}; {st}"
    if stage == "parallel":
        return (
            ", ".join(
                f"{k} {r[k]['speedup']:.2f}x eq={r[k]['bitwise_equal']}"
                for k in ("discriminators", "coreset", "scoring")
            )
            + f" on {r['devices']} devices"
        )
    return ""


def run(args: argparse.Namespace) -> dict:
    stages = split_list(args.stages)
    if stages == ["all"]:
        stages = ["features", *STAGES]
    bad = [s for s in stages if s not in STAGES and s != "features"]
    if bad:
        raise SystemExit(f"unknown stage(s) {bad}; valid: features, {', '.join(STAGES)}, all")
    key = jax.random.key(args.seed)
    rows = []
    if "features" in stages:
        rows.append({"stage": "features", **bench_features(args, key)})
    for n in [int(v) for v in args.n.split(",")]:
        for p in [int(v) for v in args.p.split(",")]:
            for stage in stages:
                if stage != "features":
                    res = STAGES[stage](args, jax.random.fold_in(key, n * 100003 + p), n, p)
                    rows.append({"stage": stage, "n": n, "p": p, **res})
    for r in rows:
        r["notes"] = notes(r["stage"], r)
    report = {
        "args": vars(args),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
        "weights": "random-init (feature stage times only)",
        "rows": rows,
    }
    write_json(args.out, report)
    print(table(rows), flush=True)
    print(f"\nwrote {args.out}", flush=True)
    return report


if __name__ == "__main__":
    run(parse_args())
