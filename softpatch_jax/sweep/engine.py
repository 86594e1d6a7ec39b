"""The experiment driver: every cell of a grid in one process, the expensive work done once. A
plain run (a config with no `sweep` section, `pipeline.run`) is the grid of its own comma lists
(categories x noise ratios x methods), fitted one bank at a time with its cache in memory.

Cells are grouped from the most to the least expensive shared work:
  category      -> read the records once;
  noisy set     -> clean features once per category, injected ones once per noisy set (cached);
  fit group     -> discriminator scores once per (noisy set, discriminator, k, projection)
                   (cached), then every tau / method / fusion choice fits its bank from them;
  distinct bank -> fitted and scored once, however many cells (rows) it serves.
Finished cells are skipped on re-runs (results.jsonl); compiled functions are reused throughout.
The cache is on disk for a sweep (shared between sweeps) and in memory, one category at a time,
for a plain run.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from softpatch_jax import (
    data,
    discriminators,
    experiment,
    features,
    metrics,
    parallel,
    progress,
)
from softpatch_jax.io_utils import check_writable, write_json
from softpatch_jax.sweep import cache, grid, jsonl, stages

RESULTS = "results.jsonl"
STATS = "stats.jsonl"


class Interrupted(Exception):
    """Raised by test hooks to stop a sweep between cells."""


@dataclasses.dataclass
class _Context:
    config: ml_collections.ConfigDict
    workdir: str
    store: cache.Cache
    stats: cache.Stats
    on_cell: Callable[[dict], None] | None
    total: int
    vmap: bool = True
    done: int = 0
    advance: Callable[[int], None] | None = None  # the sweep's progress bar, if one is drawn
    extractors: dict = dataclasses.field(default_factory=dict)

    def extractor(self, cfg: ml_collections.ConfigDict) -> tuple[features.Extractor, str]:
        """One extractor (and its compiled function) per backbone setting, for the whole sweep."""
        key = grid.digest(
            [
                cfg.backbone.to_dict(),
                cfg.embedding.to_dict(),
                cfg.dataset.crop,
                cfg.dataset.batch_size,
            ]
        )
        if key not in self.extractors:
            ex = features.build(cfg)
            if ex.random_init:
                logging.warning("=" * 78)
                logging.warning(features.RANDOM_INIT_WARNING)
                logging.warning("=" * 78)
            self.extractors[key] = (ex, cache.weights_id(ex.info, ex.variables))
        return self.extractors[key]


def _spec_key(spec) -> str:
    """Cells whose methods build the same banks (e.g. PatchCore at every tau) share one fit."""
    return grid.digest(dataclasses.asdict(dataclasses.replace(spec, name="")))


def _setting(cfg: ml_collections.ConfigDict) -> str:
    """Cells with equal data and backbone settings share one record listing and extractor."""
    return grid.digest([cfg.dataset.to_dict(), cfg.backbone.to_dict(), cfg.embedding.to_dict()])


def plan(config: ml_collections.ConfigDict) -> list[grid.Cell]:
    """The grid's cells (a plain run's: one per category, noise ratio and method), checked so that
    a misspelt metric, a noise ratio the split forbids or a misnamed map image fails here, before
    any work."""
    cells = grid.expand(config, data.categories)
    for c in cells:
        experiment.eval_metrics(c.config)
        experiment.check_noise(c.config, [c.ratio])
    chosen = {
        cat
        for c in cells
        for cat, _ in experiment.parse_map_images(c.config.eval.get("map_images", ""))
    }
    known = list(dict.fromkeys(c.category for c in cells))
    if unknown := sorted(chosen - set(known)):
        raise ValueError(f"eval.map_images names categories {unknown} not in this run: {known}")
    return cells


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    on_cell: Callable[[dict], None] | None = None,
) -> dict[str, int]:
    """Runs every unfinished cell of the sweep; returns this invocation's counters (`execute`)."""
    return execute(config, plan(config), workdir, on_cell=on_cell).counters


@dataclasses.dataclass
class Outcome:
    counters: dict[str, int]  # this invocation's work, cache hits and seconds
    rows: list[dict]  # the grid's rows in its order, from this invocation or earlier ones
    weights: list[dict]  # provenance (`Extractor.info`) of each backbone this invocation built


