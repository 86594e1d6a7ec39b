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
  python -m launch.bench --n=1000 --p=4096 --stages=end_to_end --source=lazy   # scale, on device
  python -m launch.bench --stages=deploy_latency --deploy_model=MODEL --deploy_images=DIR \
      --reference_path=CHECKOUT        # one part at a time: launch/bench/latency.py

Compiled programs are cached across runs (softpatch_jax/compile_cache.py), so "first call s" is
compile + run only for programs not compiled before; --compile_cache=off restores that meaning.

The coreset stage times one mask and --coreset_masks masks in one pass (a tau sweep's: tau 0 to 0.4).
The end_to_end stage breaks its time down by stage: host generation of the synthetic features
(inside the projection's stream with --source=lazy), projection, discriminators, coreset, bank
gather and predict, with the stage's peak memory.

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

from absl import app, flags

from softpatch_jax import compile_cache

# In this order in the report's "args".
_FLAGS = [
    flags.DEFINE_string("n", "200", "training images N, comma-separated"),
    flags.DEFINE_string("p", "784", "positions P, a square (784: 224 input; 4096: 512)"),
    flags.DEFINE_integer("d", 1024, "feature dimension D"),
    flags.DEFINE_integer("r", 128, "projection R"),
    flags.DEFINE_integer("lof_k", 6, "LOF neighbours k"),
    flags.DEFINE_integer("test_images", 8, "T for scoring, maps, predict"),
    flags.DEFINE_float("coreset_ratio", 0.01, "bench default; method: 0.1"),
    flags.DEFINE_integer("coreset_steps", 0, ">0: this coreset size instead"),
    flags.DEFINE_integer("coreset_masks", 9, "coreset stage: K masks in one pass too (<2: none)"),
    flags.DEFINE_integer("num_starts", 128, "coreset start points (44f7e4d and before: 10)"),
    flags.DEFINE_integer("repeats", 3, "timed calls after the compiling one"),
    flags.DEFINE_string(
        "stages", "features,discriminators,coreset,scoring,maps,end_to_end", "comma list, or all"
    ),
    flags.DEFINE_string("arch", "wide_resnet50_2", "backbone of the features stage"),
    flags.DEFINE_integer("image_size", 224, "features stage input size"),
    flags.DEFINE_integer("feature_images", 8, "features stage images"),
    flags.DEFINE_integer("batch_size", 8, "features stage batch"),
    flags.DEFINE_string("method", "softpatch_plus", "end_to_end method"),
    flags.DEFINE_enum("source", "device", ["device", "host", "lazy"], "end_to_end features"),
    flags.DEFINE_enum(
        "store_dtype", "float32", ["float32", "float16", "bfloat16"], "host features dtype"
    ),
    flags.DEFINE_bool("reference_impl", False, "also time the reference's loops, same arrays"),
    flags.DEFINE_string("reference_path", "", "checkout of the authors' SoftPatch code"),
    flags.DEFINE_integer("reference_positions", 0, ">0: LOF on a subset, scaled"),
    flags.DEFINE_integer("reference_coreset_steps", 200, "steps of the reference coreset loop"),
    flags.DEFINE_integer("host_devices", 0, "CPU: split the host into devices"),
    flags.DEFINE_integer("bandwidth_mib", 512, "array size of the bandwidth kernels"),
    flags.DEFINE_string("deploy_model", "", "deploy_latency: a `deploy fit` model folder"),
    flags.DEFINE_string("deploy_images", "", "deploy_latency: its test images"),
    flags.DEFINE_integer("latency_images", 20, "deploy_latency: images of the larger set"),
    flags.DEFINE_bool("onnx", True, "deploy_latency: also time onnxruntime on the exported model"),
    flags.DEFINE_string("out", "/tmp/softpatch_bench.json", "the JSON report"),
    flags.DEFINE_integer("seed", 0, "root of every random input"),
]


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    args = argparse.Namespace(**{f.name: f.value for f in _FLAGS})
    args.compile_cache = compile_cache.FLAG.value
    if args.host_devices:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.host_devices}"
        )
    # JAX fixes its device count when it starts: the stages (and jax) are imported only now.
    from launch.bench import driver

    compile_cache.enable(compile_cache.FLAG.value)  # the first call's time then excludes compiling

    driver.run(args)


if __name__ == "__main__":
    app.run(main)
