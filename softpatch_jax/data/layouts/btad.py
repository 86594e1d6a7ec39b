"""The `btad` layout: BTAD, the BeanTech anomaly dataset (reader: `data/btad.py`)."""

from __future__ import annotations

import numpy as np

from softpatch_jax.data import btad, registry, validate
from softpatch_jax.data.layouts import miniature
from softpatch_jax.data.layouts.miniature import Item, Tree

# The categories differ in image size and in image / mask extensions, as BTAD's do.
FORMATS = {
    "01": ("bmp", "png", (24, 24)),
    "02": ("png", "png", (20, 20)),
    "03": ("bmp", "bmp", (18, 24)),
}


def make(
    root: str,
    rng: np.random.Generator,
    n_train: int = 5,
    n_good: int = 2,
    n_bad: int = 3,
) -> Tree:
    """ROOT/NN/train/ok, ROOT/NN/test/{ok,ko}, ROOT/NN/ground_truth/ko (same stem as the image)."""
    tree = Tree(root, {})
    for cat, (img_ext, mask_ext, hw) in FORMATS.items():
        items = []
        for i in range(n_train):
            rel = f"{cat}/train/ok/{i:04d}.{img_ext}"
            miniature.write(tree, rel, miniature.image(rng, hw))
            items.append(Item(rel, "train", 0, "ok"))
        for i in range(n_good):
            rel = f"{cat}/test/ok/{i:04d}.{img_ext}"
            miniature.write(tree, rel, miniature.image(rng, hw))
            items.append(Item(rel, "test", 0, "ok"))
        for i in range(n_bad):
            rel = f"{cat}/test/ko/{i:04d}.{img_ext}"
            mask_rel = f"{cat}/ground_truth/ko/{i:04d}.{mask_ext}"
            miniature.write(tree, rel, miniature.image(rng, hw))
            miniature.write(tree, mask_rel, miniature.mask(rng, hw))
            items.append(Item(rel, "test", 1, "ko", mask_rel))
        tree.items[cat] = items
    return tree


LAYOUT = registry.register(
    registry.Layout(
        name="btad",
        list_categories=btad.list_categories,
        read_category=btad.read_category,
        expected="ROOT/NN/train/ok/*, ROOT/NN/test/{ok,ko}/*, ROOT/NN/ground_truth/ko/* "
        "(NN = 01, 02, 03)",
        looks_like=lambda root: validate.has_category_with(root, "train", btad.NORMAL),
        miniature=lambda root, rng: (make(root, rng).root, {}),
        categories=btad.CATEGORIES,
        tfds=registry.TfdsBuilder(
            class_name="Btad",
            description="BTAD (BeanTech), categories 01, 02, 03.",
            resize=512,
            homepage="",
            instructions="Download BTAD (the BeanTech Anomaly Detection dataset of the VT-ADL "
            "paper) and extract it; the manual dir is BTech_Dataset_transformed/, the folder "
            "holding 01/, 02/, 03/ (pass it as --config.dataset.root).",
        ),
    )
)
