"""Miniature copies of the official dataset layouts (METHOD.md section 7) for tests: each layout
module of softpatch_jax/data/layouts/ declares its writer (`Layout.miniature`); the ones with
options (categories, sizes, a byte-order mark, ...) are re-exported here under the tests' names.
Each `make_*` returns a `Tree` that records what was written, the oracle the readers are checked
against (`make_realiad` returns the root; `realiad_expected` judges its files).
"""

from __future__ import annotations

import os

import numpy as np

from softpatch_jax import data
from softpatch_jax.data import layouts
from softpatch_jax.data.layouts.miniature import Item, Tree

__all__ = [
    "BTAD_FORMATS",
    "Item",
    "Tree",
    "layout_tree",
    "make_btad",
    "make_mvtec",
    "make_realiad",
    "make_visa",
    "realiad_expected",
]

make_mvtec = layouts.mvtec.make
make_visa = layouts.visa.make
make_btad = layouts.btad.make
make_realiad = layouts.realiad.make
BTAD_FORMATS = layouts.btad.FORMATS


def layout_tree(layout: str, root: str, rng: np.random.Generator) -> tuple[str, dict[str, str]]:
    """(root, reader options) of the miniature tree that `layout` declares, written under root."""
    return data.LAYOUTS[layout].miniature(root, rng)


def realiad_expected(root: str, category: str, split: str) -> dict[str, list]:
    """What the reader should return, judged from the files rather than the JSON's classes: a test
    image is anomalous when it lies under NG/CODE/ with a .png mask of the same stem; every
    training image is unlabelled. Membership of train / test comes from the split's JSON.

    Returns {"train": [(path, 0, "good", None)], "test": [(path, label, defect, mask)],
    "train_anomalous": [path]}, each sorted.
    """
    import json

    from softpatch_jax.data import realiad

    folder = realiad.SPLITS[split]
    flat = os.path.join(root, folder, f"{category}.json")
    path = (
        flat
        if os.path.isfile(flat)
        else os.path.join(root, "realiad_jsons", folder, f"{category}.json")
    )
    with open(path) as f:
        doc = json.load(f)
    base = os.path.join(root, "realiad_256", category)
    out: dict[str, list] = {"train": [], "test": [], "train_anomalous": []}
    for split_name in ("train", "test"):
        for item in doc[split_name]:
            image = os.path.join(base, item["image_path"])
            parts = item["image_path"].split("/")
            mask = os.path.splitext(image)[0] + ".png"
            anomalous = parts[0] == "NG" and os.path.isfile(mask)
            if split_name == "train":
                out["train"].append((image, 0, "good", None))
                if anomalous:
                    out["train_anomalous"].append(image)
            elif anomalous:
                out["test"].append((image, 1, parts[1], mask))
            else:
                out["test"].append((image, 0, "good", None))
    return {k: sorted(v) for k, v in out.items()}
