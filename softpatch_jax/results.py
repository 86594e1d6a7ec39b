"""Results as data: the fields of a results row, loading a run's or a sweep's rows, and their
aggregation (per seed the mean over categories, then mean ± std over seeds) into tables.

Standard library only (no jax, no matplotlib), so any module may import it: `metrics` takes its
metric names from here, `report` renders the tables and `figures` plots the same aggregates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence

# Every metric `metrics.evaluate` can compute, with its name in logs and tables; results rows and
# tables carry them in this order (`ALL_METRICS`).
METRIC_NAMES = {
    "image_auroc": "image AUROC",
    "pixel_auroc": "pixel AUROC",
    "pixel_aupro": "pixel AUPRO",
    "pixel_ap": "pixel AP",
    "image_ap": "image AP",
    "image_f1_max": "image F1-max",
    "pixel_f1_max": "pixel F1-max",
    "sample_auroc": "sample AUROC",
    "sample_ap": "sample AP",
    # ADEval's binned AUPR (metrics.py), the AUPR of published Real-IAD tables; *_ap is the exact
    # step AP.
    "image_aupr": "image AUPR (ADEval)",
    "pixel_aupr": "pixel AUPR (ADEval)",
    "sample_aupr": "sample AUPR (ADEval)",
}
ALL_METRICS = tuple(METRIC_NAMES)
# Computed only from file names that carry a view (`metrics.sample_keys`); absent otherwise.
SAMPLE_METRICS = ("sample_auroc", "sample_ap", "sample_aupr")
# The training set's measured anomalous fraction (a results-row field): a table of its own where
# any training set held anomalies, e.g. across Real-IAD's FUIAD splits.
NOISE_FIELD = "train_anomalous_fraction"
# Where training images are views of samples (Real-IAD): the fraction of defective samples, what a
# FUIAD split's name counts (its images' fraction, NOISE_FIELD, is lower: some views hide the defect).
SAMPLE_NOISE_FIELD = "train_anomalous_sample_fraction"
FIELD_NAMES = {
    **METRIC_NAMES,
    NOISE_FIELD: "anomalous fraction of the training images",
    SAMPLE_NOISE_FIELD: "defective fraction of the training samples",
}
# The pair every run computes: the summary table and the curve plots show these.
HEADLINE = ("image_auroc", "pixel_auroc")
# Row fields that describe a setting; config paths (dotted: "softpatch.tau") are settings too.
SETTING_FIELDS = ("noise_ratio", "overlap")
# A row's "weights" value when its backbone was random (`weights.RANDOM_INIT`, which writes it;
# repeated rather than imported so that this module needs no jax).
RANDOM_INIT = "random-init"
RANDOM_INIT_WARNING = (
    "WARNING: random-init backbone: these numbers come from random features and say nothing about "
    "the method on real data."
)
RANDOM_INIT_TAG = "RANDOM-INIT backbone: random features, not the method's real numbers"


def load(workdir: str) -> tuple[list[dict], dict]:
    """(rows, report hints) of a sweep (results.jsonl + sweep.json) or a run (results.json; its
    results.jsonl may also hold rows of earlier configs run in the same workdir)."""
    sweep_path = os.path.join(workdir, "results.jsonl")
    run_path = os.path.join(workdir, "results.json")
    if is_sweep(workdir) or (os.path.isfile(sweep_path) and not os.path.isfile(run_path)):
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
    if os.path.isfile(run_path):
        with open(run_path) as f:
            return json.load(f)["rows"], {}
    raise FileNotFoundError(f"no results.jsonl or results.json in {workdir!r}")


def is_sweep(workdir: str) -> bool:
    """A sweep's workdir (sweep.json) rather than a plain run's (config.json, results.json)."""
    return os.path.isfile(os.path.join(workdir, "sweep.json"))


def is_random_init(rows: Sequence[dict]) -> bool:
    return any(r.get("weights") == RANDOM_INIT for r in rows)


def varying(rows: Sequence[dict]) -> list[str]:
    """Setting fields (and config paths) that take more than one value among `rows`."""
    fields = list(SETTING_FIELDS)
    for r in rows:
        fields += [k for k in r if "." in k and k not in fields]
    return [f for f in fields if len({json.dumps(r.get(f)) for r in rows}) > 1]


def setting_label(field: str, value) -> str:
    """A setting as titles and file names show it: "noise 10%", "overlap", "tau=0.1"."""
    if field == "noise_ratio":
        return f"noise {value:.0%}"
    if field == "overlap":
        return "overlap" if value else "no-overlap"
    return f"{field.rsplit('.', 1)[-1]}={value}"


def column_label(row: dict, columns: Sequence[str]) -> str:
    return " ".join(str(row[c]) if c == "method" else setting_label(c, row.get(c)) for c in columns)


def metrics_in(rows: Sequence[dict]) -> list[str]:
    """The metrics every row carries, in `ALL_METRICS` order (older results have only AUROCs)."""
    return [m for m in ALL_METRICS if rows and all(m in r for r in rows)]


def seed_stats(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (ddof=1; NaN for one value) over seeds."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std, n


def category_means(by_category: Mapping[str, Mapping[int, float]]) -> list[float]:
    """Per seed the mean over categories ({category: {seed: value}}), for the seeds that have every
    category, in seed order: what the tables' "mean" row and the curves average over seeds."""
    per_cat = list(by_category.values())
    seeds = set.intersection(*(set(d) for d in per_cat)) if per_cat else set()
    return [sum(d[s] for d in per_cat) / len(per_cat) for s in sorted(seeds)]


