"""The `demo` layout: the built-in synthetic data (`data/demo.py`), generated on first use, in
MVTec AD's folder layout and read by its reader. Never guessed from a folder (it looks like
MVTec's) and no prepared store."""

from __future__ import annotations

import numpy as np

from softpatch_jax.data import mvtec, registry

# The generator (data/demo.py) is imported only when used, so that importing softpatch_jax.data
# does not import it (`python -m softpatch_jax.data.demo` runs it as __main__).


def tiny_spec():
    """The miniature: one category, a few 32-pixel images (the whole demo takes minutes)."""
    from softpatch_jax.data import demo

    return demo.DemoSpec(
        size=32, num_train=8, num_test_good=3, num_per_defect=1, categories=("pill",)
    )


def _miniature(root: str, rng: np.random.Generator) -> tuple[str, dict[str, str]]:
    from softpatch_jax.data import demo

    del rng  # the demo generator is deterministic in its spec's seed
    return demo.write(root, tiny_spec()), {}


def _root(root: str) -> str:
    from softpatch_jax.data import demo

    return demo.ensure(root or None)


LAYOUT = registry.register(
    registry.Layout(
        name="demo",
        list_categories=mvtec.list_categories,
        read_category=mvtec.read_category,
        expected="the demo generator's tree (MVTec AD's layout); leave config.dataset.root "
        "empty to generate it",
        resolve_root=_root,
        miniature=_miniature,
    )
)
