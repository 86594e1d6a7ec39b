"""What the layouts' miniature-tree writers share (`Layout.miniature`, for tests): a `Tree` that
records what was written (the oracle the readers are checked against; pixel values kept for
lossless formats, so decoding can be checked against numpy), tiny random images and masks.
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


def write(tree: Tree, rel: str, arr: np.ndarray, fmt: str | None = None) -> None:
    """Saves `arr` at ROOT/`rel` (`fmt` a Pillow format; None: from the extension) and records
    its pixels unless the format is lossy."""
    path = os.path.join(tree.root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    if fmt != "JPEG":
        tree.pixels[rel] = arr


def image(rng: np.random.Generator, hw: tuple[int, int], gray: bool = False) -> np.ndarray:
    shape = hw if gray else (*hw, 3)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def mask(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """A blob of several non-zero values (1, 128, 255), as real masks are not always 0/255."""
    m = np.zeros(hw, np.uint8)
    h, w = hw
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    m[y : y + h // 2, x : x + w // 2] = rng.choice(np.array([1, 128, 255], np.uint8))
    m[0, 0] = 255  # a corner pixel too, so a crop is seen to keep or drop it
    return m


def mkdir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path
