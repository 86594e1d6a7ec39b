"""The `visa` layout: VisA through its one-class split file (reader: `data/visa.py`)."""

from __future__ import annotations

import os

import numpy as np

from softpatch_jax.data import registry, visa
from softpatch_jax.data.layouts import miniature
from softpatch_jax.data.layouts.miniature import Item, Tree


def make(
    root: str,
    rng: np.random.Generator,
    categories: tuple[str, ...] = ("candle", "pcb1"),
    n_train: int = 6,
    n_good: int = 3,
    n_bad: int = 4,
    hw: tuple[int, int] = (20, 28),
    bom: bool = True,
) -> Tree:
    """ROOT/split_csv/1cls.csv + ROOT/OBJ/Data/Images/{Normal,Anomaly}/*.JPG + Data/Masks/Anomaly.

    Rows are written in shuffled order as in the official file; `bom` prepends a byte-order mark.
    """
    tree = Tree(root, {})
    rows = []
    for cat in categories:
        items = []
        for i in range(n_train + n_good):
            rel = f"{cat}/Data/Images/Normal/{i:04d}.JPG"
            miniature.write(tree, rel, miniature.image(rng, hw), "JPEG")
            split = "train" if i < n_train else "test"
            items.append(Item(rel, split, 0, "good"))
            rows.append(f"{cat},{split},normal,{rel},")
        for i in range(n_bad):
            rel = f"{cat}/Data/Images/Anomaly/{i:03d}.JPG"
            mask_rel = f"{cat}/Data/Masks/Anomaly/{i:03d}.png"
            miniature.write(tree, rel, miniature.image(rng, hw), "JPEG")
            miniature.write(tree, mask_rel, miniature.mask(rng, hw))
            items.append(Item(rel, "test", 1, "anomaly", mask_rel))
            rows.append(f"{cat},test,anomaly,{rel},{mask_rel}")
        tree.items[cat] = items
    order = rng.permutation(len(rows))
    text = "object,split,label,image,mask\n" + "".join(rows[i] + "\n" for i in order)
    with open(os.path.join(miniature.mkdir(os.path.join(root, "split_csv")), "1cls.csv"), "w") as f:
        f.write(("\ufeff" if bom else "") + text)
    return tree


LAYOUT = registry.register(
    registry.Layout(
        name="visa",
        list_categories=visa.list_categories,
        read_category=visa.read_category,
        expected="ROOT/split_csv/1cls.csv (columns object,split,label,image,mask) with image and "
        "mask paths relative to ROOT",
        looks_like=lambda root: os.path.isfile(os.path.join(root, visa.SPLIT_CSV)),
        miniature=lambda root, rng: (make(root, rng).root, {}),
        categories=visa.CATEGORIES,
        tfds=registry.TfdsBuilder(
            class_name="Visa",
            description="VisA, 12 objects, split by split_csv/1cls.csv.",
            resize=256,
            homepage="https://github.com/amazon-science/spot-diff",
            instructions="Download VisA_20220922.tar and extract it; the manual dir is the folder "
            "holding split_csv/1cls.csv and candle/, capsules/, ... (pass it as "
            "--config.dataset.root).",
        ),
    )
)
