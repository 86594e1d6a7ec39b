"""Sweep grids: a run config plus `config.sweep.axes`, expanded into cells.

`sweep.axes` mirrors the run config's shape; each leaf is a tuple of values for that config field:

  c.sweep.axes.noise = ml_collections.ConfigDict({"ratios": (0.0, 0.1, 0.2)})
  c.sweep.axes.softpatch = ml_collections.ConfigDict({"tau": (0.05, 0.15)})
  c.sweep.axes.seed = (0, 1, 2)

so `--config.sweep.axes.seed=0,1` overrides an axis like any other field. Three comma lists of the
run config are axes of their own, as a plain run loops over them: `dataset.categories`,
`noise.ratios` and `methods`. A cell is one point of the product with exactly one category, one
noise ratio and one method: one results row.

Cells carry three keys (hex digests of canonical JSON), from the most to the least specific:
  id       everything that can change the cell's numbers (resume skips finished ids);
  fit_key  what the memory banks are fitted from: the id less the fields that only pick banks out of
           the same discriminator scores (methods, tau, tau_seg, discriminator subsets, soft weight,
           rank scope) and the fields that only act after fitting (scoring, eval);
  noisy    the noisy training set: data, preprocessing, backbone, noise setting and seed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
from typing import Any

import ml_collections

from softpatch_jax import methods
from softpatch_jax.experiment import options
from softpatch_jax.io_utils import split_list

# Comma lists in the run config that a plain run loops over: always expanded into single values.
IMPLICIT = ("dataset.categories", "noise.ratios", "methods")
# Fields that do not change any number beyond float32 rounding (batching, convolution lowering,
# memory chunking, caching, what is saved).
NO_EFFECT = (
    "dataset.batch_size",
    "backbone.depthwise",
    "scoring.chunk_size",
    "backbone.cache_dir",
    "eval.save_maps",
    "eval.map_images",
)
# Fields that only choose which banks are built from the same features and discriminator scores.
BANK_ONLY = (
    "methods",
    "softpatch.tau",
    "softpatch.tau_seg",
    "softpatch.auto_estimator",
    "softpatch.auto_floor",
    "softpatch.auto_floor_seg",
    "softpatch.discriminator",
    "softpatch.discriminators",
    "softpatch.soft_weight",
    "softpatch.rank_scope",
)
# Fields that only act on a fitted bank (scoring, evaluation).
AFTER_FIT = ("scoring", "eval")
# Hyperparameters written into every row, so tables can group by them whether swept or not.
ROW_FIELDS = (
    "softpatch.tau",
    "softpatch.tau_seg",
    "softpatch.auto_estimator",
    "softpatch.auto_floor",
    "softpatch.auto_floor_seg",
    "softpatch.lof_k",
    "softpatch.discriminators",
    "softpatch.soft_weight",
    "softpatch.rank_scope",
    "softpatch.projection_dim",
    "coreset.ratio",
)


def digest(obj: Any) -> str:
    """16 hex digits of sha256 over canonical JSON: stable across runs and machines."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_ratios(text) -> list[float]:
    """`noise.ratios` ("0.0,0.2") -> [0.0, 0.2], or a ValueError naming the field."""
    try:
        ratios = [float(s) for s in str(text).split(",") if s.strip()]
    except ValueError as e:
        raise ValueError(
            f"config.noise.ratios must be comma-separated numbers, got {text!r}"
        ) from e
    if not ratios:
        raise ValueError("config.noise.ratios is empty")
    return ratios


def get_path(config: ml_collections.ConfigDict, path: str) -> Any:
    node = config
    for part in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def _coerce(current: Any, value: Any, path: str) -> Any:
    """An axis value in the type of the field it sets (the run config is typed and locked)."""
    if isinstance(current, str):
        if isinstance(value, list | tuple):
            return ",".join(str(v) for v in value)
        return str(value)
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise TypeError(f"sweep axis {path!r}: expected booleans, got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if isinstance(current, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def set_path(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = _coerce(node[leaf], value, path)


def axes(config: ml_collections.ConfigDict) -> dict[str, tuple]:
    """{config path: values} of `config.sweep.axes`, checked against the run config's fields."""
    out: dict[str, tuple] = {}

    def walk(node: ml_collections.ConfigDict, prefix: str) -> None:
        for name, value in node.items():
            path = f"{prefix}{name}"
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, path + ".")
                continue
            if not isinstance(value, list | tuple) or not value:
                raise ValueError(
                    f"sweep axis {path!r} must be a non-empty tuple of values, got {value!r}"
                )
            try:
                target = get_path(config, path)
            except KeyError:
                raise ValueError(
                    f"sweep axis {path!r} names no field of the run config "
                    f"(valid sections: {sorted(k for k in config if k != 'sweep')})"
                ) from None
            if isinstance(target, ml_collections.ConfigDict) or path.startswith("sweep."):
                raise ValueError(f"sweep axis {path!r} must name a single run-config field")
            out[path] = tuple(value)

    if "sweep" in config and "axes" in config.sweep:
        walk(config.sweep.axes, "")
    return out


