"""Dataset readers, keyed by `config.dataset.layout`. Each reader lists categories and returns
`CategorySplits` of undecoded records; `preprocess.load_records` decodes them."""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from softpatch_jax.data import mvtec
from softpatch_jax.data.records import CategorySplits


def _demo_root(cfg: ml_collections.ConfigDict) -> str:
    from softpatch_jax.data import demo

    return demo.ensure(cfg.root or None)


# layout -> (root resolver, list_categories(root), read_category(root, category))
LAYOUTS: dict[str, tuple[Callable, Callable, Callable]] = {
    "mvtec": (lambda cfg: cfg.root, mvtec.list_categories, mvtec.read_category),
    "demo": (_demo_root, mvtec.list_categories, mvtec.read_category),
}


def _layout(cfg: ml_collections.ConfigDict):
    if cfg.layout not in LAYOUTS:
        raise ValueError(f"unknown dataset layout {cfg.layout!r}; valid: {sorted(LAYOUTS)}")
    return LAYOUTS[cfg.layout]


def categories(cfg: ml_collections.ConfigDict) -> list[str]:
    """The categories to run: config.dataset.categories ("all" or a comma list), checked to exist."""
    resolve_root, list_cats, _ = _layout(cfg)
    root = resolve_root(cfg)
    if not root:
        raise ValueError(
            f"config.dataset.root is empty: set --config.dataset.root=PATH for layout {cfg.layout!r}"
        )
    have = list_cats(root)
    if cfg.categories in ("", "all"):
        return have
    wanted = [c.strip() for c in cfg.categories.split(",") if c.strip()]
    missing = [c for c in wanted if c not in have]
    if missing:
        raise ValueError(f"categories {missing} not found under {root!r}; have: {have}")
    return wanted


def read(cfg: ml_collections.ConfigDict, category: str) -> CategorySplits:
    resolve_root, _, read_category = _layout(cfg)
    return read_category(resolve_root(cfg), category)
