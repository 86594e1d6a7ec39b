"""Benchmark of the data path (METHOD.md section 2 preprocessing): decoding the original files on
every read versus reading the prepared TFDS store (softpatch_jax/data/prepared.py).

Builds an MVTec-layout tree of full-size PNGs (900x900 by default, like MVTec's), then times
  1. direct read: decode + resize + crop every image (what each run does without a store),
  2. preparation: the one-time decode + resize + write of the store,
  3. prepared read: check the store against the source, open it, and read + crop every image,
and writes the figures to WORKDIR/bench_data.json.

  python -m launch.bench_data --workdir=/tmp/bench_data [--images=100 --size=900 --repeats=3]

(run from the repository root).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags
from PIL import Image

from softpatch_jax.data import mvtec, prepared, preprocess

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/bench_data", "trees, the store and bench_data.json")
_IMAGES = flags.DEFINE_integer("images", 100, "training images of the generated tree")
_SIZE = flags.DEFINE_integer("size", 900, "side of the generated PNGs")
_RESIZE = flags.DEFINE_integer("resize", 256, "dataset.resize")
_CROP = flags.DEFINE_integer("crop", 224, "dataset.crop")
_REPEATS = flags.DEFINE_integer("repeats", 3, "reads timed per path; best is kept")


def _photo_like(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth shading plus sensor-like noise: compresses about as badly as a real photograph."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phase = rng.uniform(0, 2 * np.pi, 3)
    base = np.stack([np.sin(6 * xx + 4 * yy + p) for p in phase], -1) * 60 + 128
    noise = rng.normal(0, 6, (size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def build_tree(root: str, num_images: int, size: int, seed: int = 0) -> int:
    """CAT/train/good, CAT/test/{good,defect}, CAT/ground_truth/defect; returns files written."""
    rng = np.random.default_rng(seed)
    n_test = max(2, num_images // 5)
    n_train = num_images - 2 * n_test
    folders = {"train/good": n_train, "test/good": n_test, "test/defect": n_test}
    written = 0
    for folder, n in folders.items():
        os.makedirs(os.path.join(root, "bench", folder), exist_ok=True)
        for i in range(n):
            Image.fromarray(_photo_like(rng, size)).save(
                os.path.join(root, "bench", folder, f"{i:03d}.png")
            )
            written += 1
            if folder == "test/defect":
                mask = np.zeros((size, size), np.uint8)
                y, x = rng.integers(0, size // 2, 2)
                mask[y : y + size // 8, x : x + size // 8] = 255
                gt = os.path.join(root, "bench", "ground_truth", "defect")
                os.makedirs(gt, exist_ok=True)
                Image.fromarray(mask).save(os.path.join(gt, f"{i:03d}_mask.png"))
    return written


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    workdir, num_images, size = _WORKDIR.value, _IMAGES.value, _SIZE.value
    resize, crop, repeats = _RESIZE.value, _CROP.value, _REPEATS.value

    root = os.path.join(workdir, f"tree_{num_images}x{size}")
    data_dir = os.path.join(workdir, "tfds")
    if not os.path.isdir(os.path.join(root, "bench")):
        t = time.perf_counter()
        n = build_tree(root, num_images, size)
        print(f"built {n} images of {size}x{size} in {time.perf_counter() - t:.1f} s")
    splits = mvtec.read_category(root, "bench")
    records = splits.train + splits.test
    n = len(records)

    def direct() -> np.ndarray:
        return preprocess.load_records(records, resize, crop)[0]

    def from_store() -> np.ndarray:
        store = prepared.ensure("mvtec", root, "bench", resize, data_dir)
        return store.load_records(records, crop)[0]

    def best(fn) -> tuple[float, np.ndarray]:
        times, out = [], None
        for _ in range(repeats):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return min(times), out

    t_direct, a = best(direct)
    t = time.perf_counter()
    prepared.prepare("mvtec", root, "bench", resize, data_dir)
    t_prepare = time.perf_counter() - t
    t_store, b = best(from_store)
    assert np.array_equal(a, b), "the prepared store must give the same arrays as decoding"

    result = {
        "images": n,
        "size": size,
        "resize": resize,
        "crop": crop,
        "threads_direct": min(8, os.cpu_count() or 1),
        "direct_s": t_direct,
        "prepare_s": t_prepare,
        "prepared_read_s": t_store,
        "direct_images_per_s": n / t_direct,
        "prepared_images_per_s": n / t_store,
        "speedup": t_direct / t_store,
    }
    print(f"{n} images, {size}px -> resize {resize}, crop {crop}")
    print(f"  direct read (decode):  {t_direct:7.2f} s  {n / t_direct:8.1f} images/s")
    print(f"  preparation (once):    {t_prepare:7.2f} s")
    print(f"  prepared read:         {t_store:7.2f} s  {n / t_store:8.1f} images/s")
    print(f"  speedup:               {t_direct / t_store:7.1f}x")
    with open(os.path.join(workdir, "bench_data.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