@dataclasses.dataclass(frozen=True)
class Cell:
    """One results row to produce. `config` is the run config with every axis set to one value."""

    config: ml_collections.ConfigDict
    category: str
    ratio: float
    method: str
    axes: dict[str, Any]  # the explicit axes' values at this point
    id: str
    fit_key: str
    noisy: str
    # `eval.map_images` parsed (`parse_map_images`): (category, path suffix) pairs
    map_images: tuple[tuple[str, str], ...] = ()

    def spec(self) -> methods.MethodSpec:
        return methods.spec(self.method, options.method_options(self.config))

    def row_fields(self) -> dict[str, Any]:
        """Hyperparameters for the results row, by config path (implicit axes and the seed already
        have their own row fields)."""
        paths = [p for p in (*ROW_FIELDS, *self.axes) if p not in (*IMPLICIT, "seed")]
        return {p: get_path(self.config, p) for p in dict.fromkeys(paths)}


def _without(d: dict, paths: tuple[str, ...]) -> dict:
    d = copy.deepcopy(d)
    for path in paths:
        *parents, leaf = path.split(".")
        node = d
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return d


def _keys(run: dict) -> tuple[str, str, str]:
    cell_id = digest(_without(run, NO_EFFECT))
    fit_key = digest(_without(run, NO_EFFECT + BANK_ONLY + AFTER_FIT))
    noisy = {k: run[k] for k in ("dataset", "backbone", "embedding", "noise")}
    if float(run["noise"]["ratios"]) > 0:
        noisy["seed"] = run["seed"]
    else:  # nothing injected: the same training set for every seed and mode
        noisy["noise"] = {"ratios": run["noise"]["ratios"]}
    return cell_id, fit_key, digest(_without(noisy, NO_EFFECT))


def expand(config: ml_collections.ConfigDict, list_categories) -> list[Cell]:
    """All cells of the sweep, without duplicates, in the order of the axes' product.

    Args:
      config: run config with a `sweep.axes` section (or none: then the run's own comma lists).
      list_categories: dataset config section -> the category names to run (data.categories).
    """
    grid = axes(config)
    base = copy.deepcopy(config)
    cells: dict[str, Cell] = {}
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        cfg = copy.deepcopy(base)
        for path, value in point.items():
            set_path(cfg, path, value)
        options.method_specs(cfg)  # a typo in a method or discriminator name fails before any work
        map_images = tuple(parse_map_images(cfg.eval.map_images))
        for category in list_categories(cfg.dataset):
            for ratio in parse_ratios(cfg.noise.ratios):
                for method in split_list(cfg.methods):
                    one = copy.deepcopy(cfg)
                    one.dataset.categories = category
                    one.noise.ratios = repr(float(ratio))
                    one.methods = method
                    run = one.to_dict()
                    run.pop("sweep", None)
                    cell_id, fit_key, noisy = _keys(run)
                    if cell_id not in cells:
                        cells[cell_id] = Cell(
                            one,
                            category,
                            float(ratio),
                            method,
                            point,
                            cell_id,
                            fit_key,
                            noisy,
                            map_images,
                        )
    return list(cells.values())


def parse_map_images(spec: str) -> list[tuple[str, str]]:
    """`eval.map_images` ("pill/crack/003.png,wood/good/000.png") -> [(category, path suffix)];
    parsed once per grid point (`Cell.map_images`)."""
    out = []
    for item in (s.strip() for s in str(spec or "").split(",")):
        if not item:
            continue
        category, _, rest = item.replace(os.sep, "/").partition("/")
        if not category or not rest:
            raise ValueError(
                f"eval.map_images entry {item!r}: expected CATEGORY/PATH, e.g. pill/crack/003.png "
                "(the image's path under its category's test images)"
            )
        out.append((category, rest))
    return out


def group(items, key) -> dict:
    """Items grouped by key(item), groups and members in first-appearance order."""
    out: dict = {}
    for item in items:
        out.setdefault(key(item), []).append(item)
    return out
