"""Shared by the sweep configs: the run config of a dataset plus an empty `sweep` section.

A sweep config is a run config (configs/base.py and a dataset's differences) plus `sweep`:
  sweep.axes       the grid, shaped like the run config; each leaf a tuple of values for that field,
                   e.g. axes.softpatch.tau = (0.05, 0.15). `dataset.categories`, `noise.ratios` and
                   `methods` are comma lists that expand into cells even without an axis.
  sweep.cache_dir  features and discriminator scores, keyed by content ("" = WORKDIR/cache); share
                   it between sweeps on the same data to reuse their features.
  sweep.vmap       score banks of equal size in one vmapped call (False: one at a time through
                   scoring.predict, as a plain run does). Fitting is the same either way: the
                   library's path (memory_bank.prepare, fit_banks), every keep mask in one pass.
  sweep.report     hints for `python -m softpatch_jax.report`: `columns` (row fields that name a
                   table column, besides the method) and `curves` (x axes of the curve plots).
The dataset comes from the config argument: `--config=configs/sweeps/NAME.py:demo|mvtec|visa`
(`fuiad.py`: `:realiad`).
"""

import ml_collections

from configs import base, demo, realiad

DATASETS = ("demo", "mvtec", "visa", "realiad")


def run_config(dataset: str) -> ml_collections.ConfigDict:
    """The run config of `dataset` (demo: the built-in synthetic data on efficientnet_lite0 with its
    ImageNet weights, as configs/demo.py)."""
    if dataset == "demo":
        c = demo.get_config()
    elif dataset == "mvtec":
        c = base.get_config()  # set --config.dataset.root=/path/to/mvtec_ad
    elif dataset == "visa":
        c = base.get_config()
        c.dataset.name = "visa"
        c.dataset.layout = "visa"  # the VisA reader (split_csv/1cls.csv); set dataset.root
    elif dataset == "realiad":
        c = realiad.get_config()  # set dataset.root; the split is the sweep's axis
    else:
        raise ValueError(f"unknown sweep dataset {dataset!r}; valid: {DATASETS}")
    # Save a few test images' anomaly maps per cell (0 = none): the anomaly-map figure reads them.
    c.eval.save_maps = 0
    return c


def with_sweep(
    c: ml_collections.ConfigDict, columns: str = "", curves: str = ""
) -> ml_collections.ConfigDict:
    c.sweep = ml_collections.ConfigDict()
    c.sweep.axes = ml_collections.ConfigDict()
    c.sweep.cache_dir = ""
    c.sweep.vmap = True
    c.sweep.report = ml_collections.ConfigDict({"columns": columns, "curves": curves})
    return c


def axis(c: ml_collections.ConfigDict, path: str, values: tuple) -> None:
    """Adds the axis `path` (dotted config path) with `values`."""
    *parents, leaf = path.split(".")
    node = c.sweep.axes
    for part in parents:
        if part not in node:
            node[part] = ml_collections.ConfigDict()
        node = node[part]
    node[leaf] = tuple(values)


def max_noise(dataset: str, overlap: bool) -> float:
    """The largest ratio the test set can supply: no-overlap mode removes the injected anomalies
    from the test set, so MVTec stops at 10% and VisA at 8% (journal section 4)."""
    if overlap:
        return 0.4
    return {"mvtec": 0.1, "visa": 0.08}.get(dataset, 0.1)
