"""Decoding for the deployment tool: strict, documented conversion of whatever a production folder
holds into the uint8 RGB crops the backbone takes, streamed in batches so memory stays bounded.

Conversion rules (`to_rgb`):
- 8-bit RGB: as is. Grayscale ("L", "1"): replicated to three channels.
- Palette ("P", "PA"): expanded through the palette; transparency is dropped like alpha below.
- Alpha ("RGBA", "LA", "PA"): dropped, keeping the stored colour values (not composited), which is
  what the research decoder (`preprocess.to_rgb_uint8`) does, so both see the same pixels.
- 16-bit ("I;16*", and "I" as 16-bit TIFF/PNG often open): scaled by 255/65535 and rounded. The
  scale is fixed, not stretched per image, so a given sensor value means the same in every image
  (the research decoder stretches images whose maximum is at most 255; this one never does).
- CMYK, YCbCr, LAB, HSV: Pillow's conversion to RGB. Floating-point ("F") images are refused.
- EXIF orientation is applied (phone photos look as they display); multi-frame files use frame 0.

Geometry is the research pipeline's: resize the shorter side to `resize` (bilinear), center-crop
`crop` (`preprocess.resize_crop`). An image whose shorter side is below `crop` is refused by default
and named with its size and the minimum: it has less detail than the model's input, which on a
production line means a wrong file (a thumbnail, another camera); `allow_upscale` accepts it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

from softpatch_jax.data import preprocess

SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class BadImageError(ValueError):
    """An input image that cannot be used; `path` names it and the message says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def to_rgb(img: Image.Image, path: str = "<image>") -> np.ndarray:
    """Any supported PIL image -> uint8 [H, W, 3] by the rules in the module docstring."""
    if img.mode == "F":
        raise BadImageError(path, "floating-point images (mode F) are not supported")
    if img.mode in SIXTEEN_BIT:
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(np.rint(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA")  # applies palette transparency, then alpha is dropped below
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def decode(path: str) -> np.ndarray:
    """Read and convert one file; BadImageError names it when it is unreadable or truncated."""
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img, path)
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # Pillow reports truncated, corrupt and unknown-format files with any of these.
        raise BadImageError(path, f"cannot read image ({type(e).__name__}: {e})") from e


def load(path: str, resize: int, crop: int, allow_upscale: bool = False) -> np.ndarray:
    """One file -> uint8 [crop, crop, 3]."""
    arr = decode(path)
    h, w = arr.shape[:2]
    if min(h, w) < crop and not allow_upscale:
        raise BadImageError(
            path,
            f"image is {w}x{h} (width x height) but the model needs at least {crop} pixels on the "
            f"shorter side (crop={crop}); pass --allow_upscale to enlarge it anyway",
        )
    return preprocess.resize_crop(arr, resize, crop)


@dataclasses.dataclass(frozen=True)
class Batch:
    """Decoded images of one batch: `index` says which of the requested paths they are."""

    index: np.ndarray  # int [b]: positions in the path list of the decoded images
    images: np.ndarray  # uint8 [b, crop, crop, 3]
    bad: tuple[BadImageError, ...]  # skipped files (only with skip_bad)


def load_batch(
    paths: Sequence[str],
    start: int,
    resize: int,
    crop: int,
    *,
    skip_bad: bool,
    allow_upscale: bool = False,
    pool: concurrent.futures.Executor | None = None,
) -> Batch:
    """Decode paths (numbered from `start`); without skip_bad the first bad file raises."""
    mapper = pool.map if pool is not None else map
    results = list(mapper(lambda p: _try_load(p, resize, crop, allow_upscale), paths))
    bad = tuple(r for r in results if isinstance(r, BadImageError))
    if bad and not skip_bad:
        first = bad[0]
        more = f" (and {len(bad) - 1} more in this batch)" if len(bad) > 1 else ""
        raise BadImageError(
            first.path, f"{first.reason}{more}; pass --skip_bad_images to skip and list them"
        )
    ok = [i for i, r in enumerate(results) if not isinstance(r, BadImageError)]
    images = np.stack([results[i] for i in ok]) if ok else np.zeros((0, crop, crop, 3), np.uint8)
    return Batch(np.asarray(ok, np.int64) + start, images, bad)


def _try_load(path, resize, crop, allow_upscale):
    try:
        return load(path, resize, crop, allow_upscale)
    except BadImageError as e:
        return e


def iter_batches(
    paths: Sequence[str],
    batch_size: int,
    resize: int,
    crop: int,
    *,
    skip_bad: bool,
    allow_upscale: bool = False,
    num_threads: int | None = None,
) -> Iterator[Batch]:
    """Batches in path order; the next batch decodes on host threads while the caller works, so at
    most two batches of images are in memory at once."""
    threads = num_threads or min(8, os.cpu_count() or 1)
    with (
        concurrent.futures.ThreadPoolExecutor(threads) as pool,
        concurrent.futures.ThreadPoolExecutor(1) as ahead,
    ):

        def submit(start):
            chunk = paths[start : start + batch_size]
            return ahead.submit(
                load_batch,
                chunk,
                start,
                resize,
                crop,
                skip_bad=skip_bad,
                allow_upscale=allow_upscale,
                pool=pool,
            )

        pending = submit(0) if paths else None
        start = 0
        while pending is not None:
            batch = pending.result()
            start += batch_size
            pending = submit(start) if start < len(paths) else None
            yield batch
