"""The library entry point `main.py` and notebooks call: `run(config, workdir)` runs a plain
experiment through the one driver (sweep/engine.py), as the grid of one cell per (category, noise
ratio, method) with no axes, and writes the run's files and summary.
"""

from __future__ import annotations

import os

import jax
import ml_collections

from softpatch_jax import features, report
from softpatch_jax.io_utils import check_writable, write_csv, write_json
from softpatch_jax.sweep import engine

# Row fields left out of results.csv: lists (injected images), a sweep's axes (none in a run); the
# cell id (the name of its maps/ file) goes last, after the numbers.
_NOT_IN_CSV = ("injected", "axes", "cell_id")


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Runs the configured experiment and returns its rows; writes config.json, results.json (rows
    and the backbone's weights, devices, jax version), results.csv and summary.md (and maps/*.npz
    of a few test images per method when config.eval.save_maps > 0). Cells finished by an earlier
    run in the same workdir (results.jsonl) are not run again."""
    cells = engine.plan(config)  # every config error fails here, before any file is written
    check_writable(workdir)
    write_json(os.path.join(workdir, "config.json"), config.to_dict())
    out = engine.execute(config, cells, workdir)
    built = out.weights or [features.build(config).info]  # none built: every cell was finished
    meta = {
        "weights": built[0],
        "devices": [str(d) for d in jax.devices()],
        "jax_version": jax.__version__,
    }
    write_json(os.path.join(workdir, "results.json"), {**meta, "rows": out.rows})
    write_csv(
        os.path.join(workdir, "results.csv"),
        [
            {**{k: v for k, v in r.items() if k not in _NOT_IN_CSV}, "cell_id": r["cell_id"]}
            for r in out.rows
        ],
    )
    table = report.summary_table(out.rows)
    with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table, flush=True)
    return out.rows