def execute(
    config: ml_collections.ConfigDict,
    cells: list[grid.Cell],
    workdir: str,
    *,
    on_cell: Callable[[dict], None] | None = None,
) -> Outcome:
    """Runs the unfinished ones of `cells` (from `plan(config)`).

    Appends one row per cell to WORKDIR/results.jsonl (finished cells are skipped on re-runs) and
    one line of counters per invocation to WORKDIR/stats.jsonl. A sweep (a config with a `sweep`
    section) also writes WORKDIR/sweep.json (the config and grid) and caches features and scores
    under config.sweep.cache_dir (default WORKDIR/cache); a plain run keeps them in memory.

    Args:
      on_cell: called with each row after it is appended (tests raise from it to interrupt).
    """
    check_writable(workdir)
    t0 = time.perf_counter()
    sweep = config.get("sweep")
    results_path = os.path.join(workdir, RESULTS)
    finished = {r.get("cell_id") for r in jsonl.read(results_path, repair=True)}
    # Categories run in the grid's order whatever is finished, so a resumed sweep goes on where it
    # stopped instead of starting the next category first.
    order = {cat: i for i, cat in enumerate(dict.fromkeys(c.category for c in cells))}
    pending = sorted((c for c in cells if c.id not in finished), key=lambda c: order[c.category])
    if sweep is not None:
        write_json(
            os.path.join(workdir, "sweep.json"),
            {"config": config.to_dict(), "axes": grid.axes(config), "num_cells": len(cells)},
        )
    stats = cache.Stats()
    stats.add("cells_total", len(cells))
    stats.add("cells_skipped", len(cells) - len(pending))
    logging.info(
        "%d cells, %d already finished, %d to run",
        len(cells),
        len(cells) - len(pending),
        len(pending),
    )
    if sweep is None:  # a plain run: the library path, one bank at a time; nothing cached on disk
        store, vmap = cache.Cache(None, stats), False
    else:
        store = cache.Cache(sweep.get("cache_dir") or os.path.join(workdir, "cache"), stats)
        vmap = sweep.get("vmap", True)
    ctx = _Context(config, workdir, store, stats, on_cell, total=len(pending), vmap=vmap)
    # Read every category and draw every noisy set first: an infeasible noise ratio fails here,
    # before hours of work, not when the sweep reaches it.
    groups = []
    for category, ccells in grid.group(pending, lambda c: c.category).items():
        for scells in grid.group(ccells, lambda c: _setting(c.config)).values():
            splits = data.read(scells[0].config.dataset, category)
            chosen = experiment.parse_map_images(scells[0].config.eval.get("map_images", ""))
            experiment.chosen_indices(splits.test, category, chosen)
            noisy = {}
            for c in scells:
                if c.noisy not in noisy:
                    noisy[c.noisy] = experiment.noisy_splits(c.config, splits, c.ratio)
            groups.append((category, scells, splits, noisy))
    try:
        with progress.bar("cells", len(pending), "cell") as ctx.advance:
            for group in groups:
                _run_setting(ctx, *group)
                store.memory.clear()  # a plain run's features: one category at a time
    finally:
        out = {**stats.as_dict(), "seconds": round(time.perf_counter() - t0, 3)}
        jsonl.append(os.path.join(workdir, STATS), out)
        logging.info("counters: %s", out)
    by_id = {r.get("cell_id"): r for r in jsonl.read(results_path)}
    rows = [by_id[c.id] for c in cells if c.id in by_id]
    return Outcome(out, rows, [ex.info for ex, _ in ctx.extractors.values()])


def _run_setting(ctx: _Context, category: str, cells: list[grid.Cell], splits, noisy_sets) -> None:
    cfg = cells[0].config
    ex, weights_id = ctx.extractor(cfg)
    base_key = cache.features_key(cfg, category, splits.train, splits.test, weights_id)

    add = ctx.stats.add

    def clean() -> dict[str, np.ndarray]:
        # Shared by all the category's noisy sets; the test masks too, so a cache hit decodes none.
        train, _ = experiment.extract(ex, splits.train, cfg, category, "clean", add)
        test, masks = experiment.extract(ex, splits.test, cfg, category, "test", add)
        return {"train": train, "test": test, "test_masks": masks}

    def injected_features(records, ncfg) -> dict[str, np.ndarray]:
        return {"train": experiment.extract(ex, records, ncfg, category, "injected", add)[0]}

    base: dict[str, np.ndarray] = {}  # loaded when the first unfinished noisy set needs it

    for noisy_id, ncells in grid.group(cells, lambda c: c.noisy).items():
        noisy, injected, spec = noisy_sets[noisy_id]
        ncfg = ncells[0].config
        t_feat = time.perf_counter()
        base = base or ctx.store.get("features", base_key, clean)
        train = base["train"]
        feats_key = base_key
        if injected:
            feats_key = cache.injected_key(base_key, spec, ncfg.seed, injected)
            extract = functools.partial(injected_features, injected, ncfg)
            inj = ctx.store.get("features", feats_key, extract)
            train = np.concatenate([train, inj["train"]])
        test_pos = {r.path: i for i, r in enumerate(splits.test)}
        keep = np.array([test_pos[r.path] for r in noisy.test])
        dtype = experiment.store_dtype(ncfg)  # after the cache, which holds what was extracted
        evalset = _EvalSet(
            jnp.asarray(base["test"][keep], dtype),
            np.array([r.label for r in noisy.test]),
            base["test_masks"][keep],
            noisy.test,
        )
        times = {"features": time.perf_counter() - t_feat}
        feats = jnp.asarray(train, dtype)
        anomalous = len(noisy.train_anomalous) + len(injected)
        logging.info(
            "%s noise %.0f%% (%s): %d train (%d injected, %d anomalous: %.1f%%), %d test",
            category,
            100 * spec.ratio,
            "overlap" if spec.overlap else "no-overlap",
            feats.shape[0],
            len(injected),
            anomalous,
            100 * anomalous / feats.shape[0],
            len(keep),
        )
        for gcells in grid.group(ncells, lambda c: c.fit_key).values():
            _run_fit_group(
                ctx, ex, category, feats, feats_key, evalset, gcells, injected, times, noisy
            )


