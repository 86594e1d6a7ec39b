"""Shared by the deployment tests: a tiny config (random-init resnet_tiny, 32x32 crops, small
embedding) and a tiny unlabelled folder whose defective images carry a strong planted defect, so the
audit must find them even on random features."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from configs import demo as demo_config
from softpatch_jax import features
from softpatch_jax.deploy import commands
from softpatch_jax.experiment import options

SIZE = 32


def tiny_config():
    c = demo_config.get_config()
    c.backbone.arch = "resnet_tiny"
    c.backbone.allow_random_init = True
    c.dataset.resize = c.dataset.crop = SIZE
    c.dataset.batch_size = 8
    c.embedding.pretrain_dim = c.embedding.target_dim = 64
    c.softpatch.projection_dim = 16
    c.softpatch.lof_k = 4
    c.coreset.ratio = 0.25
    return c


def normal_image(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A fine grey weave with sensor noise: every patch looks like every other, and grey survives
    conversion to grayscale, 16-bit and palette files unchanged."""
    y, x = np.mgrid[0:size, 0:size]
    phase = rng.uniform(0, 2 * np.pi)
    weave = 0.5 + 0.15 * np.sin(2 * np.pi * x / 4 + phase) * np.sin(2 * np.pi * y / 4)
    grey = (np.clip(weave + rng.normal(0, 0.01, (size, size)), 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def defective_image(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A normal image with a saturated magenta square of 10x10 pixels."""
    img = normal_image(rng, size)
    y0, x0 = rng.integers(4, size - 14, 2)
    img[y0 : y0 + 10, x0 : x0 + 10] = (255, 0, 255)
    return img


# How normal images are stored, in turn: every format and mode the decoder converts.
NORMAL_FORMATS = ("png", "jpg", "bmp", "tif", "rgba.png", "gray.png", "g16.png", "pal.png", "webp")


def _save(img: np.ndarray, path: str, kind: str) -> None:
    if kind == "rgba.png":
        alpha = np.full((*img.shape[:2], 1), 200, np.uint8)
        Image.fromarray(np.concatenate([img, alpha], axis=2)).save(path)
    elif kind == "gray.png":
        Image.fromarray(img[..., 0]).save(path)
    elif kind == "g16.png":
        Image.fromarray(img[..., 0].astype(np.uint16) * 257).save(path)
    elif kind == "pal.png":
        Image.fromarray(img).quantize(256, method=Image.Quantize.MEDIANCUT).save(path)
    elif kind == "jpg":
        Image.fromarray(img).save(path, quality=98)
    elif kind == "webp":
        Image.fromarray(img).save(path, lossless=True)
    else:
        Image.fromarray(img).save(path)


def write_folder(
    root: str, num_normal: int = 12, num_defective: int = 2, seed: int = 0, mixed: bool = False
) -> list:
    """Images under root (every third in a sub-folder); returns the defective ones' relative names.

    mixed: normal images cycle through NORMAL_FORMATS; defective ones are RGB PNG or TIFF."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_normal + num_defective)
    defective = []
    for j, i in enumerate(order):
        is_defect = i >= num_normal
        if not mixed:
            kind = "png"
        elif is_defect:
            kind = ("png", "tif")[len(defective) % 2]
        else:
            kind = NORMAL_FORMATS[j % len(NORMAL_FORMATS)]
        ext = kind.rsplit(".", 1)[-1]
        stem = f"img_{j:02d}" + ("" if "." not in kind else "_" + kind.split(".")[0])
        rel = os.path.join("sub" if j % 3 == 0 else "", f"{stem}.{ext}")
        img = defective_image(rng) if is_defect else normal_image(rng)
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        _save(img, os.path.join(root, rel), kind)
        if is_defect:
            defective.append(rel)
    return sorted(defective)


def tiny_extractor() -> features.Extractor:
    """The tiny config's feature extractor, built once per test module by its fixture."""
    return features.build(options.extractor_options(tiny_config()))


def fit_tiny_model(tmp_path_factory, ex) -> tuple:
    """(model, its folder, its training folder): the tiny config fitted on 10 normal images and 1
    planted defect, the deployment tests' shared fixture."""
    root = tmp_path_factory.mktemp("train")
    write_folder(str(root), 10, 1)
    path = str(tmp_path_factory.mktemp("models") / "m")
    m = commands.fit_and_save(tiny_config(), str(root), path, extractor=ex)
    return m, path, str(root)
