"""Which part of an image the deployment tool inspects, and how a whole frame is cut into the
backbone's fixed-size inputs and the per-input anomaly maps stitched back.

Modes (`--region`, stored with the model by `fit`; `predict` uses the model's unless told):
  "full"    (default) the whole frame. The image is resized so its shorter side is `resize` (the
            research pipeline's scale, so features mean what they meant at fit time), then covered
            by crop x crop tiles: per axis n = ceil((L - crop) / crop) + 1 tiles, spread evenly
            from 0 to L - crop (so they overlap by as little as coverage allows, at least 0 px).
            Each tile is embedded and scored alone. Every frame pixel belongs to the tile whose
            centre is nearest (per axis), so a tile's border, where it cuts objects as no training
            crop did, is used only at the frame's own border: the frame's map takes each pixel
            from its owner, and the image score is the maximum patch score over the patches each
            tile owns (METHOD.md section 5's max, over the frame). A 256x256 image at resize 256,
            crop 224 gives 2x2 tiles; 768x256 gives 4x2. Measured on a 768x256 strip of three
            demo pills: the per-pixel maximum over overlapping tiles instead lit up every tile
            border that crossed a pill and flagged the all-good strip.
  "center"  the research pipeline's view: resize the shorter side, centre-crop crop x crop; the
            border outside the crop is not inspected (16 px per side at 256/224; two thirds of a
            768x256 frame). Kept as an explicit option for parity with the benchmark numbers.

Why tiles rather than letterboxing (the full frame shrunk to crop x crop and padded): shrinking
changes the scale the memory bank was fitted at (a 768x256 frame would be inspected at 0.29x, a
crack a few pixels wide vanishing), and the padding is content no training image had, so it scores
as anomalous. Tiles keep the fit's scale and content; they cost T backbone passes per image.

`fit` in "full" mode needs every training image to give the same tile layout (one camera, one
size): the noise discriminators compare the same patch position across training images, so the
positions are (tile, patch) pairs, P = T * h * w. Overlapping tiles repeat patches, so `fit` scales
the coreset ratio by the frame's distinct share of the tiles' area (256x256 at crop 224:
65536 / (4 * 224^2) = 0.33): the bank keeps the same density per pixel as on centre crops.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
from collections.abc import Iterator, Sequence

import numpy as np

from softpatch_jax.data import images, preprocess

MODES = ("full", "center")
DEFAULT = "full"
MODE_DOC = {
    "full": "the whole frame, resized to shorter side = resize and covered by crop x crop tiles",
    "center": "only the centre crop of the resized image; the border is not inspected",
}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"--region={mode!r} not understood: choose one of {', '.join(MODES)}")
    return mode


@dataclasses.dataclass(frozen=True)
class Views:
    """One image as backbone inputs.

    Attributes:
      tiles: uint8 [T, crop, crop, 3].
      origins: int [T, 2], (y, x) of each tile's top-left corner in `frame`.
      frame: uint8 [H, W, 3], the resized image the tiles cover (the overlay background).
      source_hw: (height, width) of the decoded file.
    """

    tiles: np.ndarray
    origins: np.ndarray
    frame: np.ndarray
    source_hw: tuple[int, int]

    @property
    def layout(self) -> tuple:
        """What must match across training images: frame size and tile origins."""
        return (self.frame.shape[:2], tuple(map(tuple, self.origins.tolist())))


def starts(length: int, crop: int) -> list[int]:
    """Tile starts along one axis of `length` pixels covering all of it with crop-sized tiles."""
    if length <= crop:
        return [0]
    n = math.ceil((length - crop) / crop) + 1
    return [round(i * (length - crop) / (n - 1)) for i in range(n)]


def views(arr: np.ndarray, resize: int, crop: int, mode: str) -> Views:
    """uint8 [H, W, 3] -> the tiles inspected in `mode` (see module docstring)."""
    hw = tuple(arr.shape[:2])
    if mode == "center":
        tile = preprocess.resize_crop(arr, resize, crop)
        return Views(tile[None], np.zeros((1, 2), np.int64), tile, hw)
    frame = preprocess.resize_shorter(arr, max(resize, crop))
    h, w = frame.shape[:2]
    origins = np.array([(y, x) for y in starts(h, crop) for x in starts(w, crop)], np.int64)
    tiles = np.stack([frame[y : y + crop, x : x + crop] for y, x in origins])
    return Views(tiles, origins, frame, hw)


def _nearest_start(starts_1d: list[int], crop: int, length: int) -> np.ndarray:
    """int [length]: for each pixel, the index of the tile (along this axis) whose centre is
    nearest; ties go to the earlier tile."""
    centres = np.asarray(starts_1d, np.float64) + crop / 2.0
    pix = np.arange(length) + 0.5
    # The midpoints between neighbouring centres split the axis; a pixel on a midpoint goes to the
    # earlier tile. O(length) memory (an argmin over a [length, tiles] table took gigabytes for a
    # long strip: 80000 px x 2500 tiles). Centres and pixels are multiples of 0.5: exact.
    mids = (centres[1:] + centres[:-1]) / 2.0
    return np.searchsorted(mids, pix, side="left")


def owners(origins: np.ndarray, crop: int, frame_hw: tuple[int, int]) -> np.ndarray:
    """int [H, W]: which tile owns each frame pixel: the one whose centre is nearest along each
    axis. A tile's border cuts objects in a way no training crop did, so its outer ~20 px score
    high; where another tile sees the same pixels further from its border, that tile decides."""
    ys = sorted({int(y) for y, _ in origins})
    xs = sorted({int(x) for _, x in origins})
    iy = _nearest_start(ys, crop, frame_hw[0])
    ix = _nearest_start(xs, crop, frame_hw[1])
    index = {(int(y), int(x)): t for t, (y, x) in enumerate(origins)}
    table = np.array([[index[(ys[a], xs[b])] for b in range(len(xs))] for a in range(len(ys))])
    return table[iy[:, None], ix[None, :]]


def stitch(maps_TxHxW: np.ndarray, origins: np.ndarray, frame_hw: tuple[int, int]) -> np.ndarray:
    """float [H, W]: each frame pixel from the tile that owns it (`owners`)."""
    crop = maps_TxHxW.shape[1]
    own = owners(origins, crop, frame_hw)
    out = np.empty(frame_hw, np.float32)
    for t, (y, x) in enumerate(origins):
        sel = own[y : y + crop, x : x + crop] == t
        out[y : y + crop, x : x + crop][sel] = maps_TxHxW[t][sel]
    return out


def owned_patches(
    origins: np.ndarray, crop: int, grid: tuple[int, int], frame_hw: tuple[int, int]
) -> np.ndarray:
    """bool [T * h * w], tile-major: the patches whose centre pixel their tile owns. The image
    score is the maximum patch score over these, at fit (training scores) and predict alike."""
    own = owners(origins, crop, frame_hw)
    h, w = grid
    cy = ((np.arange(h) + 0.5) * crop / h).astype(np.int64)
    cx = ((np.arange(w) + 0.5) * crop / w).astype(np.int64)
    out = [own[y + cy[:, None], x + cx[None, :]] == t for t, (y, x) in enumerate(origins)]
    return np.stack(out).reshape(-1)


def describe(mode: str, v: Views, resize: int, crop: int) -> str:
    """The inspected region in words, for every output row."""
    sh, sw = v.source_hw
    fh, fw = v.frame.shape[:2]
    if mode == "center":
        return (
            f"center: a {crop}x{crop} crop of the {sw}x{sh} image resized to shorter side {resize};"
            " the border outside it is NOT inspected"
        )
    return f"full: whole {sw}x{sh} frame at {fw}x{fh}, {len(v.origins)} tiles of {crop}x{crop}"


def load(
    path: str,
    resize: int,
    crop: int,
    mode: str,
    allow_upscale: bool = False,
    sixteen_bit_max: int = images.FULL_16_BIT,
) -> Views:
    """Decode one file (`images.decode`'s rules with the model's 16-bit range, and its refusal of
    images smaller than the crop or too large once enlarged: `images.check_size`) and cut it into
    views."""
    arr = images.decode(path, sixteen_bit_max)
    images.check_size(path, *arr.shape[:2], resize, crop, allow_upscale)
    return views(arr, resize, crop, mode)


def iter_views(
    paths: Sequence[str],
    group: int,
    resize: int,
    crop: int,
    mode: str,
    *,
    skip_bad: bool,
    allow_upscale: bool = False,
    sixteen_bit_max: int = images.FULL_16_BIT,
) -> Iterator[tuple[list[int], list[Views], list[images.BadImageError]]]:
    """Groups of `group` images in path order: (their indices, their views, skipped bad files).
    Decoding runs on host threads one group ahead. Without skip_bad the first bad file raises."""

    def one(p):
        try:
            return load(p, resize, crop, mode, allow_upscale, sixteen_bit_max)
        except images.BadImageError as e:
            return e

    def load_group(start):
        return list(pool.map(one, paths[start : start + group]))

    threads = min(8, os.cpu_count() or 1)
    with (
        concurrent.futures.ThreadPoolExecutor(threads) as pool,
        concurrent.futures.ThreadPoolExecutor(1) as ahead,
    ):
        pending = ahead.submit(load_group, 0) if paths else None
        start = 0
        while pending is not None:
            results = pending.result()
            nxt = start + group
            pending = ahead.submit(load_group, nxt) if nxt < len(paths) else None
            bad = [r for r in results if isinstance(r, images.BadImageError)]
            if bad and not skip_bad:
                raise images.BadImageError(
                    bad[0].path, f"{bad[0].reason}; pass --skip_bad_images to skip and list them"
                )
            ok = [i for i, r in enumerate(results) if not isinstance(r, images.BadImageError)]
            yield [start + i for i in ok], [results[i] for i in ok], bad
            start = nxt
