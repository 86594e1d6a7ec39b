"""Decoding and geometric preprocessing on the host (METHOD.md section 2): resize the shorter side
(bilinear), center crop; masks with nearest-neighbour and binarised; the overlap-mode augmentation of
injected copies. Intensity normalisation belongs to the backbone and runs on the device.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from softpatch_jax.data.records import Augment, Record


def _open(path: str) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises these for truncated/corrupt files
        raise ValueError(f"cannot read image {path!r}: {e}") from e
    return img


def to_rgb_uint8(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 HxWx3: 16-bit is scaled down, palette/grayscale expanded, alpha dropped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def resize_crop(arr: np.ndarray, resize: int, crop: int, nearest: bool = False) -> np.ndarray:
    """Resize the shorter side to `resize`, then center-crop `crop` x `crop` (torchvision semantics)."""
    h, w = arr.shape[:2]
    if min(h, w) != resize:
        if h <= w:  # PIL sizes are (width, height); torchvision truncates the longer side
            size = (int(resize * w / h), resize)
        else:
            size = (resize, int(resize * h / w))
        resample = Image.NEAREST if nearest else Image.BILINEAR
        arr = np.asarray(Image.fromarray(arr).resize(size, resample=resample))
    h, w = arr.shape[:2]
    if crop > min(h, w):
        raise ValueError(f"crop {crop} is larger than the resized image {h}x{w} (resize={resize})")
    top = round((h - crop) / 2.0)
    left = round((w - crop) / 2.0)
    return arr[top : top + crop, left : left + crop]


def augment(arr: np.ndarray, aug: Augment) -> np.ndarray:
    """Rotate about the centre and translate (fractions of the size), bilinear, edges replicated."""
    h, w = arr.shape[:2]
    theta = np.deg2rad(aug.rotation_deg)
    c, s = np.cos(theta), np.sin(theta)
    # Output pixel (y, x) samples input at R^-1 (out - centre - shift) + centre.
    inv = np.array([[c, s], [-s, c]])
    centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    shift = np.array([aug.translate_y * h, aug.translate_x * w])
    offset = centre - inv @ (centre + shift)
    out = np.empty_like(arr)
    for ch in range(arr.shape[2]):
        out[..., ch] = (
            ndimage.affine_transform(
                arr[..., ch].astype(np.float32), inv, offset=offset, order=1, mode="nearest"
            )
            .round()
            .clip(0, 255)
        )
    return out


def load_record(record: Record, resize: int, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """One record -> (image uint8 [crop, crop, 3], mask bool [crop, crop])."""
    img = to_rgb_uint8(_open(record.path))
    if record.augment is not None:
        img = augment(img, record.augment)
    if record.mask_path is not None:
        mask = np.asarray(_open(record.mask_path).convert("L")) > 0
        if record.augment is not None:
            mask = augment(mask[..., None].astype(np.uint8) * 255, record.augment)[..., 0] > 127
        if mask.shape != img.shape[:2]:
            raise ValueError(
                f"mask {record.mask_path!r} is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{record.path!r} is {img.shape[1]}x{img.shape[0]}"
            )
        mask = resize_crop(mask.astype(np.uint8) * 255, resize, crop, nearest=True) > 127
    else:
        mask = np.zeros((crop, crop), bool)
    return resize_crop(img, resize, crop), mask


def load_records(
    records: Sequence[Record], resize: int, crop: int, num_threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode and preprocess records in parallel -> images uint8 [N,crop,crop,3], masks bool [N,crop,crop]."""
    if not records:
        return np.zeros((0, crop, crop, 3), np.uint8), np.zeros((0, crop, crop), bool)
    threads = num_threads or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        pairs = list(pool.map(lambda r: load_record(r, resize, crop), records))
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
