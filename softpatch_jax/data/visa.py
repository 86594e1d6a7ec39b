"""VisA (METHOD.md section 7) through its one-class split file, as the papers use it:

  ROOT/split_csv/1cls.csv            columns object,split,label,image,mask
  ROOT/OBJECT/Data/Images/{Normal,Anomaly}/*.JPG
  ROOT/OBJECT/Data/Masks/Anomaly/*.png       non-zero pixels are defects

Paths in the CSV are relative to ROOT; split is 'train' or 'test', label 'normal' or 'anomaly', and
the mask column is empty for normal images. VisA names no defect type in this file, so anomalous
records carry the defect 'anomaly'.
"""

from __future__ import annotations

import csv
import os

from softpatch_jax.data import validate
from softpatch_jax.data.records import CategorySplits, Record

SPLIT_CSV = os.path.join("split_csv", "1cls.csv")
COLUMNS = ("object", "split", "label", "image", "mask")
NORMAL, ANOMALY = "normal", "anomaly"
CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1",
    "pcb2", "pcb3", "pcb4", "pipe_fryum",
)  # fmt: skip


def _rows(root: str) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) for every data row of the split file, its header checked."""
    validate.require_root(root, "visa")
    path = os.path.join(root, SPLIT_CSV)
    if not os.path.isfile(path):
        raise validate.wrong_layout(root, "visa", f"{path!r} is missing")
    # utf-8-sig: a spreadsheet round trip may have added a byte-order mark to the header.
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in reader.fieldnames or ()]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"{path!r}: header {header} lacks columns {missing}; expected {','.join(COLUMNS)}"
            )
        reader.fieldnames = header
        return [
            (reader.line_num, {k: (row.get(k) or "").strip() for k in COLUMNS}) for row in reader
        ]


def list_categories(root: str) -> list[str]:
    """The objects named in split_csv/1cls.csv."""
    cats = sorted({row["object"] for _, row in _rows(root)})
    if not cats:
        raise ValueError(f"{os.path.join(root, SPLIT_CSV)!r} has no data rows")
    return cats


def read_category(root: str, category: str) -> CategorySplits:
    """Records of one VisA object, each file checked to exist; sorted by path within a split."""
    rows = _rows(root)
    csv_path = os.path.join(root, SPLIT_CSV)
    mine = [(line, row) for line, row in rows if row["object"] == category]
    if not mine:
        validate.check_category(root, category, sorted({row["object"] for _, row in rows}))
    train: list[Record] = []
    test: list[Record] = []
    for line, row in mine:
        where = f"{csv_path!r} line {line}"
        if row["split"] not in ("train", "test"):
            raise ValueError(f"{where}: split {row['split']!r}, expected 'train' or 'test'")
        if row["label"] not in (NORMAL, ANOMALY):
            raise ValueError(f"{where}: label {row['label']!r}, expected {NORMAL!r} or {ANOMALY!r}")
        if not row["image"]:
            raise ValueError(f"{where}: the image column is empty")
        image = os.path.join(root, row["image"])
        if not os.path.isfile(image):
            raise FileNotFoundError(f"{where} lists image {image!r}, which does not exist")
        if row["label"] == NORMAL:
            if row["mask"]:
                raise ValueError(f"{where}: normal image {image!r} has a mask {row['mask']!r}")
            rec = Record(image, 0, "good")
        else:
            if not row["mask"]:
                raise FileNotFoundError(f"{where}: defect image {image!r} has no mask")
            mask = os.path.join(root, row["mask"])
            if not os.path.isfile(mask):
                raise FileNotFoundError(
                    f"{where}: defect image {image!r} has no mask: {mask!r} does not exist"
                )
            rec = Record(image, 1, ANOMALY, mask_path=mask)
        (train if row["split"] == "train" else test).append(rec)
    if not train:
        raise ValueError(f"empty training split: {csv_path!r} has no train rows for {category!r}")
    if not test:
        raise ValueError(f"empty test split: {csv_path!r} has no test rows for {category!r}")
    by_path = lambda r: r.path
    splits = CategorySplits(
        category, tuple(sorted(train, key=by_path)), tuple(sorted(test, key=by_path))
    )
    return validate.check_splits(splits, f"in {csv_path!r}")
