"""Checks shared by the dataset readers (METHOD.md section 7), so that a wrong root, a layout
mismatch, a missing mask or an empty split fails at once with the file and what was expected,
instead of surfacing later as a shape error or a silently wrong metric.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from softpatch_jax.data import registry
from softpatch_jax.data.records import CategorySplits

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def expected(layout: str) -> str:
    """What `layout` looks like at its root (its registered `Layout.expected`), for messages."""
    entry = registry.LAYOUTS.get(layout)
    return entry.expected if entry is not None else "its own layout"


def _subdirs(root: str) -> list[str]:
    try:
        return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    except OSError:
        return []


def has_category_with(root: str, *parts: str) -> bool:
    """Whether some sub-folder of `root` has the folder ROOT/SUB/*parts (MVTec's train/good,
    BTAD's train/ok): a `Layout.looks_like` building block."""
    return any(os.path.isdir(os.path.join(root, d, *parts)) for d in _subdirs(root))


def has_subdir_starting(root: str, prefix: str) -> bool:
    return any(d.startswith(prefix) for d in _subdirs(root))


def guess_layout(root: str) -> str | None:
    """Which registered layout `root` looks like (`Layout.looks_like`; their tests are disjoint),
    or a phrase for a near miss; None when nothing fits."""
    for name in registry.names():
        looks_like = registry.LAYOUTS[name].looks_like
        if looks_like is not None and looks_like(root):
            return name
    if os.path.isdir(os.path.join(root, "train", "good")) or os.path.isdir(
        os.path.join(root, "train", "ok")
    ):
        return "a single category folder (point the root at its parent)"
    return None


def require_root(root: str, layout: str) -> None:
    """Raises unless `root` names an existing directory."""
    if not root:
        raise ValueError(
            f"dataset root is empty: set --config.dataset.root=PATH (layout {layout!r} expects "
            f"{expected(layout)})"
        )
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset root {root!r} does not exist or is not a directory")


def categories_with_train(root: str, layout: str, normal: str) -> list[str]:
    """Sub-folders of `root` that have a train/`normal` folder (MVTec's and BTAD's layouts); an
    error naming the layout when there are none."""
    require_root(root, layout)
    cats = sorted(
        d
        for d in os.listdir(root)
        if not d.startswith(".") and os.path.isdir(os.path.join(root, d, "train", normal))
    )
    if not cats:
        raise wrong_layout(root, layout, f"no category with train/{normal} under {root!r}")
    return cats


def wrong_layout(root: str, layout: str, detail: str) -> FileNotFoundError:
    """The error for a root that is not in `layout`'s layout, with a guess at what it is."""
    guess = guess_layout(root)
    hint = ""
    if guess is not None and guess != layout:
        hint = f"; {root!r} looks like " + (
            f"layout {guess!r}: set --config.dataset.layout={guess}"
            if guess in registry.LAYOUTS
            else guess
        )
    return FileNotFoundError(f"{detail}: layout {layout!r} expects {expected(layout)}{hint}")


def list_images(folder: str) -> list[str]:
    """Image files directly in `folder`, sorted; hidden files (e.g. macOS '._' forks) skipped."""
    return sorted(
        os.path.join(folder, f)
        for f in os.listdir(folder)
        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
    )


def find_mask(mask_dir: str, stem: str, suffixes: Sequence[str]) -> tuple[str | None, list[str]]:
    """The first existing STEM+SUFFIX+EXT under `mask_dir`, and every candidate tried."""
    candidates = [
        os.path.join(mask_dir, stem + suffix + ext)
        for suffix in suffixes
        for ext in (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")
    ]
    return next((c for c in candidates if os.path.isfile(c)), None), candidates


def check_category(root: str, category: str, have: Sequence[str]) -> None:
    if category not in have:
        raise FileNotFoundError(
            f"category {category!r} not found under {root!r}; have: {list(have)}"
        )


def check_splits(splits: CategorySplits, source: str) -> CategorySplits:
    """Raises unless the training split is all normal and the test split holds both classes.

    Image AUROC is undefined without both classes, and a labelled anomaly in the training listing
    would be noise that the noisy-set construction (METHOD.md section 6) cannot account for.
    """
    where = f"category {splits.category!r} ({source})"
    bad = [r.path for r in splits.train if r.label != 0]
    if bad:
        raise ValueError(f"{where}: the training split lists anomalous images, e.g. {bad[0]!r}")
    labels = {r.label for r in splits.test}
    if 0 not in labels:
        raise ValueError(f"{where}: the test split has no normal images")
    if 1 not in labels:
        raise ValueError(f"{where}: the test split has no anomalous images")
    return splits
