"""The experiment driver: every cell of a grid in one process, the expensive work done once. A
plain run (`run`: a config with no `sweep` section) is the grid of its own comma lists (categories
x noise ratios x methods), fitted one bank at a time with its cache in memory; a sweep (`sweep`)
adds the axes of `config.sweep`.

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
    contamination,
    discriminators,
    features,
    memory_bank,
    metrics,
    official_eval,
    parallel,
    progress,
)
from softpatch_jax.data.records import CategorySplits
from softpatch_jax.experiment import cache, grid, jsonl, options, outputs, plan, stages
from softpatch_jax.io_utils import check_writable, write_json

RESULTS = "results.jsonl"
STATS = "stats.jsonl"


class Interrupted(Exception):
    """Raised by test hooks to stop a sweep between cells."""


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Runs the configured experiment and returns its rows; writes config.json, results.json (rows
    and the backbone's weights, devices, jax version), results.csv and summary.md (and maps/*.npz
    of a few test images per method when config.eval.save_maps > 0). Cells finished by an earlier
    run in the same workdir (results.jsonl) are not run again. What `main.py` and notebooks call."""
    cells = plan.plan(config)  # every config error fails here, before any file is written
    check_writable(workdir)
    write_json(os.path.join(workdir, "config.json"), config.to_dict())
    out = execute(config, cells, workdir)
    built = out.weights or [
        features.build(options.extractor_options(config)).info
    ]  # none built: every cell was finished
    outputs.write_run(workdir, out.rows, built[0])
    return out.rows


def sweep(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    on_cell: Callable[[dict], None] | None = None,
) -> dict[str, int]:
    """Runs every unfinished cell of the sweep; returns this invocation's counters (`execute`).
    What `launch/sweep.py` calls; `python -m softpatch_jax.report --workdir=...` reads the rows."""
    return execute(config, plan.plan(config), workdir, on_cell=on_cell).counters


@dataclasses.dataclass
class Outcome:
    counters: dict[str, int]  # this invocation's work, cache hits and seconds
    rows: list[dict]  # the grid's rows in its order, from this invocation or earlier ones
    weights: list[dict]  # provenance (`Extractor.info`) of each backbone this invocation built


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
    # Given: called with each noisy training set and its config instead of fitting (`execute`).
    on_training_set: Callable[[NoisySet, ml_collections.ConfigDict], None] | None = None

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
            self.extractors[key] = stages.extractor(cfg)
        return self.extractors[key]


def execute(
    config: ml_collections.ConfigDict,
    cells: list[grid.Cell],
    workdir: str,
    *,
    on_cell: Callable[[dict], None] | None = None,
    on_training_set: Callable[[NoisySet, ml_collections.ConfigDict], None] | None = None,
) -> Outcome:
    """Runs the unfinished ones of `cells` (from `plan.plan(config)`).

    Appends one row per cell to WORKDIR/results.jsonl (finished cells are skipped on re-runs) and
    one line of counters per invocation to WORKDIR/stats.jsonl. A sweep (a config with a `sweep`
    section) also writes WORKDIR/sweep.json (the config and grid) and caches features and scores
    under config.sweep.cache_dir (default WORKDIR/cache); a plain run keeps them in memory.

    Args:
      on_cell: called with each row after it is appended (tests raise from it to interrupt).
      on_training_set: a study of the training sets alone (launch/contamination_study.py): called
        with each noisy training set (`NoisySet`: its features, which images were injected) and
        its config; nothing is fitted or scored and no row is written.
    """
    check_writable(workdir)
    t0 = time.perf_counter()
    section = config.get("sweep")
    results_path = os.path.join(workdir, RESULTS)
    finished = {r.get("cell_id") for r in jsonl.read(results_path, repair=True)}
    # Categories run in the grid's order whatever is finished, so a resumed sweep goes on where it
    # stopped instead of starting the next category first.
    order = {cat: i for i, cat in enumerate(dict.fromkeys(c.category for c in cells))}
    pending = sorted((c for c in cells if c.id not in finished), key=lambda c: order[c.category])
    if section is not None:
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
    if section is None:  # a plain run: the library path, one bank at a time; nothing cached on disk
        store, vmap = cache.Cache(None, stats), False
    else:
        store = cache.Cache(section.get("cache_dir") or os.path.join(workdir, "cache"), stats)
        vmap = section.get("vmap", True)
    ctx = _Context(
        config,
        workdir,
        store,
        stats,
        on_cell,
        total=len(pending),
        vmap=vmap,
        on_training_set=on_training_set,
    )
    settings = plan.read(pending)  # an infeasible noise ratio fails here, before hours of work
    try:
        with progress.bar("cells", len(pending), "cell") as ctx.advance:
            for setting in settings:
                _run_setting(ctx, setting)
                store.memory.clear()  # a plain run's features: one category at a time
    finally:
        out = {**stats.as_dict(), "seconds": round(time.perf_counter() - t0, 3)}
        jsonl.append(os.path.join(workdir, STATS), out)
        logging.info("counters: %s", out)
    by_id = {r.get("cell_id"): r for r in jsonl.read(results_path)}
    done = [by_id[c.id] for c in cells if c.id in by_id]
    return Outcome(out, done, [ex.info for ex, _ in ctx.extractors.values()])


