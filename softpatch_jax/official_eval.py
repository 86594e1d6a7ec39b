"""Real-IAD's official evaluation (ADEval 1.1.0, the package its authors publish) as far as it
differs from ours, and its input format.

ADEval scores pixels at each image's original resolution: the ground truth is the mask file,
grayscale, binarised at > 127 (an image without a mask is all normal), and the anomaly map is
resized to the mask's size by bilinear interpolation (OpenCV's INTER_LINEAR: half-pixel centres,
edges clamped). Our maps cover the model's input, the centre crop of the image resized to
`resize` on its shorter side (`preprocess.resize_shorter`, `center_crop`). `frame_maps` puts each
map back into its resized image's frame; the margins the crop cut off, which the model never saw,
get the map's own minimum (no evidence of a defect there; with crop == resize and square images
there are none); `upsample` then resizes the frame to the original size as ADEval does. With
`eval.pixel_resolution=original` (the default of configs/realiad.py) the pixel metrics are computed
on those maps and masks.

`write_pickle` writes ADEval's input, {image path: (anomaly map, image score, mask path or None)},
with the maps in the resized frame (ADEval resizes them to each image itself), so that

  python -m adeval --sample_key_pat "([a-zA-Z][a-zA-Z0-9_]*_[0-9]{4}_[A-Z][A-Z_]*[A-Z])_C[0-9]_" \\
      WORKDIR/adeval/CELL_ID.pkl

computes the official numbers from a run's own predictions (ADEval 1.1.0 needs NumPy < 2).
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from softpatch_jax.data import preprocess
from softpatch_jax.data.realiad import MASK_THRESHOLD
from softpatch_jax.io_utils import atomic_open

# eval.pixel_resolution: where pixel metrics are computed.
PIXEL_RESOLUTIONS = {
    "crop": "the model's input: the resized, centre-cropped mask (nearest, > 0)",
    "original": "each mask's own size, binarised at > 127 as ADEval; maps upsampled bilinearly",
}


def check_resolution(name: str) -> str:
    if name not in PIXEL_RESOLUTIONS:
        raise ValueError(f"eval.pixel_resolution {name!r}; valid: {list(PIXEL_RESOLUTIONS)}")
    return name


def read_mask(path: str | None, image_path: str) -> np.ndarray:
    """The ground truth of one image at its original size, bool [H, W], as ADEval reads it."""
    with Image.open(image_path) as img:
        w, h = img.size
    if path is None:
        return np.zeros((h, w), bool)
    try:
        with Image.open(path) as img:
            gray = np.asarray(img.convert("L"))  # ITU-R 601 luma, as OpenCV's grayscale
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read mask {path!r}: {e}") from e
    if gray.shape != (h, w):
        raise ValueError(
            f"mask {path!r} is {gray.shape[1]}x{gray.shape[0]} but its image {image_path!r} is "
            f"{w}x{h} (width x height)"
        )
    return gray > MASK_THRESHOLD


def read_masks(records) -> list[np.ndarray]:
    """`read_mask` of each record: bool [H_t, W_t] per image."""
    return [read_mask(r.mask_path, r.path) for r in records]


def frame_maps(maps_TxCxC, sizes: Sequence[tuple[int, int]], resize: int) -> list[np.ndarray]:
    """Each map [crop, crop] in its image's resized frame (original size `sizes[t]` = (H, W)):
    float32 [h_t, w_t], the crop window holding the map, the rest the map's minimum."""
    out = []
    for m, (h, w) in zip(np.asarray(maps_TxCxC, np.float32), sizes):
        rh, rw = preprocess.resized_shape(h, w, resize)
        top, left = preprocess.crop_offsets(rh, rw, m.shape[0])
        frame = np.full((rh, rw), m.min(), np.float32)
        frame[top : top + m.shape[0], left : left + m.shape[1]] = m
        out.append(frame)
    return out


@functools.partial(jax.jit, static_argnums=1)
def _resize(frames_BxHxW: jax.Array, size: tuple[int, int]) -> jax.Array:
    shape = (frames_BxHxW.shape[0], *size)
    return jax.image.resize(frames_BxHxW, shape, "linear", antialias=False)


def upsample(frames: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Bilinear resize (half-pixel centres, edges clamped: OpenCV's INTER_LINEAR) of each frame to
    its size (H, W), batched over the images that share a frame shape and a size."""
    out: list[np.ndarray | None] = [None] * len(frames)
    groups: dict[tuple, list[int]] = {}
    for t, (f, size) in enumerate(zip(frames, sizes)):
        groups.setdefault((f.shape, tuple(size)), []).append(t)
    for (_, size), idx in groups.items():
        batch = _resize(jnp.asarray(np.stack([frames[t] for t in idx])), size)
        for t, m in zip(idx, np.asarray(batch)):
            out[t] = m
    return out


def write_pickle(path: str, records, frames: Sequence[np.ndarray], scores) -> None:
    """ADEval's input: {image path: (map float32 [h, w], score float, mask path or None)},
    written to a temp file and renamed."""
    scores = np.asarray(scores, np.float64)
    if not (len(records) == len(frames) == len(scores)):
        raise ValueError(f"{len(records)} records, {len(frames)} maps and {len(scores)} scores")
    doc = {
        r.path: (np.asarray(f, np.float32), float(s), r.mask_path)
        for r, f, s in zip(records, frames, scores)
    }
    with atomic_open(path, "wb") as f:
        pickle.dump(doc, f, protocol=4)


def pickle_path(workdir: str, cell_id: str) -> str:
    return os.path.join(workdir, "adeval", f"{cell_id}.pkl")
