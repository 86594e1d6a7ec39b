"""The report of a run or a sweep: the summary printed at the end of a run, and tables.md /
tables.csv (the papers' layouts, built by `results.tables`) with the figures `figures.py` draws.

  python -m softpatch_jax.report --workdir=DIR   # DIR holds a run's results.json or a sweep's
                                                 # results.jsonl; writes DIR/report/
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import app, flags

from softpatch_jax import results
from softpatch_jax.io_utils import atomic_open, write_csv


def summary_table(rows: Sequence[dict]) -> str:
    """Markdown: one table per (noise ratio, mode); rows = categories + mean; cells = image/pixel
    AUROC, with the sample AUROC between them where every row has one (view datasets such as
    Real-IAD); then, where any training set held anomalies, their count and fraction per category.
    """
    lines = []
    settings = sorted({(r["noise_ratio"], r["overlap"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    shown = list(results.HEADLINE)
    if rows and all("sample_auroc" in r for r in rows):
        shown.insert(1, "sample_auroc")
    for ratio, overlap in settings:
        sel = [r for r in rows if (r["noise_ratio"], r["overlap"]) == (ratio, overlap)]
        cats = list(dict.fromkeys(r["category"] for r in sel))
        mode = "overlap" if overlap else "no-overlap"
        split = ", ".join(
            dict.fromkeys(str(r["dataset.split"]) for r in sel if "dataset.split" in r)
        )
        # The mode means something only where images were injected (not for 0%, nor a FUIAD
        # split's own anomalies, listed below the table).
        noise = f"noise {ratio:.0%}" + (f" ({mode})" if ratio else "")
        head = (f"split {split}, " if split else "") + noise + ", "
        lines.append("\n" + head + " / ".join(results.METRIC_NAMES[m] for m in shown))
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
                vals.append(" / ".join(results.fmt(v) for v in got))
            lines.append(f"| {cat} | " + " | ".join(vals) + " |")
        noisy = {r["category"]: r for r in sel if r.get("train_anomalous")}
        if noisy:
            lines.append(
                "\nanomalous training images: "
                + ", ".join(
                    f"{c} {r['train_anomalous']}/{r['num_train']} "
                    f"({r['train_anomalous'] / r['num_train']:.1%})"
                    + (
                        f" in {r['train_anomalous_samples']}/{r['train_samples']} defective "
                        f"samples ({r['train_anomalous_sample_fraction']:.1%})"
                        if "train_samples" in r
                        else ""
                    )
                    for c, r in noisy.items()
                )
            )
    if results.is_random_init(rows):
        lines.append("\n" + results.RANDOM_INIT_WARNING)
    return "\n".join(lines).lstrip("\n")


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

    rows, hints = results.load(workdir)
    out_dir = out_dir or os.path.join(workdir, "report")
    if columns is None:
        columns = [c for c in str(hints.get("columns", "")).split(",") if c.strip()]
    cols = ["method", *[c for c in columns if c != "method"]]
    if len({r["method"] for r in rows}) == 1 and len(cols) > 1:
        cols.remove("method")  # one method: the column label is the swept field alone
    shown = results.metrics_in(rows)
    if any(r.get("train_anomalous") for r in rows) and all(results.NOISE_FIELD in r for r in rows):
        shown.append(results.NOISE_FIELD)  # the true noise ratio beside the metrics it explains
        if all(results.SAMPLE_NOISE_FIELD in r for r in rows):
            shown.append(results.SAMPLE_NOISE_FIELD)  # and the split's own ratio, in samples
    built = results.tables(rows, cols, shown)
    md = "\n\n".join(t.markdown() for t in built) + "\n"
    if results.is_random_init(rows):
        md = f"**{results.RANDOM_INIT_WARNING}**\n\n{md}"
    written = {"tables": [os.path.join(out_dir, "tables.md"), os.path.join(out_dir, "tables.csv")]}
    with atomic_open(written["tables"][0]) as f:
        f.write(md)
    write_csv(written["tables"][1], [rec for t in built for rec in t.records()])
    if curves is None:
        curves = [c for c in str(hints.get("curves", "")).split(",") if c.strip()]
        curves = curves or [
            x for x in ("noise_ratio", "softpatch.tau") if x in results.varying(rows)
        ]
    written["figures"] = []
    for x in curves:
        written["figures"] += figures.curves(rows, x, cols, out_dir)
    maps_dir = os.path.join(workdir, "maps")
    if os.path.isdir(maps_dir):
        written["figures"] += figures.anomaly_map_figures(maps_dir, out_dir, maps_methods)
    return written


def _define_flags() -> None:
    flags.DEFINE_string(
        "workdir", None, "Folder of a run's results.json or a sweep's results.jsonl."
    )
    flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/report).")
    flags.DEFINE_string("columns", None, "Comma list of row fields; default: the sweep's hint.")
    flags.DEFINE_string("curves", None, "Comma list of x fields; default: the sweep's hint.")
    flags.DEFINE_string("maps_methods", None, "Methods in the anomaly-map figure.")
    flags.mark_flag_as_required("workdir")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    listed = lambda s: None if s is None else [x for x in s.split(",") if x.strip()]
    try:
        rows, _ = results.load(f.workdir)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    if not results.is_sweep(f.workdir):
        print(summary_table(rows))  # a run: its summary, as before
    written = write_report(
        f.workdir, f.out, listed(f.columns), listed(f.curves), listed(f.maps_methods)
    )
    with open(written["tables"][0]) as fh:
        print(fh.read())
    for path in written["tables"] + written["figures"]:
        print("wrote", path)


if __name__ == "__main__":
    _define_flags()  # here, not at import: the driver imports this module beside main's flags
    app.run(main)
