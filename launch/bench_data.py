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

import argparse
import json
import os
import time

import numpy as np
from PIL import Image

from softpatch_jax.data import mvtec, prepared, preprocess


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", default="/tmp/bench_data")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--size", type=int, default=900)
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3, help="reads timed per path; best is kept")
    args = p.parse_args()

    root = os.path.join(args.workdir, f"tree_{args.images}x{args.size}")
    data_dir = os.path.join(args.workdir, "tfds")
    if not os.path.isdir(os.path.join(root, "bench")):
        t = time.perf_counter()
        n = build_tree(root, args.images, args.size)
        print(f"built {n} images of {args.size}x{args.size} in {time.perf_counter() - t:.1f} s")
    splits = mvtec.read_category(root, "bench")
    records = splits.train + splits.test
    n = len(records)

    def direct() -> np.ndarray:
        return preprocess.load_records(records, args.resize, args.crop)[0]

    def from_store() -> np.ndarray:
        store = prepared.ensure("mvtec", root, "bench", args.resize, data_dir)
        return store.load_records(records, args.crop)[0]

    def best(fn) -> tuple[float, np.ndarray]:
        times, out = [], None
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return min(times), out

    t_direct, a = best(direct)
    t = time.perf_counter()
    prepared.prepare("mvtec", root, "bench", args.resize, data_dir)
    t_prepare = time.perf_counter() - t
    t_store, b = best(from_store)
    assert np.array_equal(a, b), "the prepared store must give the same arrays as decoding"

    result = {
        "images": n,
        "size": args.size,
        "resize": args.resize,
        "crop": args.crop,
        "threads_direct": min(8, os.cpu_count() or 1),
        "direct_s": t_direct,
        "prepare_s": t_prepare,
        "prepared_read_s": t_store,
        "direct_images_per_s": n / t_direct,
        "prepared_images_per_s": n / t_store,
        "speedup": t_direct / t_store,
    }
    print(f"{n} images, {args.size}px -> resize {args.resize}, crop {args.crop}")
    print(f"  direct read (decode):  {t_direct:7.2f} s  {n / t_direct:8.1f} images/s")
    print(f"  preparation (once):    {t_prepare:7.2f} s")
    print(f"  prepared read:         {t_store:7.2f} s  {n / t_store:8.1f} images/s")
    print(f"  speedup:               {t_direct / t_store:7.1f}x")
    with open(os.path.join(args.workdir, "bench_data.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
