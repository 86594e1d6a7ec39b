"""The `realiad` layout: Real-IAD through its official JSON splits (reader: `data/realiad.py`;
miniature tree: `data/realiad_demo.py`)."""

from __future__ import annotations

import numpy as np

from softpatch_jax.data import realiad, registry, validate


def _options(split: str, resolution: str) -> dict[str, str]:
    realiad.check_options(split, resolution)
    return {"split": split, "resolution": resolution}


def make(root: str, rng: np.random.Generator, nested: bool = False) -> str:
    """A miniature Real-IAD tree (`realiad_demo.write`): audiojack and mint, 12 OK and 7 NG samples
    x 5 views, the NG samples' C5 view stored as "OK" with a null mask; one test set (2 OK + 3 NG
    samples) in every split, FUIAD training lists of 10 samples of which 10 x ratio are NG; every
    split's JSONs beside realiad_256/ or (`nested`) inside realiad_jsons/. Returns the root.
    (Imported here, not at the top: `python -m softpatch_jax.data.realiad_demo` runs it as
    __main__, which it must not be imported before.)"""
    from softpatch_jax.data import realiad_demo

    spec = realiad_demo.Spec(nested=nested)
    return realiad_demo.write(root, spec, seed=int(rng.integers(2**31)))


LAYOUT = registry.register(
    registry.Layout(
        name="realiad",
        list_categories=realiad.list_categories,
        read_category=realiad.read_category,
        expected="ROOT/realiad_RES/CATEGORY/{OK,NG}/... and ROOT/realiad_jsons_SPLIT/CATEGORY.json "
        "or ROOT/realiad_jsons/realiad_jsons_SPLIT/CATEGORY.json (RES = 256, 512, 1024, raw)",
        looks_like=lambda root: validate.has_subdir_starting(root, "realiad_jsons"),
        reader_options=_options,
        fixed_noise=lambda options: options["split"] in realiad.FUIAD_SPLITS,
        miniature=lambda root, rng: (
            make(root, rng),
            {"split": "fuiad_0.2", "resolution": "256"},
        ),
        categories=realiad.CATEGORIES,
        tfds=registry.TfdsBuilder(
            class_name="RealIad",
            description="Real-IAD, 30 objects x 5 views, split by its JSON files (standard, "
            "single view, FUIAD).",
            resize=0,  # one config per (split, resolution): made on demand
            homepage="https://realiad4ad.github.io/Real-IAD/",
            instructions="Request Real-IAD from its page and extract realiad_256 (or 512, 1024, "
            "raw) and the realiad_jsons* folders side by side; the manual dir is the folder "
            "holding them (pass it as --config.dataset.root).",
        ),
    )
)