def by_seed(rows: Sequence[dict], metric: str) -> dict[str, dict[int, float]]:
    """{category: {seed: value}} of one metric; a later row of the same cell wins (re-runs append)."""
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        out.setdefault(r["category"], {})[r["seed"]] = r[metric]
    return out


def fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _pm(stat: tuple[float, float, int]) -> str:
    mean, std, n = stat
    return fmt(mean) if n < 2 else f"{fmt(mean)} ± {std:.3f}"


@dataclasses.dataclass
class Table:
    """One table: categories (and a mean row) x columns; cells are (mean, std, n) over seeds."""

    metric: str
    setting: dict  # the fields that are fixed within this table
    columns: list[str]
    cells: dict[str, list[tuple[float, float, int]]]  # row label -> one stat per column
    random_init: bool

    def title(self) -> str:
        parts = [FIELD_NAMES.get(self.metric, self.metric)]
        parts += [setting_label(k, v) for k, v in self.setting.items()]
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


def tables(
    rows: Sequence[dict], columns: Sequence[str] = ("method",), metrics: Sequence[str] = HEADLINE
) -> list[Table]:
    """The papers' layout: one table per metric and per setting of the fields that vary but are
    not columns; rows are categories then "mean" (per seed the mean over categories, then mean ±
    std over the seeds that have every category); cells are mean ± std over seeds."""
    split = [f for f in varying(rows) if f not in columns]
    out = []
    for key in sorted({tuple(r.get(f) for f in split) for r in rows}, key=_order):
        sel = [r for r in rows if tuple(r.get(f) for f in split) == key]
        cols = list(dict.fromkeys(column_label(r, columns) for r in sel))
        cats = list(dict.fromkeys(r["category"] for r in sel))
        for metric in metrics:
            per_col = {
                col: by_seed([r for r in sel if column_label(r, columns) == col], metric)
                for col in cols
            }
            cells = {
                c: [seed_stats(list(per_col[col].get(c, {}).values())) for col in cols]
                for c in cats
            }
            cells["mean"] = [
                seed_stats(category_means({c: per_col[col].get(c, {}) for c in cats}))
                for col in cols
            ]
            setting = dict(zip(split, key))
            out.append(Table(metric, setting, cols, cells, is_random_init(sel)))
    return out
