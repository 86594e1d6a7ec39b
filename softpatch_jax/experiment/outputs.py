"""What an experiment writes besides its results log: each finished cell's results row (the fields
of results.jsonl, results.json and results.csv), the anomaly maps it saves of a few test images for
the report's figures, and a plain run's own files (results.json/csv, summary.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import numpy as np

from softpatch_jax import data, metrics, report
from softpatch_jax.experiment import grid, options, plan
from softpatch_jax.io_utils import atomic_open, write_csv, write_json

# Row fields left out of a plain run's results.csv: lists (injected images), a sweep's axes (none in
# a run); the cell id (the name of its maps/ file) goes last, after the numbers.
_NOT_IN_CSV = ("injected", "axes", "cell_id")


@dataclasses.dataclass
class EvalSet:
    """The test side of one noisy set: features on the device, labels, masks and records."""

    feats_TxPxD: jax.Array
    labels: np.ndarray
    masks: np.ndarray
    records: tuple
    # The test images [T, H, W, 3] uint8 as decoded for extraction in this process; None after a
    # features cache hit (the saved maps then decode the few they show, into `shown`).
    images: np.ndarray | None = None
    shown: dict = dataclasses.field(default_factory=dict)  # decoded on demand for saved maps
    original_masks: list | None = None  # at each image's own size (official_eval), on demand


def cell_row(
    cell: grid.Cell,
    result: dict,
    banks,
    *,
    num_train: int,
    num_test: int,
    times: dict,
    injected,
    weights: str | None,
    source_anomalous: int = 0,
    source_samples: tuple[int, int] = (0, 0),
) -> dict:
    """The cell's results row: its id, metrics, noise and data settings, bank sizes, stage times,
    hyperparameters (`Cell.row_fields`) and axes.

    `train_anomalous` counts the training images known to be anomalous: those the dataset's own
    training list holds (`source_anomalous`: Real-IAD's FUIAD splits) plus the injected ones; its
    fraction of `num_train` is the true noise ratio of what the banks were fitted on, counted in
    images. Where images are views of samples (`source_samples` = (defective, all) samples of the
    training list, Real-IAD) and nothing was injected, `train_anomalous_sample_fraction` counts
    samples, what a FUIAD split's name counts.
    """
    config = cell.config
    spec = plan.noise_spec(config, cell.ratio)
    anomalous = source_anomalous + len(injected)
    return {
        "cell_id": cell.id,
        "category": cell.category,
        "method": cell.method,
        **{k: result[k] for k in metrics.ALL if k in result},
        "noise_ratio": spec.ratio,
        "overlap": spec.overlap,
        "seed": config.seed,
        "weights": weights,
        "arch": config.backbone.arch,
        "num_train": num_train,
        "num_injected": len(injected),
        "num_test": num_test,
        "train_anomalous": anomalous,
        "train_anomalous_fraction": round(anomalous / max(num_train, 1), 6),
        **(
            {
                "train_samples": source_samples[1],
                "train_anomalous_samples": source_samples[0],
                "train_anomalous_sample_fraction": round(source_samples[0] / source_samples[1], 6),
            }
            if source_samples[1] and not injected
            else {}
        ),
        **{
            f"dataset.{k}": v
            for k, v in data.options(options.dataset_options(config.dataset)).items()
        },
        "bank_cls": int(banks.cls.feats_MxD.shape[0]),
        "bank_seg": int(banks.seg.feats_MxD.shape[0]),
        **{f"time_{k}": round(v, 4) for k, v in times.items()},
        "injected": [r.path for r in injected],
        **cell.row_fields(),
        "axes": cell.axes,
    }


def save_cell_maps(workdir: str, cell: grid.Cell, row: dict, maps, evalset: EvalSet) -> None:
    """WORKDIR/maps/CELL_ID.npz: the maps of `eval.save_maps` test images and of those
    `eval.map_images` names (none: nothing written)."""
    count = int(cell.config.eval.save_maps)
    chosen = cell.map_images
    if not (count or chosen):
        return
    # Chosen images were checked against the full test set up front; a no-overlap noisy set may
    # have moved some of them into training.
    idx = map_indices(
        evalset.labels, count, evalset.records, row["category"], chosen, required=False
    )
    if not len(idx):
        return
    records = [evalset.records[i] for i in idx]
    shown_key = tuple(idx.tolist())
    if evalset.images is not None:  # decoded once already, for extraction
        evalset.shown[shown_key] = evalset.images[idx]
    elif shown_key not in evalset.shown:
        ds = cell.config.dataset
        evalset.shown[shown_key] = data.loader(options.dataset_options(ds), row["category"])(
            records
        )[0]
    save_maps(
        os.path.join(workdir, "maps", f"{cell.id}.npz"),
        records,
        evalset.shown[shown_key],
        evalset.masks[idx],
        np.asarray(maps)[idx],
        {k: v for k, v in row.items() if k != "injected"},
    )


def map_indices(
    labels: np.ndarray,
    count: int,
    records=(),
    category: str = "",
    chosen: Sequence[tuple[str, str]] = (),
    required: bool = True,
) -> np.ndarray:
    """Which test images get their anomaly maps saved: `count` of them, one normal image and the
    rest anomalies spread evenly over the (defect-sorted) anomalous ones, so several defect types
    show; plus the images `plan.chosen_indices` finds for `category` in `records`.
    """
    labels = np.asarray(labels)
    anomalous = np.flatnonzero(labels == 1)
    normal = np.flatnonzero(labels == 0)
    picks = list(normal[:1]) if count > 1 else []
    k = min(count - len(picks), len(anomalous))
    if k > 0:
        picks += list(anomalous[np.linspace(0, len(anomalous) - 1, k).round().astype(int)])
    picks += plan.chosen_indices(records, category, chosen, required)
    return np.unique(np.asarray(picks, dtype=int))


def save_maps(path: str, records, images, masks, maps, meta: dict) -> None:
    """Anomaly maps of a few test images, for figures: npz written to a temp file then renamed."""
    with atomic_open(path, "wb") as f:
        np.savez(
            f,
            images=np.asarray(images, np.uint8),
            masks=np.asarray(masks, bool),
            maps=np.asarray(maps, np.float32),
            paths=np.asarray([r.path for r in records]),
            labels=np.asarray([r.label for r in records]),
            meta=np.asarray(json.dumps(meta, default=str)),
        )


def write_run(workdir: str, rows: list[dict], weights: dict) -> None:
    """A plain run's files: results.json (the rows, the backbone's provenance `weights`, devices,
    jax version), results.csv, and summary.md (also printed)."""
    meta = {
        "weights": weights,
        "devices": [str(d) for d in jax.devices()],
        "jax_version": jax.__version__,
    }
    write_json(os.path.join(workdir, "results.json"), {**meta, "rows": rows})
    write_csv(
        os.path.join(workdir, "results.csv"),
        [
            {**{k: v for k, v in r.items() if k not in _NOT_IN_CSV}, "cell_id": r["cell_id"]}
            for r in rows
        ],
    )
    table = report.summary_table(rows)
    with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table, flush=True)
