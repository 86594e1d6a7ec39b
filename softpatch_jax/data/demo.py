"""Built-in demo data: a small synthetic dataset in MVTec AD's folder layout, written on first use.

Four categories, two textures (fabric, wood) and two objects (pill, washer), each with five defect
types that mimic MVTec's: scratch, hole, stain, crack, missing (a piece torn or broken off). Masks are
exact: the pixels where the defect's opacity is at least one half. Everything is deterministic in
(seed, category, split, index), so the same seed writes byte-identical files.

  python -m softpatch_jax.data.demo --out=/tmp/demo   # writes the default dataset there
  (an existing --out is refused unless it is an earlier demo dataset and --overwrite is given;
  a folder holding anything else is never deleted: softpatch_jax/outdir.py)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
from absl import app, flags
from PIL import Image
from scipy import ndimage

from softpatch_jax import cli, outdir

CATEGORIES = ("fabric", "wood", "pill", "washer")
OBJECTS = ("pill", "washer")
DEFECTS = ("scratch", "hole", "stain", "crack", "missing")


@dataclasses.dataclass(frozen=True)
class DemoSpec:
    size: int = 256
    num_train: int = 60  # 20% noise injects 12 of the 25 test anomalies, as in MVTec's proportions
    num_test_good: int = 15
    num_per_defect: int = 5
    categories: tuple[str, ...] = CATEGORIES
    seed: int = 0
    defect_scale: float = 1.5  # multiplies every defect's size (1.0: small, MVTec-like hairlines)
    # Each defect's opacity is drawn uniform in this range: faint to bold, as real defects vary.
    opacity: tuple[float, float] = (0.6, 1.0)

    def fingerprint(self) -> str:
        text = json.dumps({**dataclasses.asdict(self), "version": 1}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _smooth(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """A smooth random field with unit standard deviation."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return f / (f.std() + 1e-8)


def _grid(size: int):
    return np.mgrid[0:size, 0:size].astype(np.float32)


# ---------------------------------------------------------------- normal images


def _fabric(rng, size):
    y, x = _grid(size)
    px, py = rng.uniform(0, 2 * np.pi, 2)
    weave = np.sin(2 * np.pi * x / 8 + px) * np.sin(2 * np.pi * y / 8 + py)
    fibre = _smooth(rng, (size, size), 1.0)
    v = 0.55 + 0.12 * weave + 0.03 * fibre + 0.02 * _smooth(rng, (size, size), 12.0)
    base = np.array([0.30, 0.42, 0.62])
    return np.clip(v[..., None] * base * 1.6, 0, 1), np.ones((size, size), bool)


def _wood(rng, size):
    _, x = _grid(size)
    warp = 6.0 * _smooth(rng, (size, size), 16.0)
    rings = np.sin(2 * np.pi * (x + warp + rng.uniform(0, 40)) / 14.0)
    v = 0.62 + 0.10 * rings + 0.03 * _smooth(rng, (size, size), 1.5)
    base = np.array([0.78, 0.52, 0.30])
    return np.clip(v[..., None] * base * 1.3, 0, 1), np.ones((size, size), bool)


def _object_canvas(rng, size):
    bg = 0.12 + 0.01 * _smooth(rng, (size, size), 2.0)
    return np.repeat(bg[..., None], 3, axis=2)


def _pill(rng, size):
    y, x = _grid(size)
    s = size / 256
    cy, cx = size / 2 + rng.uniform(-4, 4, 2) * s
    a, b = 88 * s * rng.uniform(0.97, 1.03), 44 * s * rng.uniform(0.97, 1.03)
    t = np.deg2rad(rng.uniform(-4, 4))  # pose jitter, as parts on a conveyor
    x, y = (
        cx + (x - cx) * np.cos(t) + (y - cy) * np.sin(t),
        cy - (x - cx) * np.sin(t) + (y - cy) * np.cos(t),
    )
    r = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    body = r <= 1.0
    img = _object_canvas(rng, size)
    shade = 0.85 - 0.25 * r**2 + 0.015 * _smooth(rng, (size, size), 1.0)
    colour = np.where((x < cx)[..., None], [0.92, 0.90, 0.86], [0.86, 0.32, 0.25])
    img = np.where(body[..., None], shade[..., None] * colour, img)
    # A printed mark on the white half, as on real pills.
    mark = (np.abs(x - (cx - 40 * s)) < 10 * s) & (np.abs(y - cy) < 2.2 * s)
    img = np.where(mark[..., None], [0.25, 0.25, 0.3], img)
    return np.clip(img, 0, 1), body


