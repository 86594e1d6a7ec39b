"""Result tables: the summary printed at the end of a run (category rows x method columns, image and
pixel AUROC), as Markdown.

  python -m softpatch_jax.report --workdir=DIR   # prints the table of DIR/results.json
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

RANDOM_INIT_WARNING = (
    "WARNING: random-init backbone: these numbers come from random features and say nothing about "
    "the method on real data."
)


def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def summary_table(rows: Sequence[dict]) -> str:
    """Markdown: one table per (noise ratio, mode); rows = categories + mean; cells = image/pixel."""
    lines = []
    settings = sorted({(r["noise_ratio"], r["overlap"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ratio, overlap in settings:
        sel = [r for r in rows if (r["noise_ratio"], r["overlap"]) == (ratio, overlap)]
        cats = list(dict.fromkeys(r["category"] for r in sel))
        mode = "overlap" if overlap else "no-overlap"
        lines.append(f"\nnoise {ratio:.0%} ({mode}), image AUROC / pixel AUROC")
        lines.append("| category | " + " | ".join(methods) + " |")
        lines.append("|---|" + "---|" * len(methods))
        cell = {(r["category"], r["method"]): r for r in sel}
        for cat in [*cats, "mean"]:
            vals = []
            for m in methods:
                if cat == "mean":
                    rs = [cell[(c, m)] for c in cats if (c, m) in cell]
                    im = sum(r["image_auroc"] for r in rs) / max(len(rs), 1)
                    px = sum(r["pixel_auroc"] for r in rs) / max(len(rs), 1)
                else:
                    r = cell.get((cat, m))
                    im, px = (r["image_auroc"], r["pixel_auroc"]) if r else (float("nan"),) * 2
                vals.append(f"{_fmt(im)} / {_fmt(px)}")
            lines.append(f"| {cat} | " + " | ".join(vals) + " |")
    if any(r.get("weights") == "random-init" for r in rows):
        lines.append("\n" + RANDOM_INIT_WARNING)
    return "\n".join(lines).lstrip("\n")


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Print the summary table of a run's results.")
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    path = os.path.join(args.workdir, "results.json")
    if not os.path.isfile(path):
        raise SystemExit(f"no results.json in {args.workdir!r}")
    with open(path) as f:
        print(summary_table(json.load(f)["rows"]))


if __name__ == "__main__":
    main()
