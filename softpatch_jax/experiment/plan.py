"""What an experiment runs, checked and read before any work: the grid's cells (a misspelt metric, a
noise ratio the split forbids or a misnamed map image fails here), each category's records read once
and each cell's seeded noisy training set drawn (an infeasible noise ratio fails here, not hours into
a sweep), and each category's root key. Also the pieces of a cell its results row and saved maps
are built from: the noise spec, the metrics it reports, the map images it names
(`grid.Cell.map_images`, parsed once).
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from softpatch_jax import data, metrics, official_eval
from softpatch_jax.data import noise
from softpatch_jax.data.records import CategorySplits
from softpatch_jax.experiment import grid, options
from softpatch_jax.results import HEADLINE


def plan(config: ml_collections.ConfigDict) -> list[grid.Cell]:
    """The grid's cells (a plain run's: one per category, noise ratio and method), checked so that
    a misspelt metric, a noise ratio the split forbids or a misnamed map image fails here, before
    any work."""
    cells = grid.expand(config, lambda ds: data.categories(options.dataset_options(ds)))
    for c in cells:
        eval_metrics(c.config)
        official_eval.check_resolution(c.config.eval.get("pixel_resolution", "crop"))
        check_noise(c.config, [c.ratio])
    chosen = {cat for c in cells for cat, _ in c.map_images}
    known = list(dict.fromkeys(c.category for c in cells))
    if unknown := sorted(chosen - set(known)):
        raise ValueError(f"eval.map_images names categories {unknown} not in this run: {known}")
    return cells


@dataclasses.dataclass
class Setting:
    """Cells of one category with equal data and backbone settings: one record listing, one
    extractor, and every noisy training set they need, drawn."""

    category: str
    cells: list[grid.Cell]
    splits: CategorySplits
    noisy: dict[str, tuple]  # Cell.noisy -> `noisy_splits(...)`


def _setting(cfg: ml_collections.ConfigDict) -> str:
    return grid.digest([cfg.dataset.to_dict(), cfg.backbone.to_dict(), cfg.embedding.to_dict()])


def read(cells: Sequence[grid.Cell]) -> list[Setting]:
    """`cells` grouped by category, then by data and backbone setting, each group's records read
    and noisy sets drawn, and the map images each names found among its test images."""
    out = []
    for category, ccells in grid.group(cells, lambda c: c.category).items():
        for scells in grid.group(ccells, lambda c: _setting(c.config)).values():
            splits = data.read(options.dataset_options(scells[0].config.dataset), category)
            for chosen in dict.fromkeys(c.map_images for c in scells):
                chosen_indices(splits.test, category, chosen)
            noisy = {}
            for c in scells:
                if c.noisy not in noisy:
                    noisy[c.noisy] = noisy_splits(c.config, splits, c.ratio)
            out.append(Setting(category, scells, splits, noisy))
    return out


def check_noise(config: ml_collections.ConfigDict, ratios) -> None:
    """Raises unless every noise ratio is 0 where the dataset's split fixes the training noise
    (Real-IAD's FUIAD lists): injecting test anomalies on top would change the benchmark."""
    if data.fixed_noise(options.dataset_options(config.dataset)) and any(r > 0 for r in ratios):
        raise ValueError(
            f"dataset.split={config.dataset.split!r} fixes the training set's noise (its JSON "
            f"lists the noisy training set), so the project's own noise injection is off: set "
            f"--config.noise.ratios=0.0 (got {config.noise.ratios!r})"
        )


def _stable_id(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def category_key(seed: int, category: str) -> jax.Array:
    """The root key of one category's run: projection and coreset streams derive from it."""
    return jax.random.fold_in(jax.random.key(seed), _stable_id(category))


def noise_spec(config: ml_collections.ConfigDict, ratio: float) -> noise.NoiseSpec:
    n = config.noise
    return noise.NoiseSpec(ratio, bool(n.overlap), n.rotation_deg, n.translate)


def noisy_splits(config, splits, ratio: float):
    """(noisy splits, injected records, spec): the seeded noisy training set of one ratio.

    The generator is seeded from (seed, category, ratio, mode) only, so a sweep and a run with the
    same values inject the same images.
    """
    spec = noise_spec(config, ratio)
    rng = np.random.default_rng(
        [config.seed, _stable_id(splits.category), round(ratio * 1e6), int(spec.overlap)]
    )
    noisy = noise.inject(splits, spec, rng)
    return noisy, noisy.train[len(splits.train) :], spec


def chosen_indices(
    records, category: str, chosen: Sequence[tuple[str, str]], required: bool = True
) -> list[int]:
    """Indices into `records` of the images of `category` named in `chosen` ((category, path
    suffix) pairs, `grid.Cell.map_images`, matched against the end of each record's path).

    Raises ValueError naming a chosen image of this category that no record matches, unless not
    `required` (a no-overlap noisy set has moved some test anomalies into training).
    """
    paths = [str(r.path).replace(os.sep, "/") for r in records]
    picks = []
    for cat, suffix in chosen:
        if cat != category:
            continue
        hits = [i for i, p in enumerate(paths) if p.endswith("/" + suffix.lstrip("/"))]
        if not hits and required:
            example = paths[0].rsplit("/", 2)[-2:] if paths else []
            raise ValueError(
                f"eval.map_images entry {cat + '/' + suffix!r} matches none of the {len(paths)} test "
                f"images of category {cat!r} (e.g. {cat}/{'/'.join(example)})"
            )
        picks += hits
    return picks


def eval_metrics(config) -> tuple[str, ...]:
    """The metrics named by `eval.metrics` (a comma list, or "all"), and always image and pixel
    AUROC: the summary table and the report's curves are drawn from those two."""
    named = metrics.check_names(config.eval.metrics)
    return metrics.check_names([*HEADLINE, *named])
