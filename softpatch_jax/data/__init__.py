"""Dataset readers, keyed by `config.dataset.layout` (METHOD.md section 7). Each reader lists
categories and returns `CategorySplits` of undecoded records (Real-IAD's also takes the
`dataset.split` and `dataset.resolution` options, `options`); `loader` gives the function that
turns records into arrays, by decoding the files (`preprocess.load_records`) or, with
`config.dataset.prepared`, from the TFDS store under `config.dataset.data_dir` (`prepared.py`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import numpy as np

from softpatch_jax.data import btad, mvtec, preprocess, realiad, visa
from softpatch_jax.data.records import CategorySplits, Record
from softpatch_jax.io_utils import split_list

Loader = Callable[[Sequence[Record]], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Options:
    """Where a run's images come from and how they are cut (the driver builds it from
    `config.dataset`; defaults live in configs/base.py)."""

    layout: str  # the reader (`LAYOUTS`)
    root: str  # "" = the demo's generated data (layout demo), else an error naming the field
    categories: str  # "all" or a comma list
    resize: int  # shorter side
    crop: int  # center crop
    prepared: bool  # read through the TFDS store
    data_dir: str  # the store's folder
    split: str  # Real-IAD's split (other layouts: unused)
    resolution: str  # Real-IAD's resolution (other layouts: unused)


def _demo_root(cfg: Options) -> str:
    from softpatch_jax.data import demo

    return demo.ensure(cfg.root or None)


def _root(cfg: Options) -> str:
    if not cfg.root:
        raise ValueError(
            f"config.dataset.root is empty: set --config.dataset.root=PATH "
            f"for layout {cfg.layout!r}"
        )
    return cfg.root


# layout -> (root resolver, list_categories(root), read_category(root, category))
LAYOUTS: dict[str, tuple[Callable, Callable, Callable]] = {
    "mvtec": (_root, mvtec.list_categories, mvtec.read_category),
    "visa": (_root, visa.list_categories, visa.read_category),
    "btad": (_root, btad.list_categories, btad.read_category),
    "realiad": (_root, realiad.list_categories, realiad.read_category),
    "demo": (_demo_root, mvtec.list_categories, mvtec.read_category),
}


def options(cfg: Options) -> dict[str, str]:
    """The reader's options beyond (root, category): Real-IAD's split and resolution, checked."""
    if cfg.layout != "realiad":
        return {}
    split, resolution = str(cfg.split), str(cfg.resolution)
    realiad.check_options(split, resolution)
    return {"split": split, "resolution": resolution}


def fixed_noise(cfg: Options) -> bool:
    """True when the split itself fixes the training set's noise (Real-IAD's FUIAD splits), so
    that injecting more (config.noise.ratios > 0) would change the benchmark."""
    return cfg.layout == "realiad" and options(cfg)["split"] in realiad.FUIAD_SPLITS


def _layout(cfg: Options):
    if cfg.layout not in LAYOUTS:
        raise ValueError(f"unknown dataset layout {cfg.layout!r}; valid: {sorted(LAYOUTS)}")
    return LAYOUTS[cfg.layout]


def categories(cfg: Options) -> list[str]:
    """The categories to run: config.dataset.categories ("all" or a comma list), checked."""
    resolve_root, list_cats, _ = _layout(cfg)
    root = resolve_root(cfg)
    have = list_cats(root, **options(cfg))
    if cfg.categories in ("", "all"):
        return have
    wanted = split_list(cfg.categories)
    missing = [c for c in wanted if c not in have]
    if missing:
        raise ValueError(f"categories {missing} not found under {root!r}; have: {have}")
    return wanted


def read(cfg: Options, category: str) -> CategorySplits:
    """One category's records, read and validated from the source files."""
    resolve_root, _, read_category = _layout(cfg)
    return read_category(resolve_root(cfg), category, **options(cfg))


def loader(cfg: Options, category: str) -> Loader:
    """records -> (images uint8 [N, crop, crop, 3], masks bool [N, crop, crop]) for one category.

    With `cfg.prepared` the category's store is checked against the source and (re)prepared here
    when missing or stale, once; the returned function then only reads. Without it, every call
    decodes the files. Both give identical arrays.
    """
    if not cfg.prepared:
        return functools.partial(preprocess.load_records, resize=cfg.resize, crop=cfg.crop)
    from softpatch_jax.data import prepared  # imports tensorflow_datasets; only when asked

    resolve_root, _, _ = _layout(cfg)
    store = prepared.ensure(
        cfg.layout,
        resolve_root(cfg),
        category,
        cfg.resize,
        cfg.data_dir,
        options=options(cfg),
    )
    return functools.partial(store.load_records, crop=cfg.crop)
