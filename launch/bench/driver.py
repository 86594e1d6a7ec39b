"""Runs the chosen stages for every (N, P), prints the table and writes everything to --out."""

from __future__ import annotations

import argparse
import os

import jax

from launch.bench import end_to_end, kernels, latency, sharded
from softpatch_jax import compile_cache
from softpatch_jax.io_utils import split_list, write_json

# Stages run per (N, P), in table order; "features" and "deploy_latency" run once, before them.
ONCE = ("features", "deploy_latency")
STAGES = {
    "discriminators": kernels.discriminator_scores,
    "coreset": kernels.greedy_coreset,
    "scoring": kernels.nn_scoring,
    "maps": kernels.anomaly_maps,
    "end_to_end": end_to_end.end_to_end,
    "parallel": sharded.sharded_vs_one_device,
}


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


def run(args: argparse.Namespace) -> dict:
    stages = split_list(args.stages)
    if stages == ["all"]:
        stages = ["features", *STAGES]  # deploy_latency needs a fitted model: asked for by name
    bad = [s for s in stages if s not in STAGES and s not in ONCE]
    if bad:
        raise SystemExit(f"unknown stage(s) {bad}; valid: {', '.join([*ONCE, *STAGES])}, all")
    key = jax.random.key(args.seed)
    rows = []
    if "features" in stages:
        rows.append({"stage": "features", **kernels.features(args, key)})
    if "deploy_latency" in stages:
        lat = latency.deploy_latency(args, key)
        rows.append({"stage": "deploy_latency", "notes": "see the latency table", **lat})
    for n in [int(v) for v in args.n.split(",")]:
        for p in [int(v) for v in args.p.split(",")]:
            for stage in stages:
                if stage not in ONCE:
                    res = STAGES[stage](args, jax.random.fold_in(key, n * 100003 + p), n, p)
                    rows.append({"stage": stage, "n": n, "p": p, **res})
    report = {
        "args": vars(args),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
        "weights": "random-init (feature stage times only; deploy_latency: the model's weights)",
        "compile_cache": compile_cache.resolve(args.compile_cache),
        "rows": rows,
    }
    write_json(args.out, report)
    print(table(rows), flush=True)
    for r in rows:
        if r["stage"] == "deploy_latency":
            print("\n" + latency.table(r), flush=True)
    print(f"\nwrote {args.out}", flush=True)
    return report
