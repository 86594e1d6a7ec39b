"""The `demo` layout: the built-in synthetic data (`data/demo.py`), generated on first use, in
MVTec AD's folder layout and read by its reader. Never guessed from a folder (it looks like
MVTec's) and no prepared store."""

from __future__ import annotations

import numpy as np

from softpatch_jax.data import demo, mvtec, registry

# The miniature: one category, a few 32-pixel images (the whole demo takes minutes to write).
TINY = demo.DemoSpec(size=32, num_train=8, num_test_good=3, num_per_defect=1, categories=("pill",))


def _miniature(root: str, rng: np.random.Generator) -> tuple[str, dict[str, str]]:
    del rng  # the demo generator is deterministic in its spec's seed
    return demo.write(root, TINY), {}


LAYOUT = registry.register(
    registry.Layout(
        name="demo",
        list_categories=mvtec.list_categories,
        read_category=mvtec.read_category,
        expected="the demo generator's tree (MVTec AD's layout); leave config.dataset.root "
        "empty to generate it",
        resolve_root=lambda root: demo.ensure(root or None),
        miniature=_miniature,
        categories=demo.CATEGORIES,
    )
)
