"""Fit seconds of each method on its own: what a sweep cannot report, since it fits every method
of a noisy set in one group (shared discriminator scores, one coreset pass for every keep mask),
so its rows' `time_fit` is the group's.

For each category and noise ratio of the config, the noisy training set is drawn and extracted
once; then each method of `config.methods` is fitted alone through the library's fitting path
(`memory_bank.prepare` with only its discriminators, then `fit_banks`), `--repeats` times after one
untimed run that compiles, and the fastest is kept. Prints a Markdown table (mean over categories)
and writes WORKDIR/fit_seconds.json.

  python -m launch.fit_seconds --config=configs/demo.py --workdir=/tmp/fit_seconds \
    --config.dataset.categories=pill --config.noise.ratios=0.0,0.1,0.2 \
    --config.methods=patchcore,softpatch_lof,softpatch_plus,softpatch_bootstrap,inreach

Wall-clock seconds of this machine under its load at the time: compare methods within one run.
"""

from __future__ import annotations

import os
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from softpatch_jax import data, memory_bank
from softpatch_jax.experiment import config_errors, grid, options, plan, stages
from softpatch_jax.io_utils import check_writable, write_json

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "A configs/*.py file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for fit_seconds.json.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "timed fits per method after the compiling one")
flags.mark_flags_as_required(["workdir"])


def _fit(key, feats, fit_opts, spec) -> None:
    prepared = memory_bank.prepare(key, feats, fit_opts, spec.discriminators())
    jax.block_until_ready(memory_bank.fit_banks(prepared, feats, fit_opts, [spec]).banks)


def fit_seconds(config, repeats: int) -> list[dict]:
    """One row per (category, noise ratio, method): its fastest fit's wall-clock seconds."""
    ex, _ = stages.extractor(config)
    fit_opts = options.fit_options(config)
    specs = options.method_specs(config)
    rows = []
    for category in data.categories(options.dataset_options(config.dataset)):
        splits = data.read(options.dataset_options(config.dataset), category)
        key = plan.category_key(config.seed, category)
        for ratio in grid.parse_ratios(config.noise.ratios):
            noisy, _, _ = plan.noisy_splits(config, splits, ratio)
            train, _ = stages.extract(ex, noisy.train, config, category, "train")
            feats = jax.numpy.asarray(train, stages.store_dtype(config))
            for spec in specs:
                _fit(key, feats, fit_opts, spec)  # compiles
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    _fit(key, feats, fit_opts, spec)
                    best = min(best, time.perf_counter() - t0)
                rows.append(
                    {
                        "category": category,
                        "noise_ratio": ratio,
                        "method": spec.name,
                        "num_train": int(feats.shape[0]),
                        "fit_seconds": round(best, 4),
                    }
                )
                print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Mean fit seconds over categories: one row per noise ratio, one column per method."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| noise | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for ratio in dict.fromkeys(r["noise_ratio"] for r in rows):
        cells = []
        for m in methods:
            vals = [
                r["fit_seconds"] for r in rows if r["method"] == m and r["noise_ratio"] == ratio
            ]
            cells.append(f"{sum(vals) / len(vals):.2f}")
        lines.append(f"| {ratio} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv):
    config_errors.check_command(argv, _CONFIG.value)
    check_writable(_WORKDIR.value)
    rows = fit_seconds(_CONFIG.value, _REPEATS.value)
    text = table(rows)
    write_json(os.path.join(_WORKDIR.value, "fit_seconds.json"), {"rows": rows, "table": text})
    print(text)


if __name__ == "__main__":
    app.run(main, flags_parser=config_errors.parse_flags)
