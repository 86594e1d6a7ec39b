"""Miniature copies of the official MVTec AD, VisA and BTAD layouts (METHOD.md section 7) for tests.

Each `make_*` writes a few tiny random images per class, their masks, and (VisA) the split CSV, and
returns a `Tree` that records what was written: the oracle the readers are checked against. Pixel
values are kept for lossless formats (PNG, BMP) so decoding can be checked against numpy.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image


@dataclasses.dataclass
class Item:
    rel: str  # image path relative to the root
    split: str  # "train" or "test"
    label: int
    defect: str
    mask_rel: str | None = None


@dataclasses.dataclass
class Tree:
    root: str
    items: dict[str, list[Item]]  # category -> items
    pixels: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # rel -> as written

    def split(self, category: str, split: str) -> list[Item]:
        return [i for i in self.items[category] if i.split == split]


def _write(tree: Tree, rel: str, arr: np.ndarray, fmt: str | None = None) -> None:
    path = os.path.join(tree.root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    if fmt != "JPEG":
        tree.pixels[rel] = arr


def _image(rng: np.random.Generator, hw: tuple[int, int], gray: bool = False) -> np.ndarray:
    shape = hw if gray else (*hw, 3)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _mask(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """A blob of several non-zero values (1, 128, 255), as real masks are not always 0/255."""
    m = np.zeros(hw, np.uint8)
    h, w = hw
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    m[y : y + h // 2, x : x + w // 2] = rng.choice(np.array([1, 128, 255], np.uint8))
    m[0, 0] = 255  # a corner pixel too, so a crop is seen to keep or drop it
    return m


def make_mvtec(
    root: str,
    rng: np.random.Generator,
    categories: tuple[str, ...] = ("widget", "gizmo"),
    n_train: int = 6,
    n_good: int = 3,
    defects: dict[str, int] | None = None,
    hw: tuple[int, int] = (20, 24),
) -> Tree:
    """ROOT/CAT/train/good, ROOT/CAT/test/{good,DEFECT}, ROOT/CAT/ground_truth/DEFECT/*_mask.png."""
    defects = defects or {"dent": 2, "scratch": 3}
    tree = Tree(root, {})
    with open(os.path.join(_mkdir(root), "license.txt"), "w") as f:
        f.write("not a category\n")
    for ci, cat in enumerate(categories):
        items = []
        gray = ci == 1  # MVTec's grid/screw/zipper are grayscale
        for i in range(n_train):
            rel = f"{cat}/train/good/{i:03d}.png"
            _write(tree, rel, _image(rng, hw, gray))
            items.append(Item(rel, "train", 0, "good"))
        for i in range(n_good):
            rel = f"{cat}/test/good/{i:03d}.png"
            _write(tree, rel, _image(rng, hw, gray))
            items.append(Item(rel, "test", 0, "good"))
        for defect, n in defects.items():
            for i in range(n):
                rel = f"{cat}/test/{defect}/{i:03d}.png"
                mask_rel = f"{cat}/ground_truth/{defect}/{i:03d}_mask.png"
                _write(tree, rel, _image(rng, hw, gray))
                _write(tree, mask_rel, _mask(rng, hw))
                items.append(Item(rel, "test", 1, defect, mask_rel))
        tree.items[cat] = items
    return tree


def make_visa(
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
            _write(tree, rel, _image(rng, hw), "JPEG")
            split = "train" if i < n_train else "test"
            items.append(Item(rel, split, 0, "good"))
            rows.append(f"{cat},{split},normal,{rel},")
        for i in range(n_bad):
            rel = f"{cat}/Data/Images/Anomaly/{i:03d}.JPG"
            mask_rel = f"{cat}/Data/Masks/Anomaly/{i:03d}.png"
            _write(tree, rel, _image(rng, hw), "JPEG")
            _write(tree, mask_rel, _mask(rng, hw))
            items.append(Item(rel, "test", 1, "anomaly", mask_rel))
            rows.append(f"{cat},test,anomaly,{rel},{mask_rel}")
        tree.items[cat] = items
    order = rng.permutation(len(rows))
    text = "object,split,label,image,mask\n" + "".join(rows[i] + "\n" for i in order)
    with open(os.path.join(_mkdir(os.path.join(root, "split_csv")), "1cls.csv"), "w") as f:
        f.write(("\ufeff" if bom else "") + text)
    return tree


# BTAD's categories differ in image size and in image / mask extensions.
BTAD_FORMATS = {
    "01": ("bmp", "png", (24, 24)),
    "02": ("png", "png", (20, 20)),
    "03": ("bmp", "bmp", (18, 24)),
}


def make_btad(
    root: str,
    rng: np.random.Generator,
    n_train: int = 5,
    n_good: int = 2,
    n_bad: int = 3,
) -> Tree:
    """ROOT/NN/train/ok, ROOT/NN/test/{ok,ko}, ROOT/NN/ground_truth/ko (same stem as the image)."""
    tree = Tree(root, {})
    for cat, (img_ext, mask_ext, hw) in BTAD_FORMATS.items():
        items = []
        for i in range(n_train):
            rel = f"{cat}/train/ok/{i:04d}.{img_ext}"
            _write(tree, rel, _image(rng, hw))
            items.append(Item(rel, "train", 0, "ok"))
        for i in range(n_good):
            rel = f"{cat}/test/ok/{i:04d}.{img_ext}"
            _write(tree, rel, _image(rng, hw))
            items.append(Item(rel, "test", 0, "ok"))
        for i in range(n_bad):
            rel = f"{cat}/test/ko/{i:04d}.{img_ext}"
            mask_rel = f"{cat}/ground_truth/ko/{i:04d}.{mask_ext}"
            _write(tree, rel, _image(rng, hw))
            _write(tree, mask_rel, _mask(rng, hw))
            items.append(Item(rel, "test", 1, "ko", mask_rel))
        tree.items[cat] = items
    return tree


def _mkdir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def make_realiad(root: str, rng: np.random.Generator, nested: bool = False) -> str:
    """A miniature Real-IAD tree (softpatch_jax/data/realiad_demo.py): audiojack and mint, 12 OK and
    7 NG samples x 5 views, the NG samples' C5 view stored as "OK" with a null mask; one test set
    (2 OK + 3 NG samples) in every split, FUIAD training lists of 10 samples of which 10 x ratio are
    NG; every split's JSONs beside realiad_256/ or (`nested`) inside realiad_jsons/. Returns the
    root."""
    from softpatch_jax.data import realiad_demo

    spec = realiad_demo.Spec(nested=nested)
    return realiad_demo.write(root, spec, seed=int(rng.integers(2**31)))


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
