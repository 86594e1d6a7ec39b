"""Dataset readers, keyed by `config.dataset.layout` (METHOD.md section 7): the layouts are a
registry (`registry.py`, one module each in `layouts/`). Each lists categories and returns
`CategorySplits` of undecoded records (Real-IAD's also takes the `dataset.split` and
`dataset.resolution` options, `options`); `loader` gives the function that turns records into
arrays, by decoding the files (`preprocess.load_records`) or, with `config.dataset.prepared`, from
the TFDS store under `config.dataset.data_dir` (`prepared.py`).

What the package holds: the benchmark readers (`mvtec`, `visa`, `btad`, `realiad`, with `validate`
and `records`), their registry (`registry`, `layouts/`), preprocessing and the TFDS store
(`preprocess`, `prepared`, `tfds_builders`), noisy-set construction (`noise`), the generators of
synthetic data (`demo`, `realiad_demo`), and deploy's own I/O on unlabelled folders (`folder`,
`images`), which no benchmark reader uses.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import numpy as np

from softpatch_jax.data import layouts, preprocess, registry  # noqa: F401 (layouts: registers)
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


# layout name -> `registry.Layout` (one module each in data/layouts/)
LAYOUTS = registry.LAYOUTS


def options(cfg: Options) -> dict[str, str]:
    """The reader's options beyond (root, category) (Real-IAD's split and resolution), checked."""
    return registry.get(cfg.layout).options(cfg.split, cfg.resolution)


def fixed_noise(cfg: Options) -> bool:
    """True when the split itself fixes the training set's noise (Real-IAD's FUIAD splits), so
    that injecting more (config.noise.ratios > 0) would change the benchmark."""
    layout = registry.get(cfg.layout)
    return layout.fixed_noise is not None and layout.fixed_noise(options(cfg))


def categories(cfg: Options) -> list[str]:
    """The categories to run: config.dataset.categories ("all" or a comma list), checked."""
    layout = registry.get(cfg.layout)
    root = layout.root(cfg.root)
    have = layout.list_categories(root, **options(cfg))
    if cfg.categories in ("", "all"):
        return have
    wanted = split_list(cfg.categories)
    missing = [c for c in wanted if c not in have]
    if missing:
        raise ValueError(f"categories {missing} not found under {root!r}; have: {have}")
    return wanted


def read(cfg: Options, category: str) -> CategorySplits:
    """One category's records, read and validated from the source files."""
    layout = registry.get(cfg.layout)
    return layout.read_category(layout.root(cfg.root), category, **options(cfg))


def loader(cfg: Options, category: str) -> Loader:
    """records -> (images uint8 [N, crop, crop, 3], masks bool [N, crop, crop]) for one category.

    With `cfg.prepared` the category's store is checked against the source and (re)prepared here
    when missing or stale, once; the returned function then only reads. Without it, every call
    decodes the files. Both give identical arrays.
    """
    if not cfg.prepared:
        return functools.partial(preprocess.load_records, resize=cfg.resize, crop=cfg.crop)
    from softpatch_jax.data import prepared  # imports tensorflow_datasets; only when asked

    store = prepared.ensure(
        cfg.layout,
        registry.get(cfg.layout).root(cfg.root),
        category,
        cfg.resize,
        cfg.data_dir,
        options=options(cfg),
    )
    return functools.partial(store.load_records, crop=cfg.crop)