def _washer(rng, size):
    y, x = _grid(size)
    s = size / 256
    cy, cx = size / 2 + rng.uniform(-3, 3, 2) * s
    r = np.hypot(x - cx, y - cy)
    body = (r <= 92 * s) & (r >= 36 * s)
    theta = np.arctan2(y - cy, x - cx)
    brushed = 0.03 * np.sin(r * 1.7) + 0.02 * _smooth(rng, (size, size), 1.0)
    light = 0.62 + 0.12 * np.cos(theta - rng.uniform(0.5, 1.1)) + brushed
    img = _object_canvas(rng, size)
    img = np.where(body[..., None], light[..., None] * np.array([0.92, 0.93, 0.96]), img)
    return np.clip(img, 0, 1), body


RENDER = {"fabric": _fabric, "wood": _wood, "pill": _pill, "washer": _washer}


# ---------------------------------------------------------------- defects


def _stroke_alpha(points: np.ndarray, width: float, size: int) -> np.ndarray:
    """Opacity of a polyline of `points` [K, 2] (y, x) drawn `width` pixels wide, anti-aliased."""
    lo = np.maximum(np.floor(points.min(0) - width - 2), 0).astype(int)
    hi = np.minimum(np.ceil(points.max(0) + width + 2), size).astype(int)
    yy, xx = np.mgrid[lo[0] : hi[0], lo[1] : hi[1]].astype(np.float32)
    pix = np.stack([yy.ravel(), xx.ravel()], 1)
    a, b = points[:-1], points[1:]
    ab = b - a
    t = np.clip(((pix[:, None] - a[None]) * ab[None]).sum(-1) / ((ab**2).sum(-1) + 1e-9), 0, 1)
    dist = np.linalg.norm(pix[:, None] - (a[None] + t[..., None] * ab[None]), axis=-1).min(1)
    alpha = np.zeros((size, size), np.float32)
    alpha[lo[0] : hi[0], lo[1] : hi[1]] = np.clip(width / 2 + 0.5 - dist, 0, 1).reshape(yy.shape)
    return alpha


def _location(rng, body, margin):
    size = body.shape[0]
    inner = ndimage.binary_erosion(body, iterations=int(margin // 2) + 1)
    inner[:margin] = inner[-margin:] = False
    inner[:, :margin] = inner[:, -margin:] = False
    ys, xs = np.nonzero(inner if inner.any() else body)
    i = rng.integers(len(ys))
    return np.array([ys[i], xs[i]], np.float32) + rng.uniform(-0.5, 0.5, 2) * (size / 256)


def _defect(kind, rng, img, body, bg, scale=1.0, opacity=(1.0, 1.0)):
    size = img.shape[0]
    s = size / 256 * scale
    margin = int(40 * s)
    y, x = _grid(size)
    c = _location(rng, body, margin)
    if kind == "scratch":
        ang = rng.uniform(0, np.pi)
        half = rng.uniform(22, 40) * s
        d = np.array([np.sin(ang), np.cos(ang)])
        bend = rng.uniform(-10, 10) * s * np.array([d[1], -d[0]])
        t = np.linspace(-1, 1, 24)[:, None]
        pts = c + t * half * d + (1 - t**2) * bend
        alpha = _stroke_alpha(pts, rng.uniform(1.6, 2.6) * s, size)
        colour = np.full(3, 0.97 if rng.random() < 0.5 else 0.05)
    elif kind == "crack":
        steps = rng.integers(18, 28)
        ang = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.35, steps))
        pts = c + np.cumsum(np.stack([np.sin(ang), np.cos(ang)], 1) * 2.5 * s, axis=0)
        alpha = _stroke_alpha(np.vstack([c, pts]), rng.uniform(1.2, 2.0) * s, size)
        colour = np.full(3, 0.04)
    elif kind == "hole":
        r = rng.uniform(7, 13) * s
        dist = np.hypot(y - c[0], x - c[1])
        alpha = np.clip(r + 0.5 - dist, 0, 1)
        rim = np.clip(1.0 - np.abs(dist - r - 1.5 * s) / (1.5 * s), 0, 1) * 0.4
        img = img * (1 - rim[..., None]) + rim[..., None] * 0.9
        colour = np.full(3, 0.03)
    elif kind == "stain":
        r = rng.uniform(14, 22) * s
        dist = np.hypot(y - c[0], x - c[1]) / r
        blob = 1.2 - dist + 0.35 * _smooth(rng, (size, size), 3 * s)
        alpha = np.clip((blob - 0.5) * 4, 0, 1) * 0.85
        colour = np.array([0.45, 0.33, 0.12]) * rng.uniform(0.7, 1.1)
    elif kind == "missing":
        if body.all():  # texture: a torn piece shows the dark backing
            r = rng.uniform(12, 20) * s
        else:  # object: a piece broken off its outline
            edge = body & ~ndimage.binary_erosion(body, iterations=2)
            ys, xs = np.nonzero(edge)
            i = rng.integers(len(ys))
            c = np.array([ys[i], xs[i]], np.float32)
            r = rng.uniform(16, 24) * s
        theta = np.arctan2(y - c[0], x - c[1])
        wobble = 1 + 0.25 * np.sin(3 * theta + rng.uniform(0, 6)) + 0.1 * np.sin(7 * theta)
        alpha = np.clip(r * wobble + 0.5 - np.hypot(y - c[0], x - c[1]), 0, 1) * body
        colour = None
    else:
        raise ValueError(f"unknown defect {kind!r}; valid: {DEFECTS}")
    a = alpha[..., None] * rng.uniform(*opacity)
    target = bg if colour is None else colour
    return img * (1 - a) + a * target, alpha >= 0.5


