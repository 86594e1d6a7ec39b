"""Figures of results (matplotlib, Agg): AUROC curves against a swept value (journal Figures 4 and
5: noise ratio, tau) and anomaly maps side by side (journal Figure 6: image, ground truth, then each
method's heat map over the image). Used by `report.write_report`; the aggregates come from
`results`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from softpatch_jax import results

# PatchCore, then SoftPatch (the first of these found), then SoftPatch+: the journal's Figure 6.
DEFAULT_MAP_METHODS = (
    "patchcore",
    ("softpatch_lof", "softpatch", "softpatch_gaussian", "softpatch_nearest"),
    "softpatch_plus",
)


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def curve_points(rows: Sequence[dict], x: str, label: str, columns, metric: str):
    """xs, mean, std for one series: per seed the mean over categories, then mean/std over seeds
    (seeds missing a category at some x are left out there)."""
    sel = [r for r in rows if results.column_label(r, columns) == label]
    xs = sorted({r[x] for r in sel})
    stats = [
        results.seed_stats(
            results.category_means(results.by_seed([r for r in sel if r[x] == v], metric))
        )
        for v in xs
    ]
    mean = np.array([s[0] for s in stats])
    std = np.nan_to_num(np.array([s[1] for s in stats]))
    return np.array(xs, float), mean, std


def curves(rows: Sequence[dict], x: str, columns: Sequence[str], out_dir: str) -> list[str]:
    """One PNG per setting of the other varying fields: image and pixel AUROC against `x`, one
    line per column label, shaded ± one standard deviation over seeds."""
    rows = [r for r in rows if x in r]
    if not rows:
        return []
    split = [f for f in results.varying(rows) if f != x and f not in columns]
    paths = []
    for key in sorted({tuple(json.dumps(r.get(f)) for f in split) for r in rows}):
        sel = [r for r in rows if tuple(json.dumps(r.get(f)) for f in split) == key]
        setting = {f: json.loads(k) for f, k in zip(split, key)}
        labels = list(dict.fromkeys(results.column_label(r, columns) for r in sel))
        fig, axes = plt.subplots(1, len(results.HEADLINE), figsize=(11, 4.2), squeeze=False)
        for ax, metric in zip(axes[0], results.HEADLINE):
            for label in labels:
                xs, mean, std = curve_points(sel, x, label, columns, metric)
                scale = 100.0 if x == "noise_ratio" else 1.0
                (line,) = ax.plot(xs * scale, mean, marker="o", ms=3, label=label)
                ax.fill_between(
                    xs * scale, mean - std, mean + std, alpha=0.15, color=line.get_color()
                )
            ax.set_xlabel("noise ratio (%)" if x == "noise_ratio" else x.rsplit(".", 1)[-1])
            ax.set_ylabel(results.METRIC_NAMES[metric])
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=8, loc="best")
        seeds = len({r["seed"] for r in sel})
        title = [f"AUROC vs {x}"] + [results.setting_label(k, v) for k, v in setting.items()]
        cats = len({r["category"] for r in sel})
        title.append(
            f"mean over {_count(cats, 'category', 'categories')}, ± std over "
            f"{_count(seeds, 'seed', 'seeds')}"
        )
        if results.is_random_init(sel):
            title.append(results.RANDOM_INIT_TAG)
        fig.suptitle("\n".join([" | ".join(title[:-1]), title[-1]]), fontsize=9)
        fig.tight_layout()
        name = "_".join(["auroc_vs", x, *(results.setting_label(k, v) for k, v in setting.items())])
        path = os.path.join(out_dir, _slug(name) + ".png")
        os.makedirs(out_dir, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def load_maps(maps_dir: str) -> list[dict]:
    """Every saved map file: {"meta": row fields, "images", "masks", "maps", "paths", "labels"}."""
    out = []
    for name in sorted(os.listdir(maps_dir)):
        if not name.endswith(".npz") or name.startswith("."):
            continue
        with np.load(os.path.join(maps_dir, name), allow_pickle=False) as z:
            entry = {k: z[k] for k in z.files}
        entry["meta"] = json.loads(str(entry["meta"]))
        out.append(entry)
    return out


def _pick(available: set[str], wanted) -> str | None:
    for m in (wanted,) if isinstance(wanted, str) else wanted:
        if m in available:
            return m
    return None


def anomaly_map_figures(
    maps_dir: str, out_dir: str, methods: Sequence | None = None, every_setting: bool = False
) -> list[str]:
    """Figures of saved anomaly maps: rows are test images; columns the image, its ground truth,
    and each method's map over the image (a method's maps share one colour scale, so a normal image
    looks as hot as the method scores it).

    A setting (category, noise, seed and other hyperparameters) needs maps of at least two of
    `methods`. By default one figure per category: its highest noise ratio, lowest seed, where the
    methods differ most; `every_setting` draws them all.
    """
    settings: dict[str, dict[str, dict]] = {}
    for e in load_maps(maps_dir):
        meta = e["meta"]
        fixed = {k: v for k, v in meta.items() if "." in k or k in ("category", "seed")}
        fixed |= {k: meta[k] for k in results.SETTING_FIELDS if k in meta}
        settings.setdefault(json.dumps(fixed, sort_keys=True), {})[meta["method"]] = e
    usable = []
    for key, by_method in settings.items():
        chosen = [_pick(set(by_method), w) for w in (methods or DEFAULT_MAP_METHODS)]
        chosen = [m for m in chosen if m]
        if len(chosen) >= 2:
            usable.append((json.loads(key), [by_method[m] for m in chosen], chosen))
    usable.sort(key=lambda u: (u[0]["category"], -u[0].get("noise_ratio", 0), u[0].get("seed", 0)))
    if not every_setting:
        usable = [
            u
            for i, u in enumerate(usable)
            if i == 0 or u[0]["category"] != usable[i - 1][0]["category"]
        ]
    paths: list[str] = []
    for setting, entries, chosen in usable:
        paths.append(_map_figure(setting, entries, chosen, out_dir, taken=set(paths)))
    return paths


def _map_figure(setting: dict, entries: list[dict], methods: list[str], out_dir: str, taken) -> str:
    first = entries[0]
    k = first["images"].shape[0]
    cols = 2 + len(entries)
    fig, axes = plt.subplots(k, cols, figsize=(2.1 * cols, 2.1 * k + 0.8), squeeze=False)
    for j, (e, method) in enumerate(zip(entries, methods)):
        lo, hi = float(e["maps"].min()), float(e["maps"].max())
        for i in range(k):
            ax = axes[i][2 + j]
            ax.imshow(first["images"][i])
            ax.imshow(e["maps"][i], cmap="jet", alpha=0.5, vmin=lo, vmax=hi)
            if i == 0:
                ax.set_title(method, fontsize=8)
    for i in range(k):
        axes[i][0].imshow(first["images"][i])
        axes[i][1].imshow(first["masks"][i], cmap="gray", vmin=0, vmax=1)
        defect = os.path.basename(os.path.dirname(str(first["paths"][i])))
        axes[i][0].set_ylabel(defect, fontsize=8)
    axes[0][0].set_title("image", fontsize=8)
    axes[0][1].set_title("ground truth", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    meta = first["meta"]
    title = [setting["category"]] + [
        results.setting_label(f, setting[f]) for f in results.SETTING_FIELDS if f in setting
    ]
    title.append(f"seed {setting.get('seed')}")
    if meta.get("weights") == results.RANDOM_INIT:
        title.append(results.RANDOM_INIT_TAG)
    fig.suptitle(" | ".join(title), fontsize=8)
    fig.tight_layout()
    name = _slug("anomaly_maps_" + "_".join(str(t) for t in title[:-1] if "RANDOM" not in t))
    path = os.path.join(out_dir, name + ".png")
    n = 2
    while path in taken:  # settings that differ only in other hyperparameters
        path = os.path.join(out_dir, f"{name}_{n}.png")
        n += 1
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
