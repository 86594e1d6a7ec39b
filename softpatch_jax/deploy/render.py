"""Pictures for people: anomaly maps as colour heat maps and overlays on the input crop, and contact
sheets of many images. Every file is written atomically (temp file, then rename).

Colour scale: a map value v is drawn at (v - lo) / (hi - lo), clipped to [0, 1], through the
'inferno' colour map, with lo/hi fixed per model (see `predicting.map_scale`), so colours mean
the same in every image instead of being stretched per image.
"""

from __future__ import annotations

import io

import matplotlib
import numpy as np
from PIL import Image

from softpatch_jax import io_utils

matplotlib.use("Agg")  # files only, never a window

_LUT = (matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255 + 0.5).astype(np.uint8)


def heat(map_HxW: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """uint8 [H, W, 3] colour image of a map on the fixed scale [lo, hi]; NaN/inf are errors."""
    if not (np.isfinite(lo) and np.isfinite(hi) and np.isfinite(map_HxW).all()):
        raise ValueError(f"heat map scale ({lo}, {hi}) or map values are not finite")
    span = max(float(hi) - float(lo), 1e-12)
    t = np.clip((np.asarray(map_HxW, np.float64) - lo) / span, 0.0, 1.0)
    return _LUT[np.rint(t * 255).astype(np.int64)]


def upsample(map_hxw: np.ndarray, size_HW: tuple[int, int]) -> np.ndarray:
    """A coarse float map resized bilinearly to (H, W), for drawing only."""
    img = Image.fromarray(np.asarray(map_hxw, np.float32), mode="F")
    return np.asarray(img.resize((size_HW[1], size_HW[0]), Image.BILINEAR), np.float32)


def overlay(image_HxWx3: np.ndarray, map_HxW: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The heat map blended over the image, more opaque where the map is higher (so normal regions
    stay readable)."""
    span = max(float(hi) - float(lo), 1e-12)
    a = np.clip((np.asarray(map_HxW, np.float64) - lo) / span, 0.0, 1.0)[..., None] * 0.7
    out = image_HxWx3.astype(np.float64) * (1 - a) + heat(map_HxW, lo, hi).astype(np.float64) * a
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def save_png(path: str, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    with io_utils.atomic_open(path, "wb") as f:
        f.write(buf.getvalue())


def contact_sheet(path: str, tiles: list[np.ndarray], captions: list[str], title: str) -> None:
    """A grid of uint8 tiles with a caption under each, saved as one PNG."""
    from matplotlib.figure import Figure  # pyplot-free: no global figure state

    cols = min(4, max(1, len(tiles)))
    rows = max(1, -(-len(tiles) // cols))
    fig = Figure(figsize=(3.2 * cols, 3.5 * rows + 0.4), dpi=100)
    fig.suptitle(title, fontsize=10)
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.axis("off")
        if i < len(tiles):
            ax.imshow(tiles[i])
            ax.set_title(captions[i], fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    with io_utils.atomic_open(path, "wb") as f:
        f.write(buf.getvalue())
