"""A miniature Real-IAD tree (the official layout, `realiad.py`) for tests and smoke runs: a few
synthetic samples per category, five views each, with every split's JSON files.

  python -m softpatch_jax.data.realiad_demo --out=/tmp/realiad_mini [--nested]

Per category: normal samples and defective ones (alternating over `CODES`), five views each. A
defective sample's last view is stored as "OK" with a null mask, as Real-IAD stores views in which
the defect is not visible. Images are a smooth per-category texture plus noise; a defect is a bright
square where its mask is.

The lists are built as the official ones are: one test set (`test_ok` + `test_ng` samples) shared
by every split, and FUIAD training lists of `train_samples` samples at every ratio, of which
round(ratio * train_samples) are defective (all their views), so the split's ratio is the fraction
of defective samples, while the fraction of anomalous training images is lower (the hidden views).
The standard split trains on `train_samples` normal samples. `nested` puts the split folders inside
realiad_jsons/.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from absl import app, flags
from PIL import Image

from softpatch_jax.data import realiad

CODES = ("AK", "QS")
NUM_VIEWS = 5


@dataclasses.dataclass(frozen=True)
class Spec:
    categories: tuple[str, ...] = ("audiojack", "mint")
    train_samples: int = 10
    test_ok: int = 2
    test_ng: int = 3
    hw: tuple[int, int] = (32, 40)
    resolution: str = "256"
    nested: bool = False


def _item(category: str, cls: str, image: str, mask: str | None) -> dict:
    return {"category": category, "anomaly_class": cls, "image_path": image, "mask_path": mask}


def _texture(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    f = rng.uniform(2, 6, 3)
    base = np.stack([np.sin(2 * np.pi * (f[c] * xx + c * yy)) for c in range(3)], -1)
    return 90 + 50 * base


def _write_category(out: str, category: str, spec: Spec, rng: np.random.Generator) -> dict:
    """Writes one category's images and masks; returns its items per sample."""
    base = os.path.join(out, f"realiad_{spec.resolution}", category)
    texture = _texture(rng, spec.hw)
    samples: dict[str, list] = {"ok": [], "ng": []}

    def image(rel: str, defect_box=None) -> None:
        img = texture + rng.normal(0, 6, texture.shape)
        if defect_box is not None:
            y, x, s = defect_box
            img[y : y + s, x : x + s] = 250
        path = os.path.join(base, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=95)

    for s in range(1, num_ok(spec) + 1):
        views = []
        for c in range(1, NUM_VIEWS + 1):
            rel = f"OK/S{s:04d}/{category}_{s:04d}_OK_C{c}_2023102114{s:02d}{c:02d}.jpg"
            image(rel)
            views.append(_item(category, "OK", rel, None))
        samples["ok"].append(views)
    per_code: dict[str, int] = {}
    for n in range(num_ng(spec)):
        code = CODES[n % len(CODES)]
        s = per_code[code] = per_code.get(code, 0) + 1  # numbers restart under each NG/<code>/
        views = []
        for c in range(1, NUM_VIEWS + 1):
            stem = f"{category}_{s:04d}_NG_{code}_C{c}_2023102115{n:02d}{c:02d}"
            rel = f"NG/{code}/S{s:04d}/{stem}.jpg"
            if c == NUM_VIEWS:  # the defect is not visible from this view: stored as OK
                image(rel)
                views.append(_item(category, "OK", rel, None))
                continue
            h, w = spec.hw
            size = max(3, min(h, w) // 5)
            box = (int(rng.integers(0, h - size)), int(rng.integers(0, w - size)), size)
            image(rel, box)
            mask = np.zeros(spec.hw, np.uint8)
            mask[box[0] : box[0] + size, box[1] : box[1] + size] = 255
            mask_rel = f"NG/{code}/S{s:04d}/{stem}.png"
            Image.fromarray(mask).save(os.path.join(base, mask_rel))
            views.append(_item(category, code, rel, mask_rel))
        samples["ng"].append(views)
    return samples


def fuiad_ratio(split: str) -> float:
    return float(split.split("_")[1])


def train_ng(spec: Spec, split: str) -> int:
    """Defective samples in a FUIAD split's training list: the ratio of `train_samples`."""
    return round(fuiad_ratio(split) * spec.train_samples)


def num_ok(spec: Spec) -> int:
    return spec.train_samples + spec.test_ok


def num_ng(spec: Spec) -> int:
    return spec.test_ng + max(train_ng(spec, s) for s in realiad.FUIAD_SPLITS)


def lists(samples: dict, spec: Spec) -> dict[str, tuple[list, list]]:
    """split -> (train items, test items) for every split of `realiad.SPLITS`."""
    flat = lambda ss: [v for s in ss for v in s]
    ok, ng = samples["ok"], samples["ng"]
    test = flat(ok[: spec.test_ok] + ng[: spec.test_ng])  # the same test set in every split
    pool_ok, pool_ng = ok[spec.test_ok :], ng[spec.test_ng :]
    out = {"standard": (flat(pool_ok[: spec.train_samples]), test)}
    out["single_view"] = tuple(
        [v for v in items if "_C1_" in v["image_path"]] for items in out["standard"]
    )
    for split in realiad.FUIAD_SPLITS:
        k = train_ng(spec, split)
        out[split] = (flat(pool_ok[: spec.train_samples - k] + pool_ng[:k]), test)
    return out


def write(out: str, spec: Spec | None = None, seed: int = 0) -> str:
    """Writes the tree under `out` (images, masks, JSON files of every split); returns `out`."""
    spec = spec or Spec()
    rng = np.random.default_rng(seed)
    for category in spec.categories:
        samples = _write_category(out, category, spec, rng)
        for split, (train, test) in lists(samples, spec).items():
            folder = realiad.SPLITS[split]
            if spec.nested and split != "standard":
                folder = os.path.join(realiad.SPLITS["standard"], folder)
            os.makedirs(os.path.join(out, folder), exist_ok=True)
            doc = {
                "meta": {"prefix": f"{category}/", "normal_class": "OK"},
                "train": train,
                "test": test,
            }
            with open(os.path.join(out, folder, f"{category}.json"), "w") as f:
                json.dump(doc, f, indent=1)
    return out


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    root = write(f.out, Spec(nested=f.nested), f.seed)
    print(f"wrote a miniature Real-IAD tree to {root}; run it with --config.dataset.root={root}")


def define_flags() -> None:
    """The CLI's flags, defined only when run as a program: importing this module (the tests do)
    must not claim flag names such as --out that other entry points define."""
    flags.DEFINE_string("out", None, "Folder to write the tree into (the dataset root).")
    flags.DEFINE_bool("nested", False, "Split folders inside realiad_jsons/.")
    flags.DEFINE_integer("seed", 0, "Seed of the synthetic images.")
    flags.mark_flag_as_required("out")


if __name__ == "__main__":
    define_flags()
    app.run(main)
