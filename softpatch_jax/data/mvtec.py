"""MVTec AD's folder layout (METHOD.md section 7), also used by the demo data:

CATEGORY/train/good/*.png
CATEGORY/test/good/*.png, CATEGORY/test/DEFECT/*.png
CATEGORY/ground_truth/DEFECT/NAME_mask.png
"""

from __future__ import annotations

import os

from softpatch_jax.data import validate
from softpatch_jax.data.records import CategorySplits, Record

IMAGE_EXTENSIONS = validate.IMAGE_EXTENSIONS
NORMAL = "good"
CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
    "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip


def list_categories(root: str) -> list[str]:
    """Sub-folders of `root` that have a train/good folder."""
    return validate.categories_with_train(root, "mvtec", NORMAL)


def read_category(root: str, category: str, normal: str = NORMAL) -> CategorySplits:
    """Records of one category in MVTec's layout; every defect image must have its mask."""
    validate.require_root(root, "mvtec")
    base = os.path.join(root, category)
    if not os.path.isdir(base):
        validate.check_category(root, category, list_categories(root))
    train_dir = os.path.join(base, "train", normal)
    test_dir = os.path.join(base, "test")
    for d in (train_dir, test_dir):
        if not os.path.isdir(d):
            raise validate.wrong_layout(root, "mvtec", f"{d!r} is missing")
    train = tuple(Record(p, 0, normal) for p in validate.list_images(train_dir))
    if not train:
        raise ValueError(f"empty training split: no image in {train_dir!r}")
    test: list[Record] = []
    for defect in sorted(os.listdir(test_dir)):
        folder = os.path.join(test_dir, defect)
        if defect.startswith(".") or not os.path.isdir(folder):
            continue
        for path in validate.list_images(folder):
            if defect == normal:
                test.append(Record(path, 0, normal))
                continue
            stem = os.path.splitext(os.path.basename(path))[0]
            mask_dir = os.path.join(base, "ground_truth", defect)
            mask, tried = validate.find_mask(mask_dir, stem, ("_mask", ""))
            if mask is None:
                raise FileNotFoundError(f"defect image {path!r} has no mask: expected {tried[0]!r}")
            test.append(Record(path, 1, defect, mask_path=mask))
    if not test:
        raise ValueError(f"empty test split: no image under {test_dir!r}")
    return validate.check_splits(CategorySplits(category, train, tuple(test)), f"under {base!r}")
