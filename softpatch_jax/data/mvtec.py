"""MVTec AD's folder layout (METHOD.md section 7), also used by the demo data and PIPED:

CATEGORY/train/good/*.png
CATEGORY/test/good/*.png, CATEGORY/test/DEFECT/*.png
CATEGORY/ground_truth/DEFECT/NAME_mask.png
"""

from __future__ import annotations

import os

from softpatch_jax.data.records import CategorySplits, Record

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NORMAL = "good"


def _images(folder: str) -> list[str]:
    return sorted(
        os.path.join(folder, f)
        for f in os.listdir(folder)
        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
    )


def list_categories(root: str) -> list[str]:
    """Sub-folders of `root` that have a train/ folder."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset root {root!r} does not exist or is not a directory")
    cats = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, "train")))
    if not cats:
        raise FileNotFoundError(
            f"no category under {root!r}: expected MVTec's layout ROOT/CATEGORY/train/good/*.png"
        )
    return cats


def read_category(root: str, category: str, normal: str = NORMAL) -> CategorySplits:
    """Records of one category in MVTec's layout; every defect image must have its mask."""
    base = os.path.join(root, category)
    if not os.path.isdir(base):
        raise FileNotFoundError(
            f"category {category!r} not found under {root!r} (have: {list_categories(root)})"
        )
    train_dir = os.path.join(base, "train", normal)
    test_dir = os.path.join(base, "test")
    for d in (train_dir, test_dir):
        if not os.path.isdir(d):
            raise FileNotFoundError(
                f"{d!r} is missing: expected MVTec's layout {category}/train/{normal}, "
                f"{category}/test/{{{normal},DEFECT}}, {category}/ground_truth/DEFECT"
            )
    train = tuple(Record(p, 0, normal) for p in _images(train_dir))
    test: list[Record] = []
    for defect in sorted(os.listdir(test_dir)):
        folder = os.path.join(test_dir, defect)
        if not os.path.isdir(folder):
            continue
        for path in _images(folder):
            if defect == normal:
                test.append(Record(path, 0, normal))
                continue
            stem = os.path.splitext(os.path.basename(path))[0]
            mask_dir = os.path.join(base, "ground_truth", defect)
            candidates = [os.path.join(mask_dir, stem + "_mask" + ext) for ext in IMAGE_EXTENSIONS]
            candidates += [os.path.join(mask_dir, stem + ext) for ext in IMAGE_EXTENSIONS]
            mask = next((c for c in candidates if os.path.isfile(c)), None)
            if mask is None:
                raise FileNotFoundError(
                    f"defect image {path!r} has no mask: expected {candidates[0]!r}"
                )
            test.append(Record(path, 1, defect, mask_path=mask))
    return CategorySplits(category, train, tuple(test))
