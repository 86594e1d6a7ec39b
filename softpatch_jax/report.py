"""Result tables: the summary printed at the end of a run, and the papers' table layouts (category rows
x method columns, a mean row, mean ± std over seeds) for runs and sweeps, as Markdown and CSV; the
curves and anomaly-map figures are drawn by `figures.py`.

  python -m softpatch_jax.report --workdir=DIR   # DIR holds a run's results.json or a sweep's
                                                 # results.jsonl; writes DIR/report/
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Sequence

from softpatch_jax import metrics as metrics_lib
from softpatch_jax.io_utils import atomic_open, write_csv

RANDOM_INIT_WARNING = (
    "WARNING: random-init backbone: these numbers come from random features and say nothing about "
    "the method on real data."
)


def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def summary_table(rows: Sequence[dict]) -> str:
    """Markdown: one table per (noise ratio, mode); rows = categories + mean; cells = image/pixel
    AUROC, with the sample AUROC between them where every row has one (view datasets such as
    Real-IAD); then, where any training set held anomalies, their count and fraction per category.
    """
    lines = []
    settings = sorted({(r["noise_ratio"], r["overlap"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    shown = ["image_auroc", "pixel_auroc"]
    if rows and all("sample_auroc" in r for r in rows):
        shown.insert(1, "sample_auroc")
    for ratio, overlap in settings:
        sel = [r for r in rows if (r["noise_ratio"], r["overlap"]) == (ratio, overlap)]
        cats = list(dict.fromkeys(r["category"] for r in sel))
        mode = "overlap" if overlap else "no-overlap"
        split = ", ".join(
            dict.fromkeys(str(r["dataset.split"]) for r in sel if "dataset.split" in r)
        )
        head = (f"split {split}, " if split else "") + f"noise {ratio:.0%} ({mode}), "
        lines.append("\n" + head + " / ".join(METRIC_NAMES[m] for m in shown))
        lines.append("| category | " + " | ".join(methods) + " |")
        lines.append("|---|" + "---|" * len(methods))
        cell = {(r["category"], r["method"]): r for r in sel}
        for cat in [*cats, "mean"]:
            vals = []
            for m in methods:
                if cat == "mean":
                    rs = [cell[(c, m)] for c in cats if (c, m) in cell]
                    got = [sum(r[k] for r in rs) / max(len(rs), 1) for k in shown]
                else:
                    r = cell.get((cat, m))
                    got = [r[k] for k in shown] if r else [float("nan")] * len(shown)
                vals.append(" / ".join(_fmt(v) for v in got))
            lines.append(f"| {cat} | " + " | ".join(vals) + " |")
        noisy = {r["category"]: r for r in sel if r.get("train_anomalous")}
        if noisy:
            lines.append(
                "\nanomalous training images: "
                + ", ".join(
                    f"{c} {r['train_anomalous']}/{r['num_train']} "
                    f"({r['train_anomalous'] / r['num_train']:.1%})"
                    for c, r in noisy.items()
                )
            )
    if any(r.get("weights") == "random-init" for r in rows):
        lines.append("\n" + RANDOM_INIT_WARNING)
    return "\n".join(lines).lstrip("\n")


# The headline pair (summary, curves); tables cover every metric the rows carry (`metrics_in`).
METRICS = ("image_auroc", "pixel_auroc")
# The training set's measured anomalous fraction (pipeline.result_row): a table of its own where
# any training set held anomalies, e.g. across Real-IAD's FUIAD splits.
NOISE_FIELD = "train_anomalous_fraction"
METRIC_NAMES = {**metrics_lib.NAMES, NOISE_FIELD: "anomalous fraction of the training set"}
RANDOM_INIT_TAG = "RANDOM-INIT backbone: random features, not the method's real numbers"
# Row fields that describe a setting; config paths (dotted: "softpatch.tau") are settings too.
SETTING_FIELDS = ("noise_ratio", "overlap")


def load(workdir: str) -> tuple[list[dict], dict]:
    """(rows, report hints) of a sweep (results.jsonl + sweep.json) or a run (results.json)."""
    sweep_path = os.path.join(workdir, "results.jsonl")
    if os.path.isfile(sweep_path):
        with open(sweep_path) as f:
            rows = []
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):  # a torn last line
                    rows.append(json.loads(line))
        hints = {}
        meta = os.path.join(workdir, "sweep.json")
        if os.path.isfile(meta):
            with open(meta) as f:
                hints = json.load(f)["config"].get("sweep", {}).get("report", {})
        return rows, hints
    run_path = os.path.join(workdir, "results.json")
    if os.path.isfile(run_path):
        with open(run_path) as f:
            return json.load(f)["rows"], {}
    raise FileNotFoundError(f"no results.jsonl or results.json in {workdir!r}")


def is_random_init(rows: Sequence[dict]) -> bool:
    return any(r.get("weights") == "random-init" for r in rows)


def varying(rows: Sequence[dict]) -> list[str]:
    """Setting fields (and config paths) that take more than one value among `rows`."""
    fields = list(SETTING_FIELDS)
    for r in rows:
        fields += [k for k in r if "." in k and k not in fields]
    return [f for f in fields if len({json.dumps(r.get(f)) for r in rows}) > 1]


def describe(field: str, value) -> str:
    if field == "noise_ratio":
        return f"noise {value:.0%}"
    if field == "overlap":
        return "overlap" if value else "no-overlap"
    return f"{field.rsplit('.', 1)[-1]}={value}"


def column_label(row: dict, columns: Sequence[str]) -> str:
    return " ".join(str(row[c]) if c == "method" else describe(c, row.get(c)) for c in columns)


def seed_stats(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (ddof=1; NaN for one value) over seeds."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std, n


def _pm(stat: tuple[float, float, int]) -> str:
    mean, std, n = stat
    return _fmt(mean) if n < 2 else f"{_fmt(mean)} ± {std:.3f}"


@dataclasses.dataclass
class Table:
    """One table: categories (and a mean row) x columns; cells are (mean, std, n) over seeds."""

    metric: str
    setting: dict  # the fields that are fixed within this table
    columns: list[str]
    cells: dict[str, list[tuple[float, float, int]]]  # row label -> one stat per column
    random_init: bool

    def title(self) -> str:
        parts = [METRIC_NAMES.get(self.metric, self.metric)]
        parts += [describe(k, v) for k, v in self.setting.items()]
        seeds = max((s[2] for stats in self.cells.values() for s in stats), default=0)
        parts.append(f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed")
        if self.random_init:
            parts.append(RANDOM_INIT_TAG)
        return " | ".join(parts)

    def markdown(self) -> str:
        lines = [f"### {self.title()}", "", "| category | " + " | ".join(self.columns) + " |"]
        lines.append("|---|" + "---|" * len(self.columns))
        lines += [f"| {k} | " + " | ".join(_pm(s) for s in v) + " |" for k, v in self.cells.items()]
        return "\n".join(lines)

    def records(self) -> list[dict]:
        """Long format for CSV: one record per (row, column)."""
        return [
            {
                **self.setting,
                "metric": self.metric,
                "category": k,
                "column": col,
                "mean": s[0],
                "std": s[1],
                "seeds": s[2],
            }
            for k, stats in self.cells.items()
            for col, s in zip(self.columns, stats)
        ]


def _order(value):
    """Sort key: numbers by value (0.0 < 0.05 < 0.1, unlike their text), None first, the rest as
    JSON text; tuples element by element."""
    if isinstance(value, (tuple, list)):
        return tuple(_order(v) for v in value)
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, (int, float)):
        return (1, float(value), "")
    return (2, 0.0, json.dumps(value, sort_keys=True))


def _sorted_keys(values) -> list:
    return sorted(values, key=_order)


def metrics_in(rows: Sequence[dict]) -> list[str]:
    """The metrics every row carries, in `metrics.ALL` order (older results have only AUROCs)."""
    return [m for m in metrics_lib.ALL if rows and all(m in r for r in rows)]


def tables(
    rows: Sequence[dict], columns: Sequence[str] = ("method",), metrics: Sequence[str] = METRICS
) -> list[Table]:
    """The papers' layout: one table per metric and per setting of the fields that vary but are
    not columns; rows are categories then "mean" (per seed the mean over categories, then mean ±
    std over the seeds that have every category); cells are mean ± std over seeds."""
    split = [f for f in varying(rows) if f not in columns]
    out = []
    for key in _sorted_keys({tuple(r.get(f) for f in split) for r in rows}):
        sel = [r for r in rows if tuple(r.get(f) for f in split) == key]
        cols = list(dict.fromkeys(column_label(r, columns) for r in sel))
        cats = list(dict.fromkeys(r["category"] for r in sel))
        for metric in metrics:
            by_seed: dict[tuple, dict] = {}
            for r in sel:  # a later row of the same cell wins (re-runs append)
                cell = by_seed.setdefault((r["category"], column_label(r, columns)), {})
                cell[r["seed"]] = r[metric]
            cells = {
                c: [seed_stats(list(by_seed.get((c, col), {}).values())) for col in cols]
                for c in cats
            }
            mean_row = []
            for col in cols:
                per_cat = [by_seed.get((c, col), {}) for c in cats]
                seeds = set.intersection(*(set(d) for d in per_cat)) if per_cat else set()
                mean_row.append(
                    seed_stats([sum(d[s] for d in per_cat) / len(cats) for s in sorted(seeds)])
                )
            cells["mean"] = mean_row
            setting = dict(zip(split, key))
            out.append(Table(metric, setting, cols, cells, is_random_init(sel)))
    return out


def write_report(
    workdir: str,
    out_dir: str | None = None,
    columns: Sequence[str] | None = None,
    curves: Sequence[str] | None = None,
    maps_methods: Sequence[str] | None = None,
) -> dict[str, list[str]]:
    """Writes tables.md, tables.csv and the figures under `out_dir` (default WORKDIR/report).

    Args:
      columns: row fields naming a table column, besides the method (default: the sweep's hint).
      curves: x fields of the curve plots (default: the hint, else noise_ratio and softpatch.tau
        wherever they take several values).
      maps_methods: methods in the anomaly-map figure (default: PatchCore, SoftPatch, SoftPatch+).
    Returns:
      {"tables": [...], "figures": [...]} paths written.
    """
    from softpatch_jax import figures  # matplotlib only when figures are drawn

    rows, hints = load(workdir)
    out_dir = out_dir or os.path.join(workdir, "report")
    if columns is None:
        columns = [c for c in str(hints.get("columns", "")).split(",") if c.strip()]
    cols = ["method", *[c for c in columns if c != "method"]]
    if len({r["method"] for r in rows}) == 1 and len(cols) > 1:
        cols.remove("method")  # one method: the column label is the swept field alone
    shown = metrics_in(rows)
    if any(r.get("train_anomalous") for r in rows) and all(NOISE_FIELD in r for r in rows):
        shown.append(NOISE_FIELD)  # the true noise ratio beside the metrics it explains
    built = tables(rows, cols, shown)
    md = "\n\n".join(t.markdown() for t in built) + "\n"
    if is_random_init(rows):
        md = f"**{RANDOM_INIT_WARNING}**\n\n{md}"
    written = {"tables": [os.path.join(out_dir, "tables.md"), os.path.join(out_dir, "tables.csv")]}
    with atomic_open(written["tables"][0]) as f:
        f.write(md)
    write_csv(written["tables"][1], [rec for t in built for rec in t.records()])
    if curves is None:
        curves = [c for c in str(hints.get("curves", "")).split(",") if c.strip()]
        curves = curves or [x for x in ("noise_ratio", "softpatch.tau") if x in varying(rows)]
    written["figures"] = []
    for x in curves:
        written["figures"] += figures.curves(rows, x, cols, out_dir)
    maps_dir = os.path.join(workdir, "maps")
    if os.path.isdir(maps_dir):
        written["figures"] += figures.anomaly_map_figures(maps_dir, out_dir, maps_methods)
    return written


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description="Tables and figures of a run's or a sweep's results."
    )
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default=None, help="default: WORKDIR/report")
    parser.add_argument("--columns", default=None, help="comma list of row fields; default: hint")
    parser.add_argument("--curves", default=None, help="comma list of x fields; default: hint")
    parser.add_argument("--maps_methods", default=None, help="methods in the anomaly-map figure")
    args = parser.parse_args(argv)
    split = lambda s: None if s is None else [x for x in s.split(",") if x.strip()]
    try:
        rows, _ = load(args.workdir)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    if not os.path.isfile(os.path.join(args.workdir, "results.jsonl")):
        print(summary_table(rows))  # a run: its summary, as before
    written = write_report(
        args.workdir, args.out, split(args.columns), split(args.curves), split(args.maps_methods)
    )
    with open(written["tables"][0]) as f:
        print(f.read())
    for path in written["tables"] + written["figures"]:
        print("wrote", path)


if __name__ == "__main__":
    main()