def _run_setting(ctx: _Context, setting: plan.Setting) -> None:
    category, cells, splits = setting.category, setting.cells, setting.splits
    cfg = cells[0].config
    ex, weights_id = ctx.extractor(cfg)
    base_key = cache.features_key(cfg, category, splits.train, splits.test, weights_id)

    add = ctx.stats.add

    # The test images decoded for extraction, kept (outside the cache) for the saved maps; a cache
    # hit decodes none, and the maps then decode the few images they show.
    decoded: dict[str, np.ndarray] = {}

    def clean() -> dict[str, np.ndarray]:
        # Shared by all the category's noisy sets; the test masks too, so a cache hit decodes none.
        train, _ = stages.extract(ex, splits.train, cfg, category, "clean", add)
        decoded["test"], masks = stages.decode(splits.test, cfg, category)
        test = stages.features_of(ex, decoded["test"], "test", add)
        return {"train": train, "test": test, "test_masks": masks}

    def injected_features(records, ncfg) -> dict[str, np.ndarray]:
        return {"train": stages.extract(ex, records, ncfg, category, "injected", add)[0]}

    base: dict[str, np.ndarray] = {}  # loaded when the first unfinished noisy set needs it

    for noisy_id, ncells in grid.group(cells, lambda c: c.noisy).items():
        noisy, injected, spec = setting.noisy[noisy_id]
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
        dtype = stages.store_dtype(ncfg)  # after the cache, which holds what was extracted
        evalset = outputs.EvalSet(
            jnp.asarray(base["test"][keep], dtype),
            np.array([r.label for r in noisy.test]),
            base["test_masks"][keep],
            noisy.test,
            images=decoded["test"][keep] if "test" in decoded else None,
        )
        times = {"features": time.perf_counter() - t_feat}
        feats = jnp.asarray(train, dtype)
        anomalous = len(noisy.train_anomalous) + len(injected)
        logging.info(
            "%s %s noise %.0f%% (%s): %d train (%d injected, %d anomalous: %.1f%%), %d test",
            ncfg.dataset.name,
            category,
            100 * spec.ratio,
            "overlap" if spec.overlap else "no-overlap",
            feats.shape[0],
            len(injected),
            anomalous,
            100 * anomalous / feats.shape[0],
            len(keep),
        )
        # The oracle tau: the injected images' test masks (their augmentation moves them by a few
        # pixels at most); unknown where the source's own training list holds anomalies.
        truth = None
        if not noisy.train_anomalous:
            idx = [test_pos[r.path] for r in injected]
            masks = base["test_masks"][idx] if idx else np.zeros((0, 1, 1), bool)
            truth = contamination.true_patch_fraction(masks, ex.grid, int(feats.shape[0]))
        nset = NoisySet(ex, category, feats, feats_key, evalset, injected, times, noisy, truth)
        if ctx.on_training_set is not None:
            ctx.on_training_set(nset, ncfg)
            continue
        for gcells in grid.group(ncells, lambda c: c.fit_key).values():
            _run_fit_group(ctx, nset, gcells)


def _spec_key(spec) -> str:
    """Cells whose methods build the same banks (e.g. PatchCore at every tau) share one fit."""
    return grid.digest(dataclasses.asdict(dataclasses.replace(spec, name="")))


def _share_equal_banks(banks: dict) -> dict:
    """Banks with equal contents become one object, so scoring runs once for them: e.g. tau "auto"
    on a set it finds clean is PatchCore's bank (nothing removed, weights 1). The features follow
    from the indices, so indices and weights decide."""
    seen: dict = {}

    def one(bank):
        idx, w = jax.device_get((bank.index_M, bank.weights_M))
        return seen.setdefault((idx.tobytes(), w.tobytes()), bank)

    return {k: dataclasses.replace(b, cls=one(b.cls), seg=one(b.seg)) for k, b in banks.items()}


def _resolve_oracle(spec, truth: float | None):
    """The spec with tau "oracle" replaced by the true contaminated patch fraction."""

    def bank(b):
        if b is None or b.tau != "oracle":
            return b
        if truth is None:
            raise ValueError("tau='oracle' needs the injected images' masks (a noisy experiment)")
        return dataclasses.replace(b, tau=min(truth, 0.999))

    return dataclasses.replace(spec, cls=bank(spec.cls), seg=bank(spec.seg))


