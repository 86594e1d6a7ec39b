"""Decoding and geometric preprocessing on the host (METHOD.md section 2): resize the shorter
side (bilinear), center crop; masks with nearest-neighbour and binarised; the overlap-mode
augmentation of injected copies (METHOD.md section 6). Intensity normalisation belongs to the
backbone and runs on the device.

The work is split in two so that the prepared store (`prepared.py`) can keep the expensive half:
`decode_resized` (decode, check, resize the shorter side) and `finish` (augment, center crop). Both
the direct path (`load_records`) and the prepared path run exactly these two functions, so they give
identical arrays.
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
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL reports truncated or corrupt files with any of these; name the file for the user.
        raise ValueError(f"cannot read image {path!r}: {e}") from e
    return img


def to_rgb_uint8(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 HxWx3: 16-bit scaled down, palette/gray expanded, alpha dropped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def mask_to_bool(img: Image.Image) -> np.ndarray:
    """A ground-truth mask -> bool HxW, True where any colour channel is non-zero.

    Palette images are judged by their colours rather than their indices, and alpha is ignored, so a
    mask re-saved by an optimiser (which may reorder the palette) reads the same.
    """
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    arr = np.asarray(img)
    if img.mode in ("LA", "RGBA"):
        arr = arr[..., :-1]
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    return arr > 0


def resized_shape(h: int, w: int, resize: int) -> tuple[int, int]:
    """(height, width) after `resize_shorter`: the shorter side `resize`, the longer truncated."""
    if min(h, w) == resize:
        return h, w
    if h <= w:
        return resize, int(resize * w / h)
    return int(resize * h / w), resize


def crop_offsets(h: int, w: int, crop: int) -> tuple[int, int]:
    """(top, left) of `center_crop`'s window, offsets rounded as torchvision's CenterCrop."""
    if crop > min(h, w):
        raise ValueError(f"crop {crop} is larger than the resized image {h}x{w}")
    return round((h - crop) / 2.0), round((w - crop) / 2.0)


def resize_shorter(arr: np.ndarray, resize: int, nearest: bool = False) -> np.ndarray:
    """Resize so the shorter side is `resize`; the longer side is truncated as torchvision does."""
    h, w = arr.shape[:2]
    if min(h, w) == resize:
        return arr
    rh, rw = resized_shape(h, w, resize)
    size = (rw, rh)  # PIL sizes are (width, height)
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(arr).resize(size, resample=resample))


def center_crop(arr: np.ndarray, crop: int) -> np.ndarray:
    """The central `crop` x `crop` window, offsets rounded as torchvision's CenterCrop."""
    top, left = crop_offsets(*arr.shape[:2], crop)
    return arr[top : top + crop, left : left + crop]


def resize_crop(arr: np.ndarray, resize: int, crop: int, nearest: bool = False) -> np.ndarray:
    """Resize the shorter side to `resize`, then center-crop `crop` x `crop` (as torchvision)."""
    return center_crop(resize_shorter(arr, resize, nearest), crop)


def augment(arr: np.ndarray, aug: Augment) -> np.ndarray:
    """Rotate about the centre and translate (fractions of the size), bilinear, edges replicated.

    A positive angle turns the content counter-clockwise as displayed (90 degrees = np.rot90); a
    positive translation moves it right / down.
    """
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


def decode_resized(record: Record, resize: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode a record's image and mask and resize their shorter side to `resize`.

    Returns (image uint8 [h, w, 3], mask bool [h, w]); the mask is all-False without a mask file.
    Raises ValueError naming the file for an unreadable image or mask, or a mask whose size differs
    from its image's.
    """
    img = to_rgb_uint8(_open(record.path))
    if record.mask_path is None:
        mask = np.zeros(img.shape[:2], bool)
    else:
        mask = mask_to_bool(_open(record.mask_path))
        if mask.shape != img.shape[:2]:
            raise ValueError(
                f"mask {record.mask_path!r} is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{record.path!r} is {img.shape[1]}x{img.shape[0]} (width x height)"
            )
    img = resize_shorter(img, resize)
    mask = resize_shorter(mask.astype(np.uint8), resize, nearest=True) > 0
    return img, mask


def finish(
    img: np.ndarray, mask: np.ndarray, aug: Augment | None, crop: int
) -> tuple[np.ndarray, np.ndarray]:
    """Augment (injected overlap copies only) at the resized scale, then center-crop both.

    Augmenting after the resize keeps the prepared store exact: it holds resized images and the
    same function finishes them. Rotation and translation are relative, so the scale does not change
    what they mean.
    """
    if aug is not None:
        img = augment(img, aug)
        mask = augment(mask[..., None].astype(np.uint8) * 255, aug)[..., 0] > 127
    return center_crop(img, crop), center_crop(mask, crop)


def load_record(record: Record, resize: int, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """One record -> (image uint8 [crop, crop, 3], mask bool [crop, crop])."""
    img, mask = decode_resized(record, resize)
    return finish(img, mask, record.augment, crop)


def load_records(
    records: Sequence[Record], resize: int, crop: int, num_threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode and preprocess records in parallel.

    Returns images uint8 [N, crop, crop, 3] and masks bool [N, crop, crop].
    """
    if not records:
        return np.zeros((0, crop, crop, 3), np.uint8), np.zeros((0, crop, crop), bool)
    threads = num_threads or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        pairs = list(pool.map(lambda r: load_record(r, resize, crop), records))
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
