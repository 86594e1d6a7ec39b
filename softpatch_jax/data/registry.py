"""The dataset layout registry (METHOD.md section 7): what a layout declares, in one module of
`data/layouts/`, so that every reader of layouts (`data.categories` / `read` / `loader`, the
validation messages of `validate.py`, the TFDS builders of `tfds_builders.py`, the miniature trees
of the tests) finds it here and nowhere else.

A layout is registered by `register(Layout(...))` when its module is imported; `data/layouts/`
imports every module in it, and `softpatch_jax.data` imports that package.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from softpatch_jax.data.records import CategorySplits


@dataclasses.dataclass(frozen=True)
class TfdsBuilder:
    """How `tfds_builders.py` builds this layout's TFDS builder (a `dataset.prepared` store).

    class_name: the builder class's name; TFDS names the dataset by it in snake case
      (`MvtecAd` -> `mvtec_ad`), which is also the store's folder and part of its fingerprint.
    description: the builder's docstring (the dataset's description).
    resize: the papers' resize, listed as a builder config per category (0: none listed, every
      config made on demand).
    """

    class_name: str
    description: str
    resize: int
    homepage: str
    instructions: str  # MANUAL_DOWNLOAD_INSTRUCTIONS: where the manual dir points


@dataclasses.dataclass(frozen=True)
class Layout:
    """One dataset layout (`config.dataset.layout`).

    name: the config value.
    list_categories: (root, **reader options) -> the categories found under root, checked.
    read_category: (root, category, **reader options) -> `CategorySplits`, validated (every check
      naming the file and what was expected).
    expected: what the layout looks like at its root, for error messages (`validate.wrong_layout`).
    looks_like: root -> whether a folder looks like this layout (`validate.guess_layout`: a wrong
      `dataset.layout` is told the right one); None: never guessed (a layout that reuses another's
      folder format, as the demo does MVTec's).
    resolve_root: the config's root -> the folder to read; None: the root must be given.
    reader_options: (split, resolution) -> the reader's options beyond (root, category), checked
      (Real-IAD's); None: the layout has none, and those fields are unused.
    fixed_noise: reader options -> whether the split itself fixes the training set's noise, so that
      injecting more would change the benchmark (Real-IAD's FUIAD splits).
    categories: the published categories (the TFDS builder's configs).
    tfds: the TFDS builder hook; None: no prepared store for this layout.
    miniature: (root, rng) -> (root to read, reader options): writes a tiny tree in this layout,
      for tests/test_registered.py (every registered layout is listed, read and loaded from it).
    """

    name: str
    list_categories: Callable[..., list[str]]
    read_category: Callable[..., CategorySplits]
    expected: str
    miniature: Callable[[str, np.random.Generator], tuple[str, dict[str, str]]]
    looks_like: Callable[[str], bool] | None = None
    resolve_root: Callable[[str], str] | None = None
    reader_options: Callable[[str, str], dict[str, str]] | None = None
    fixed_noise: Callable[[dict[str, str]], bool] | None = None
    categories: tuple[str, ...] = ()
    tfds: TfdsBuilder | None = None

    def root(self, root: str) -> str:
        """The folder to read for the config's `root`."""
        if self.resolve_root is not None:
            return self.resolve_root(root)
        if not root:
            raise ValueError(
                f"config.dataset.root is empty: set --config.dataset.root=PATH "
                f"for layout {self.name!r}"
            )
        return root

    def options(self, split: str, resolution: str) -> dict[str, str]:
        """The reader's options beyond (root, category), checked; {} for most layouts."""
        if self.reader_options is None:
            return {}
        return self.reader_options(str(split), str(resolution))


LAYOUTS: dict[str, Layout] = {}


def register(layout: Layout) -> Layout:
    """Adds `layout` under its name (once; a second module claiming the name is an error)."""
    if layout.name in LAYOUTS:
        raise ValueError(f"dataset layout {layout.name!r} is registered twice")
    LAYOUTS[layout.name] = layout
    return layout


def get(name: str) -> Layout:
    """The registered layout `name`, or an error listing the valid names."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown dataset layout {name!r}; valid: {sorted(LAYOUTS)}")
    return LAYOUTS[name]


def names() -> tuple[str, ...]:
    return tuple(sorted(LAYOUTS))
