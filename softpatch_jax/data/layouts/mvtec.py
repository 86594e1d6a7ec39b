"""The `mvtec` layout: MVTec AD's folders (reader: `data/mvtec.py`), also any dataset in its layout."""

from __future__ import annotations

import os

import numpy as np

from softpatch_jax.data import mvtec, registry, validate
from softpatch_jax.data.layouts import miniature
from softpatch_jax.data.layouts.miniature import Item, Tree


def make(
    root: str,
    rng: np.random.Generator,
    categories: tuple[str, ...] = ("widget", "gizmo"),
    n_train: int = 6,
    n_good: int = 3,
    defects: dict[str, int] | None = None,
    hw: tuple[int, int] = (20, 24),
) -> Tree:
    """ROOT/CAT/train/good, ROOT/CAT/test/{good,DEFECT}, ROOT/CAT/ground_truth/DEFECT/*_mask.png;
    the second category grayscale (as MVTec's grid, screw, zipper), and a stray file at the root."""
    defects = defects or {"dent": 2, "scratch": 3}
    tree = Tree(root, {})
    with open(os.path.join(miniature.mkdir(root), "license.txt"), "w") as f:
        f.write("not a category\n")
    for ci, cat in enumerate(categories):
        items = []
        gray = ci == 1
        for i in range(n_train):
            rel = f"{cat}/train/good/{i:03d}.png"
            miniature.write(tree, rel, miniature.image(rng, hw, gray))
            items.append(Item(rel, "train", 0, "good"))
        for i in range(n_good):
            rel = f"{cat}/test/good/{i:03d}.png"
            miniature.write(tree, rel, miniature.image(rng, hw, gray))
            items.append(Item(rel, "test", 0, "good"))
        for defect, n in defects.items():
            for i in range(n):
                rel = f"{cat}/test/{defect}/{i:03d}.png"
                mask_rel = f"{cat}/ground_truth/{defect}/{i:03d}_mask.png"
                miniature.write(tree, rel, miniature.image(rng, hw, gray))
                miniature.write(tree, mask_rel, miniature.mask(rng, hw))
                items.append(Item(rel, "test", 1, defect, mask_rel))
        tree.items[cat] = items
    return tree


LAYOUT = registry.register(
    registry.Layout(
        name="mvtec",
        list_categories=mvtec.list_categories,
        read_category=mvtec.read_category,
        expected="ROOT/CATEGORY/train/good/*.png, ROOT/CATEGORY/test/{good,DEFECT}/*.png, "
        "ROOT/CATEGORY/ground_truth/DEFECT/*_mask.png",
        looks_like=lambda root: validate.has_category_with(root, "train", mvtec.NORMAL),
        miniature=lambda root, rng: (make(root, rng).root, {}),
        categories=mvtec.CATEGORIES,
        tfds=registry.TfdsBuilder(
            class_name="MvtecAd",
            description="MVTec AD, 15 categories: ROOT/CATEGORY/{train,test,ground_truth}.",
            resize=256,
            homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
            instructions="Download mvtec_anomaly_detection.tar.xz from the MVTec AD page and "
            "extract it; the manual dir is the folder holding bottle/, cable/, ... (pass it as "
            "--config.dataset.root).",
        ),
    )
)
