"""Synthetic textures with far more normal variation than the demo's, in MVTec AD's layout: a
development set for the contamination estimate (README "Unknown contamination"), where a fixed
removal quantile throws away rare but normal texture.

Each normal image draws its own scale, orientation, contrast and colour, and a share of them carry
a rare normal feature (a knot, a vein, a patch of coarser grain) that other images lack at that
place. Defects are the demo's five kinds (softpatch_jax/data/demo.py), with the demo's per-image
illumination, focus and sensor noise on top.

  python -m launch.variable_textures --out=/tmp/vartex
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags
from PIL import Image

from softpatch_jax.data import demo

CATEGORIES = ("veined", "grain", "weave")
SIZE = 128
NUM_TRAIN, NUM_TEST_GOOD, NUM_PER_DEFECT = 60, 20, 6


def _rotated(size, angle):
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) - size / 2
    return x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)


def _rare(rng, size):
    """A rare normal feature: a dark elliptical knot with rings, or nothing (70% of images)."""
    if rng.random() > 0.3:
        return np.zeros((size, size), np.float32)
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    r = np.hypot((y - cy) / rng.uniform(0.6, 1.4), x - cx) / (rng.uniform(4, 12) * size / 128)
    return (np.exp(-(r**2)) + 0.3 * np.sin(3 * r) * np.exp(-r / 3)).astype(np.float32)


def _texture(category, rng, size):
    u, v = _rotated(size, rng.uniform(0, np.pi))
    colour = rng.uniform(0.3, 0.9, 3)
    if category == "veined":  # marble-like veins of random scale and sharpness
        warp = rng.uniform(3, 12) * demo._smooth(rng, (size, size), rng.uniform(4, 12))
        veins = np.abs(np.sin(2 * np.pi * (u + warp) / rng.uniform(10, 40))) ** rng.uniform(0.2, 3)
        val = 0.5 + rng.uniform(0.1, 0.3) * (veins - 0.5)
    elif category == "grain":  # wood-like rings, period and waviness per image
        warp = rng.uniform(2, 10) * demo._smooth(rng, (size, size), rng.uniform(6, 20))
        val = 0.55 + rng.uniform(0.05, 0.2) * np.sin(2 * np.pi * (u + warp) / rng.uniform(5, 20))
    else:  # weave of random period and angle
        p = rng.uniform(4, 10)
        val = 0.55 + rng.uniform(0.05, 0.2) * np.sin(2 * np.pi * u / p) * np.sin(2 * np.pi * v / p)
    val = val + rng.uniform(0.01, 0.06) * demo._smooth(rng, (size, size), rng.uniform(0.7, 3))
    val = val - rng.uniform(0.1, 0.35) * _rare(rng, size)
    return np.clip(val[..., None] * colour * 1.4, 0, 1), np.ones((size, size), bool)


def render(category, rng, defect=None):
    """One image (uint8) and its mask, the texture's own variation plus the demo's nuisances."""
    img, body = _texture(category, rng, SIZE)
    mask = np.zeros((SIZE, SIZE), bool)
    if defect is not None:
        bg = np.full((SIZE, SIZE, 3), 0.08)
        img, mask = demo._defect(defect, rng, img, body, bg, 1.5, (0.6, 1.0))
    light = rng.uniform(0.8, 1.2) * rng.uniform(0.95, 1.05, 3)
    img = np.clip(img * light + rng.normal(0, 0.02, img.shape), 0, 1)
    return (img * 255 + 0.5).astype(np.uint8), mask


def write(root: str, seed: int = 0) -> str:
    def save(path, arr):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(arr).save(path)

    for c, cat in enumerate(CATEGORIES):
        for split, count, folder in ((0, NUM_TRAIN, "train"), (1, NUM_TEST_GOOD, "test")):
            for i in range(count):
                img, _ = render(cat, np.random.default_rng([seed, c, split, i]))
                save(os.path.join(root, cat, folder, "good", f"{i:03d}.png"), img)
        for d, defect in enumerate(demo.DEFECTS):
            for i in range(NUM_PER_DEFECT):
                img, mask = render(cat, np.random.default_rng([seed, c, 2 + d, i]), defect)
                save(os.path.join(root, cat, "test", defect, f"{i:03d}.png"), img)
                m = mask.astype(np.uint8) * 255
                save(os.path.join(root, cat, "ground_truth", defect, f"{i:03d}_mask.png"), m)
    return root


_OUT = flags.DEFINE_string("out", None, "Folder to write (MVTec layout).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    write(_OUT.value)


if __name__ == "__main__":
    flags.mark_flag_as_required("out")
    app.run(main)
