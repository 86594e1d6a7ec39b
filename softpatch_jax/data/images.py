"""Decoding for the deployment tool: strict, documented conversion of whatever a production folder
holds into the uint8 RGB crops the backbone takes, streamed in batches so memory stays bounded.

Conversion rules (`to_rgb`):
- 8-bit RGB: as is. Grayscale ("L", "1"): replicated to three channels.
- Palette ("P", "PA"): expanded through the palette; transparency is dropped like alpha below.
- Alpha ("RGBA", "LA", "PA"): dropped, keeping the stored colour values (not composited), which is
  what the research decoder (`preprocess.to_rgb_uint8`) does, so both see the same pixels.
- 16-bit ("I;16*", and "I" as 16-bit TIFF/PNG often open): scaled by 255/S and rounded, S the
  top of the sensor's range: 65535 by default, or the bit depth the deployment tool found on its
  training images (`sixteen_bit_range`: 12-bit data stored in 16-bit PNGs gives S = 4095, where
  the fixed 16-bit scale would squeeze it into 16 grey levels), recorded with the model and used
  at predict; a sample above S there is refused (a different sensor or setting). The scale is
  fixed per model, not stretched per image, so a given sensor value means the same in every image
  (the research decoder stretches images whose maximum is at most 255; this one never does).
- CMYK, YCbCr, LAB, HSV: Pillow's conversion to RGB. Floating-point ("F") images are refused.
- EXIF orientation is applied (phone photos look as they display); multi-frame files use frame 0.

Geometry is the research pipeline's: resize the shorter side to `resize` (bilinear), center-crop
`crop` (`preprocess.resize_crop`). An image whose shorter side is below `crop` is refused by default
and named with its size and the minimum: it has less detail than the model's input, which on a
production line means a wrong file (a thumbnail, another camera); `allow_upscale` accepts it,
as long as the enlarged image stays within MAX_UPSCALED_PIXELS (a 10000x4 strip would become a
640000x256 frame, gigabytes of memory, and is refused naming its size).
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
FULL_16_BIT = 65535
MAX_UPSCALED_PIXELS = 4096 * 4096  # an enlarged image larger than this is refused


class BadImageError(ValueError):
    """An input image that cannot be used; `path` names it and the message says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def to_rgb(
    img: Image.Image, path: str = "<image>", sixteen_bit_max: int = FULL_16_BIT
) -> np.ndarray:
    """Any supported PIL image -> uint8 [H, W, 3] by the rules in the module docstring;
    16-bit samples are scaled by 255 / sixteen_bit_max (a sample above it is refused)."""
    if img.mode == "F":
        raise BadImageError(path, "floating-point images (mode F) are not supported")
    if img.mode in SIXTEEN_BIT:
        arr = np.asarray(img, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if top > sixteen_bit_max:
            raise BadImageError(
                path,
                f"16-bit sample value {top:.0f} is above {sixteen_bit_max}, the top of the range "
                f"({bit_depth(sixteen_bit_max)}-bit) the model's training images used: another "
                "sensor or setting? refit on images like this one",
            )
        arr = np.clip(np.rint(arr * (255.0 / sixteen_bit_max)), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA")  # applies palette transparency, then alpha is dropped below
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def bit_depth(sixteen_bit_max: int) -> int:
    return int(sixteen_bit_max).bit_length()


def sixteen_bit_range(paths: Sequence[str]) -> tuple[int, int]:
    """(S, count): the top of the range the 16-bit images among `paths` use, as 2^b - 1 for the
    smallest bit depth b in 8..16 holding their largest sample (12-bit data gives 4095), and how
    many 16-bit images there were. Only 16-bit files are decoded; unreadable files are left to the
    decoding pass that reports them. (FULL_16_BIT, 0) when there is none."""
    top, count = -1, 0
    for path in paths:
        try:
            with Image.open(path) as img:
                if img.mode not in SIXTEEN_BIT:
                    continue
                img.load()
                arr = np.asarray(img)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            continue
        count += 1
        top = max(top, int(arr.max()) if arr.size else 0)
    if count == 0:
        return FULL_16_BIT, 0
    bits = max(8, min(16, max(top, 1).bit_length()))
    return (1 << bits) - 1, count


def check_size(path: str, h: int, w: int, resize: int, crop: int, allow_upscale: bool) -> None:
    """BadImageError unless an h x w image may be used: its shorter side at least `crop`, or
    (allow_upscale) its enlargement to shorter side max(resize, crop) within MAX_UPSCALED_PIXELS."""
    if min(h, w) >= crop:
        return
    if not allow_upscale:
        raise BadImageError(
            path,
            f"image is {w}x{h} (width x height) but the model needs at least {crop} pixels on the "
            f"shorter side (crop={crop}); pass --allow_upscale to enlarge it anyway",
        )
    scale = max(resize, crop) / max(min(h, w), 1)
    big_h, big_w = round(h * scale), round(w * scale)
    if big_h * big_w > MAX_UPSCALED_PIXELS:
        raise BadImageError(
            path,
            f"image is {w}x{h}: enlarging it to shorter side {max(resize, crop)} gives "
            f"{big_w}x{big_h} ({big_w * big_h / 1e6:.0f} megapixels), above the bound of "
            f"{MAX_UPSCALED_PIXELS / 1e6:.0f} megapixels for --allow_upscale",
        )


def decode(path: str, sixteen_bit_max: int = FULL_16_BIT) -> np.ndarray:
    """Read and convert one file; BadImageError names it when it is unreadable or truncated."""
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img, path, sixteen_bit_max)
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # Pillow reports truncated, corrupt and unknown-format files with any of these.
        raise BadImageError(path, f"cannot read image ({type(e).__name__}: {e})") from e


def load(path: str, resize: int, crop: int, allow_upscale: bool = False) -> np.ndarray:
    """One file -> uint8 [crop, crop, 3]."""
    arr = decode(path)
    check_size(path, *arr.shape[:2], resize, crop, allow_upscale)
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