@dataclasses.dataclass
class _EvalSet:
    feats_TxPxD: jax.Array
    labels: np.ndarray
    masks: np.ndarray
    records: tuple
    shown: dict = dataclasses.field(default_factory=dict)  # decoded on demand for saved maps


def _run_fit_group(
    ctx, ex, category, feats, feats_key, evalset, cells, injected, times, noisy
) -> None:
    cfg = cells[0].config
    key = experiment.category_key(cfg.seed, category)
    specs = {}
    for c in cells:
        specs.setdefault(_spec_key(c.spec()), c.spec())
    named = [dataclasses.replace(s, name=k) for k, s in specs.items()]
    names = tuple(n for n in discriminators.NAMES if any(n in s.discriminators() for s in named))
    timer = experiment.Timer()
    with timer("discriminators"):
        prepared = stages.prepare(ctx.store, key, feats, feats_key, cfg, names)
    with timer("fit"):
        banks = jax.block_until_ready(stages.fit(prepared, feats, cfg, named))
    ctx.stats.add("banks_fitted", len(named))
    by_scoring = grid.group(cells, lambda c: grid.digest(c.config.scoring.to_dict()))
    for scells in by_scoring.values():
        sc = scells[0].config.scoring
        wanted = {k: banks[k] for k in dict.fromkeys(_spec_key(c.spec()) for c in scells)}
        with timer("scoring"):
            shard = parallel.enabled(scells[0].config, "scoring")
            work = stages.scoring_work(wanted, evalset.feats_TxPxD.shape[0], ctx.vmap)
            what = f"scoring ({len(wanted)} method{'s' if len(wanted) > 1 else ''})"
            with progress.bar(what, work, "img") as update:
                test = evalset.feats_TxPxD
                predicted = stages.predict(wanted, test, ex, sc, ctx.vmap, shard, update)
                jax.block_until_ready(predicted)
        results = {}
        names = experiment.eval_metrics(scells[0].config)
        paths = [r.path for r in evalset.records]
        with timer("metrics"):
            for k, (image_scores, maps) in predicted.items():
                results[k] = metrics.evaluate(
                    image_scores, evalset.labels, maps, evalset.masks, names, paths
                )
        for c in scells:
            k = _spec_key(c.spec())
            _finish_cell(
                ctx,
                ex,
                c,
                results[k],
                banks[k],
                predicted[k][1],
                evalset,
                feats,
                injected,
                {**times, **timer.seconds},
                len(noisy.train_anomalous),
            )


def _finish_cell(
    ctx, ex, cell, result, banks, maps, evalset, feats, injected, times, source_anomalous
) -> None:
    spec = experiment.noise_spec(cell.config, cell.ratio)
    row = experiment.result_row(
        cell.config,
        cell.category,
        cell.method,
        result,
        banks,
        spec,
        num_train=int(feats.shape[0]),
        num_test=len(evalset.labels),
        times=times,
        injected=injected,
        weights=ex.info.get("weights"),
        source_anomalous=source_anomalous,
    )
    row = {"cell_id": cell.id, **row, **cell.row_fields(), "axes": cell.axes}
    num_maps = int(cell.config.eval.get("save_maps", 0))
    chosen = experiment.parse_map_images(cell.config.eval.get("map_images", ""))
    if num_maps or chosen:
        _save_maps(ctx, cell, row, maps, evalset, num_maps, chosen)
    jsonl.append(os.path.join(ctx.workdir, RESULTS), row)
    ctx.stats.add("cells_run")
    ctx.done += 1
    logging.info(
        "[%d/%d] %s %s noise %.2f seed %d%s: %s",
        ctx.done,
        ctx.total,
        cell.category,
        cell.method,
        cell.ratio,
        cell.config.seed,
        "".join(
            f" {k}={v}"
            for k, v in cell.axes.items()
            if k not in ("seed", "noise.ratios", "methods")
        ),
        metrics.describe(result),
    )
    if ctx.advance is not None:
        ctx.advance(1)
    if ctx.on_cell is not None:
        ctx.on_cell(row)


def _save_maps(ctx, cell, row, maps, evalset, count, chosen) -> None:
    # Chosen images were checked against the full test set up front; a no-overlap noisy set may
    # have moved some of them into training.
    idx = experiment.map_indices(
        evalset.labels, count, evalset.records, row["category"], chosen, required=False
    )
    if not len(idx):
        return
    records = [evalset.records[i] for i in idx]
    shown_key = tuple(idx.tolist())
    if shown_key not in evalset.shown:
        ds = cell.config.dataset
        evalset.shown[shown_key] = data.loader(ds, row["category"])(records)[0]
    experiment.save_maps(
        os.path.join(ctx.workdir, "maps", f"{cell.id}.npz"),
        records,
        evalset.shown[shown_key],
        evalset.masks[idx],
        np.asarray(maps)[idx],
        {k: v for k, v in row.items() if k != "injected"},
    )