def render(
    category: str,
    rng: np.random.Generator,
    size: int,
    defect: str | None = None,
    defect_scale: float = 1.0,
    opacity: tuple[float, float] = (1.0, 1.0),
):
    """One image (uint8 HxWx3) and its mask (bool HxW, all False for normal images)."""
    img, body = RENDER[category](rng, size)
    mask = np.zeros((size, size), bool)
    if defect is not None:
        bg = _object_canvas(rng, size) if category in OBJECTS else np.full((size, size, 3), 0.08)
        img, mask = _defect(defect, rng, img, body, bg, defect_scale, opacity)
    # Per-image illumination (gain and a gentle gradient) and sensor noise: the nuisance variation
    # of a real line, without which any defect, even one seen in training, stands out.
    y, x = _grid(size) / size - 0.5
    tilt = rng.uniform(-0.15, 0.15, 2)
    light = rng.uniform(0.8, 1.2) * (1.0 + tilt[0] * y + tilt[1] * x)
    tint = rng.uniform(0.95, 1.05, 3)  # colour temperature drift of the lamp
    img = img * light[..., None] * tint
    focus = rng.uniform(0.0, 2.2)  # depth-of-field variation from part to part
    if focus > 0.3:
        img = ndimage.gaussian_filter(img, (focus, focus, 0), mode="nearest")
    img = img + rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), mask


def _rng(spec: DemoSpec, category: str, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, CATEGORIES.index(category), split, index])


def _save(path: str, arr: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def write(root: str, spec: DemoSpec = DemoSpec(), *, overwrite: bool = False) -> str:
    """Writes the dataset under `root` (MVTec layout), built whole under a staging name and renamed
    into place (`outdir.staged`). An existing `root` is replaced only with overwrite and only when
    it is a demo dataset holding nothing but what this tool wrote; anything else is refused."""
    unknown = set(spec.categories) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown demo categories {sorted(unknown)}; valid: {CATEGORIES}")
    with outdir.staged(root, "demo_spec.json", "demo dataset", overwrite=overwrite) as (tmp, _):
        for cat in spec.categories:
            for i in range(spec.num_train):
                img, _ = render(cat, _rng(spec, cat, 0, i), spec.size)
                _save(os.path.join(tmp, cat, "train", "good", f"{i:03d}.png"), img)
            for i in range(spec.num_test_good):
                img, _ = render(cat, _rng(spec, cat, 1, i), spec.size)
                _save(os.path.join(tmp, cat, "test", "good", f"{i:03d}.png"), img)
            for d, defect in enumerate(DEFECTS):
                for i in range(spec.num_per_defect):
                    rng = _rng(spec, cat, 2 + d, i)
                    img, mask = render(cat, rng, spec.size, defect, spec.defect_scale, spec.opacity)
                    _save(os.path.join(tmp, cat, "test", defect, f"{i:03d}.png"), img)
                    m = mask.astype(np.uint8) * 255
                    _save(os.path.join(tmp, cat, "ground_truth", defect, f"{i:03d}_mask.png"), m)
        with open(os.path.join(tmp, "demo_spec.json"), "w") as f:
            json.dump(dataclasses.asdict(spec), f, indent=1)
    return root


def default_root(spec: DemoSpec = DemoSpec()) -> str:
    cache = os.environ.get(
        "SOFTPATCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "softpatch_jax")
    )
    return os.path.join(cache, f"demo-{spec.fingerprint()}")


def ensure(root: str | None = None, spec: DemoSpec = DemoSpec()) -> str:
    """The demo dataset's root, generating it first if it is not complete there."""
    root = root or default_root(spec)
    if not os.path.isfile(os.path.join(root, "demo_spec.json")):
        write(root, spec)
    return root


def _define_flags() -> None:
    flags.DEFINE_string("out", None, "target folder (default: the cache)")
    flags.DEFINE_integer("size", DemoSpec.size, "image size")
    flags.DEFINE_integer("seed", DemoSpec.seed, "generator seed")
    flags.DEFINE_bool(
        "overwrite", False, "replace an earlier demo dataset there (never a folder of other files)"
    )


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    spec = DemoSpec(size=f.size, seed=f.seed)
    print(cli.one_line_errors(write, f.out or default_root(spec), spec, overwrite=f.overwrite))


if __name__ == "__main__":
    _define_flags()  # here, not at import: data readers import this module beside other flags
    app.run(main)