def _contamination_fields(spec, scores, truth: float | None) -> dict:
    """The row's contamination fields: the estimate (the spec's estimator under "auto", else the
    default) from the training set's raw scores, and the true patch fraction where known."""
    out: dict = {"tau_true": None if truth is None else round(truth, 6)}
    if contamination.source(scores) is None:
        return {**out, "tau_estimated": None, "image_fraction_estimated": None}
    return {**out, **memory_bank.contamination_summary(spec.cls, scores)[1]}


@dataclasses.dataclass
class NoisySet:
    """One noisy training set of a category and its test side: what every fit group on it shares."""

    ex: features.Extractor
    category: str
    feats: jax.Array  # training features [N, P, D] on the device
    feats_key: str  # their cache key (`cache.features_key` / `injected_key`)
    evalset: outputs.EvalSet
    injected: tuple  # records injected into the training set: the last len(injected) rows of feats
    times: dict[str, float]  # stage seconds so far (features), for the rows
    noisy: CategorySplits  # the noisy splits (`plan.noisy_splits`)
    truth: float | None  # the true contaminated patch fraction, where known (tau "oracle")


def _run_fit_group(ctx: _Context, nset: NoisySet, cells: list[grid.Cell]) -> None:
    ex, category, feats, evalset = nset.ex, nset.category, nset.feats, nset.evalset
    injected, noisy, truth = nset.injected, nset.noisy, nset.truth
    cfg = cells[0].config
    key = plan.category_key(cfg.seed, category)
    specs = {}
    for c in cells:
        specs.setdefault(_spec_key(c.spec()), c.spec())
    named = [dataclasses.replace(_resolve_oracle(s, truth), name=k) for k, s in specs.items()]
    names = tuple(n for n in discriminators.NAMES if any(n in s.discriminators() for s in named))
    timer = stages.Timer()
    with timer("discriminators"):
        prepared = stages.prepare(ctx.store, key, feats, nset.feats_key, cfg, names)
    with timer("fit"):
        banks = _share_equal_banks(jax.block_until_ready(stages.fit(prepared, feats, cfg, named)))
    ctx.stats.add("banks_fitted", len(named))
    by_scoring = grid.group(cells, lambda c: grid.digest(c.config.scoring.to_dict()))
    for scells in by_scoring.values():
        wanted = {k: banks[k] for k in dict.fromkeys(_spec_key(c.spec()) for c in scells)}
        with timer("scoring"):
            shard = parallel.enabled(scells[0].config.parallel.enabled, "scoring")
            work = stages.scoring_work(wanted, evalset.feats_TxPxD.shape[0], ctx.vmap)
            what = f"scoring ({len(wanted)} method{'s' if len(wanted) > 1 else ''})"
            with progress.bar(what, work, "img") as update:
                test = evalset.feats_TxPxD
                scoring_opts = options.scoring_options(scells[0].config)
                predicted = stages.predict(wanted, test, ex, scoring_opts, ctx.vmap, shard, update)
                jax.block_until_ready(predicted)
        results, frames = {}, {}
        names = plan.eval_metrics(scells[0].config)
        paths = [r.path for r in evalset.records]
        ev, ds = scells[0].config.eval, scells[0].config.dataset
        original = ev.get("pixel_resolution", "crop") == "original"
        with timer("metrics"):
            if (original or ev.get("adeval_pickle", False)) and evalset.original_masks is None:
                evalset.original_masks = official_eval.read_masks(evalset.records)
            sizes = [m.shape for m in evalset.original_masks or ()]
            for k, (image_scores, maps) in predicted.items():
                pixel_maps, pixel_masks = maps, evalset.masks
                if sizes:  # each map in its resized image's frame (official_eval)
                    frames[k] = official_eval.frame_maps(maps, sizes, ds.resize)
                if original:
                    pixel_maps = official_eval.upsample(frames[k], sizes)
                    pixel_masks = evalset.original_masks
                results[k] = metrics.evaluate(
                    image_scores, evalset.labels, pixel_maps, pixel_masks, names, paths
                )
        for c in scells:
            k = _spec_key(c.spec())
            row = outputs.cell_row(
                c,
                results[k],
                banks[k],
                num_train=int(feats.shape[0]),
                num_test=len(evalset.labels),
                times={**nset.times, **timer.seconds},
                injected=injected,
                weights=ex.info.get("weights"),
                source_anomalous=len(noisy.train_anomalous),
                source_samples=(noisy.train_anomalous_samples, noisy.train_samples),
            )
            row.update(_contamination_fields(c.spec(), prepared.scores_NxP, truth))
            outputs.save_cell_maps(ctx.workdir, c, row, predicted[k][1], evalset)
            if c.config.eval.get("adeval_pickle", False):
                path = official_eval.pickle_path(ctx.workdir, c.id)
                official_eval.write_pickle(path, evalset.records, frames[k], predicted[k][0])
            _finish_cell(ctx, c, row, results[k])


def _finish_cell(ctx: _Context, cell: grid.Cell, row: dict, result: dict) -> None:
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
