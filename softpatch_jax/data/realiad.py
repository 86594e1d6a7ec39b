"""Real-IAD (CVPR 2024; METHOD.md section 7) through its official split files, as its own loader
(Tencent/AnomalyDetection_Real-IAD), ADEval and anomalib read it:

  ROOT/realiad_RES/CATEGORY/OK/S0001/audiojack_0001_OK_C2_<timestamp>.jpg
  ROOT/realiad_RES/CATEGORY/NG/QS/S0027/mint_0027_NG_QS_C2_<timestamp>.{jpg,png}  (image, mask)
  ROOT/FOLDER/CATEGORY.json  or  ROOT/realiad_jsons/FOLDER/CATEGORY.json

RES is 256, 512, 1024 or raw; FOLDER names the split (`SPLITS`): realiad_jsons (standard),
realiad_jsons_sv (single view), realiad_jsons_fuiad_0.0 / _0.1 / _0.2 / _0.4 (fully unsupervised:
the training lists hold anomalies at those ratios). Each JSON is

  {"meta": {"prefix": "audiojack/", "normal_class": "OK"}, "train": [ITEM...], "test": [ITEM...]}

with ITEM exactly {"category", "anomaly_class", "image_path", "mask_path"}; paths are relative to
ROOT/realiad_RES/ + prefix, and mask_path is null for normal items. An item is anomalous, as ADEval
labels it, when its class is not the normal class and its mask has a pixel above
`MASK_THRESHOLD` (127, in grayscale): views of a defective sample in which the defect is not visible
are stored as "OK" with a null mask, and a listed mask that is all zero makes a normal view.

A sample is one physical part, the folder holding its 5 views (OK/S0001/, NG/QS/S0027/). The FUIAD
split names count samples: fuiad_0.1's training list holds 10% defective samples (a sample with any
view of a defect class), all views of each, which is fewer anomalous images than 10%: some views of
a defective sample do not show it. `CategorySplits` carries both counts.

Training items are unlabelled, as the fully unsupervised setting means: they become normal records
(no mask), whatever the JSON says; the paths of those the JSON marks anomalous are kept apart in
`CategorySplits.train_anomalous`, only to report the true noise ratio of the list.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from softpatch_jax.data import validate
from softpatch_jax.data.records import CategorySplits, Record

# ADEval binarises a mask at > 127 (grayscale), a view is anomalous if any pixel passes.
MASK_THRESHOLD = 127

RESOLUTIONS = ("256", "512", "1024", "raw")
# dataset.split -> the folder of its JSON files.
SPLITS = {
    "standard": "realiad_jsons",
    "single_view": "realiad_jsons_sv",
    "fuiad_0.0": "realiad_jsons_fuiad_0.0",
    "fuiad_0.1": "realiad_jsons_fuiad_0.1",
    "fuiad_0.2": "realiad_jsons_fuiad_0.2",
    "fuiad_0.4": "realiad_jsons_fuiad_0.4",
}
FUIAD_SPLITS = tuple(s for s in SPLITS if s.startswith("fuiad_"))
TOP_KEYS = ("meta", "train", "test")
META_KEYS = ("prefix", "normal_class")
META_OPTIONAL = ("pre_transform",)  # present in the official files, unused here
ITEM_KEYS = ("category", "anomaly_class", "image_path", "mask_path")
CATEGORIES = (
    "audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint",
    "mounts", "pcb", "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll", "regulator",
    "rolled_strip_base", "sim_card_set", "switch", "tape", "terminalblock", "toothbrush", "toy",
    "toy_brick", "transistor1", "u_block", "usb", "usb_adaptor", "vcpill", "wooden_beads",
    "woodstick", "zipper",
)  # fmt: skip


def check_options(split: str, resolution: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown Real-IAD split {split!r}; valid: {list(SPLITS)}")
    if str(resolution) not in RESOLUTIONS:
        raise ValueError(f"unknown Real-IAD resolution {resolution!r}; valid: {list(RESOLUTIONS)}")


def _candidates(root: str, split: str) -> list[str]:
    """Where the split's JSON folder may be: beside realiad_RES/, or inside realiad_jsons/."""
    folder = SPLITS[split]
    return [os.path.join(root, folder), os.path.join(root, SPLITS["standard"], folder)]


def split_dir(root: str, split: str) -> str:
    """The folder holding the split's CATEGORY.json files; an error naming both places if absent.

    The standard split's own folder is realiad_jsons/, which in the nested layout also holds the
    other splits' folders; it counts when it holds at least one JSON file.
    """
    validate.require_root(root, "realiad")
    for d in _candidates(root, split):
        if os.path.isdir(d) and any(f.endswith(".json") for f in os.listdir(d)):
            return d
    raise FileNotFoundError(
        f"Real-IAD split {split!r}: no folder of CATEGORY.json files at "
        f"{' or '.join(repr(d) for d in _candidates(root, split))}; layout 'realiad' expects "
        f"{validate.expected('realiad')}"
    )


