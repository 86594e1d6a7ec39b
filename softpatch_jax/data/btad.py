"""BTAD, the BeanTech anomaly dataset (METHOD.md section 7):

  ROOT/NN/train/ok/*, ROOT/NN/test/ok/*, ROOT/NN/test/ko/*, ROOT/NN/ground_truth/ko/*

NN is 01, 02 or 03. Extensions differ by category (images: 01 and 03 .bmp, 02 .png; masks: 01 and
02 .png, 03 .bmp), so a mask is matched to its image by file stem whatever the extension.
"""

from __future__ import annotations

import os

from softpatch_jax.data import validate
from softpatch_jax.data.records import CategorySplits, Record

NORMAL, DEFECT = "ok", "ko"
CATEGORIES = ("01", "02", "03")


def list_categories(root: str) -> list[str]:
    """Sub-folders of `root` that have a train/ok folder."""
    return validate.categories_with_train(root, "btad", NORMAL)


def read_category(root: str, category: str) -> CategorySplits:
    """Records of one BTAD category; every test/ko image must have a ground_truth/ko mask."""
    validate.require_root(root, "btad")
    base = os.path.join(root, category)
    if not os.path.isdir(base):
        validate.check_category(root, category, list_categories(root))
    dirs = {
        "train": os.path.join(base, "train", NORMAL),
        "test_ok": os.path.join(base, "test", NORMAL),
        "test_ko": os.path.join(base, "test", DEFECT),
        "masks": os.path.join(base, "ground_truth", DEFECT),
    }
    for d in dirs.values():
        if not os.path.isdir(d):
            raise validate.wrong_layout(root, "btad", f"{d!r} is missing")
    train = tuple(Record(p, 0, NORMAL) for p in validate.list_images(dirs["train"]))
    if not train:
        raise ValueError(f"empty training split: no image in {dirs['train']!r}")
    test = [Record(p, 0, NORMAL) for p in validate.list_images(dirs["test_ok"])]
    for path in validate.list_images(dirs["test_ko"]):
        stem = os.path.splitext(os.path.basename(path))[0]
        mask, tried = validate.find_mask(dirs["masks"], stem, ("",))
        if mask is None:
            raise FileNotFoundError(
                f"defect image {path!r} has no mask: expected {stem}.png or {stem}.bmp in "
                f"{dirs['masks']!r} (tried {len(tried)} names)"
            )
        test.append(Record(path, 1, DEFECT, mask_path=mask))
    if not test:
        raise ValueError(
            f"empty test split: no image in {dirs['test_ok']!r} or {dirs['test_ko']!r}"
        )
    return validate.check_splits(CategorySplits(category, train, tuple(test)), f"under {base!r}")