def image_dir(root: str, resolution: str) -> str:
    path = os.path.join(root, f"realiad_{resolution}")
    if not os.path.isdir(path):
        have = sorted(
            d.removeprefix("realiad_")
            for d in os.listdir(root)
            if d.startswith("realiad_") and d.removeprefix("realiad_") in RESOLUTIONS
        )
        raise FileNotFoundError(
            f"Real-IAD resolution {resolution!r}: {path!r} does not exist (have: {have}); set "
            f"--config.dataset.resolution to one of them"
        )
    return path


def list_categories(root: str, split: str = "standard", resolution: str = "256") -> list[str]:
    """The categories that have a JSON file in the split's folder."""
    check_options(split, resolution)
    d = split_dir(root, split)
    return sorted(f[: -len(".json")] for f in os.listdir(d) if f.endswith(".json"))


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read Real-IAD split file {path!r}: {e}") from e
    _check_keys(doc, TOP_KEYS, (), path, "the top level")
    _check_keys(doc["meta"], META_KEYS, META_OPTIONAL, path, '"meta"')
    for split in ("train", "test"):
        if not isinstance(doc[split], list):
            raise ValueError(f"{path!r}: {split!r} must be a list of items")
        for i, item in enumerate(doc[split]):
            _check_keys(item, ITEM_KEYS, (), path, f"{split}[{i}]")
    return doc


def _check_keys(obj, required, optional, path: str, where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r}: {where} must be an object with keys {list(required)}")
    missing = [k for k in required if k not in obj]
    unknown = sorted(k for k in obj if k not in required and k not in optional)
    if missing or unknown:
        problems = ([f"lacks {missing}"] if missing else []) + (
            [f"has unknown {unknown}"] if unknown else []
        )
        extra = f" (optionally {list(optional)})" if optional else ""
        raise ValueError(
            f"{path!r}: {where} {' and '.join(problems)}; expected exactly {list(required)}{extra}"
        )


def mask_is_anomalous(path: str) -> bool:
    """Whether a listed mask marks any pixel as defective, as ADEval decides it: grayscale (ITU-R
    601 luma for colour masks, as OpenCV's) above `MASK_THRESHOLD`."""
    try:
        with Image.open(path) as img:
            gray = np.asarray(img.convert("L"))
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read mask {path!r}: {e}") from e
    return bool((gray > MASK_THRESHOLD).any())


def read_category(
    root: str, category: str, split: str = "standard", resolution: str = "256"
) -> CategorySplits:
    """Records of one Real-IAD category in one split, every listed file checked to exist; sorted
    by path within a split. Training records are all unlabelled (label 0, no mask)."""
    check_options(split, resolution)
    d = split_dir(root, split)
    path = os.path.join(d, f"{category}.json")
    if not os.path.isfile(path):
        validate.check_category(d, category, list_categories(root, split, resolution))
    doc = _load(path)
    meta = doc["meta"]
    base = os.path.join(image_dir(root, resolution), meta["prefix"])
    normal = meta["normal_class"]
    train, test, noisy = [], [], []
    samples: dict[str, bool] = {}  # training sample folder -> defective
    for split_name, out in (("train", train), ("test", test)):
        for i, item in enumerate(doc[split_name]):
            where = f"{path!r} {split_name}[{i}]"
            image = os.path.join(base, item["image_path"])
            if not os.path.isfile(image):
                raise FileNotFoundError(f"{where} lists image {image!r}, which does not exist")
            mask = None
            if item["mask_path"] is not None:
                mask = os.path.join(base, item["mask_path"])
                if not os.path.isfile(mask):
                    raise FileNotFoundError(f"{where} lists mask {mask!r}, which does not exist")
            defect_class = item["anomaly_class"] != normal
            anomalous = defect_class and mask is not None and mask_is_anomalous(mask)
            if split_name == "train":
                if anomalous:
                    noisy.append(image)
                sample = os.path.dirname(item["image_path"])
                samples[sample] = samples.get(sample, False) or defect_class
                out.append(Record(image, 0, "good"))
            elif anomalous:
                out.append(Record(image, 1, item["anomaly_class"], mask_path=mask))
            else:
                out.append(Record(image, 0, "good"))
    by_path = lambda r: r.path
    splits = CategorySplits(
        category,
        tuple(sorted(train, key=by_path)),
        tuple(sorted(test, key=by_path)),
        train_anomalous=tuple(sorted(noisy)),
        train_samples=len(samples),
        train_anomalous_samples=sum(samples.values()),
    )
    return validate.check_splits(splits, f"in {path!r}")
