"""TFDS builders for the paper datasets (METHOD.md sections 2 and 7): `mvtec_ad`, `visa`, `btad`,
`real_iad`.

Each reads the extracted official archive from the manual dir with this package's own reader, so
the records (and every validation) are the same as on the direct path, and writes array_record
files. One builder config per category and resize, named CATEGORY-RESIZE (e.g. `bottle-256`,
`01-512`), with the reader's options in between where it has some (Real-IAD's resolution and split:
`audiojack-256-fuiad_0.2-224`, one store per split); `BUILDER_CONFIGS` lists the papers' resize for
every category and `config_for` makes any other.

What is stored is the expensive half of the preprocessing, `preprocess.decode_resized`: the image
decoded and its shorter side resized, uncropped, as raw uint8 with its shape, and the binarised mask
at the same size (zlib, as masks are mostly zeros). Raw tensors rather than `tfds.features.Image`
keep reading free of TensorFlow and of any image decoder; the crop and the overlap-mode augmentation
run on read (`preprocess.finish`), so the crop can change without preparing again.

`fingerprint` names what a store was made from: every file's relative path, size and mtime, the
records' labels and masks, the resize, the source of the preprocessing functions and Pillow's
version. The store keeps it in its metadata; `prepared.py` prepares again when it differs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import inspect
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import PIL
import tensorflow_datasets as tfds

from softpatch_jax.data import preprocess, registry
from softpatch_jax.data.records import CategorySplits, Record

# Bump when the stored features or their meaning change (the fingerprint includes it).
STORE_FORMAT = 1
# The functions whose output is stored: editing any of them invalidates every store.
_STORED_CODE = (
    preprocess._open,
    preprocess.to_rgb_uint8,
    preprocess.mask_to_bool,
    preprocess.resize_shorter,
    preprocess.decode_resized,
)


@dataclasses.dataclass(eq=False)
class CategoryConfig(tfds.core.BuilderConfig):
    """One category at one resize (shorter side, METHOD.md section 2)."""

    category: str = ""
    resize: int = 256
    options: tuple[tuple[str, str], ...] = ()  # the reader's options, sorted (key, value) pairs


def option_items(options: dict | tuple | None) -> tuple[tuple[str, str], ...]:
    """Reader options (a dict, or already pairs) -> sorted (key, value) pairs, hashable."""
    return tuple(sorted(dict(options or ()).items()))


def config_name(category: str, resize: int, options: tuple = ()) -> str:
    return "-".join([category, *(str(v) for _, v in option_items(options)), str(resize)])


def relpath(path: str, root: str) -> str:
    """A file's key in a store: its path relative to the dataset root, with '/' separators."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return rel.replace(os.sep, "/")


def _stat(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _source(fn: Callable) -> str:
    try:
        return inspect.getsource(fn)
    except OSError:  # installed without sources: the bytecode still changes with the code
        return fn.__code__.co_code.hex()


def fingerprint(builder_name: str, root: str, splits: CategorySplits, resize: int) -> str:
    """sha256 of everything a store's content depends on (see the module docstring)."""
    rows = []
    for split, records in (("train", splits.train), ("test", splits.test)):
        for r in records:
            mask = [relpath(r.mask_path, root), *_stat(r.mask_path)] if r.mask_path else []
            rows.append([split, relpath(r.path, root), r.label, r.defect, *_stat(r.path), *mask])
    code = "\n".join(_source(f) for f in _STORED_CODE)
    blob = {
        "store_format": STORE_FORMAT,
        "builder": builder_name,
        "category": splits.category,
        "resize": resize,
        "code": hashlib.sha256(code.encode()).hexdigest(),
        "pillow": PIL.__version__,
        "records": rows,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="bytes"),
            "mask": tfds.features.Tensor(shape=(None, None), dtype=np.bool_, encoding="zlib"),
            "path": tfds.features.Text(),
            "mask_path": tfds.features.Text(),
            "label": tfds.features.Scalar(dtype=np.int64),
            "defect": tfds.features.Text(),
        }
    )


class _AnomalyDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The shared builder; subclasses name the dataset, its reader and its categories."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Images and masks with the shorter side resized, uncropped, as raw uint8.",
    }
    LAYOUT: ClassVar[str] = ""
    CATEGORIES: ClassVar[tuple[str, ...]] = ()
    READER: ClassVar[Callable[[str, str], CategorySplits]]
    HOMEPAGE: ClassVar[str] = ""
    # Images decoded in parallel during preparation (PIL releases the GIL while decoding).
    NUM_THREADS: ClassVar[int] = min(8, os.cpu_count() or 1)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        # TFDS looks for a checksums file beside the builder's module through importlib_resources,
        # which TFDS 4.9 imports without declaring it; these builders download nothing.
        return None

    @classmethod
    def config_for(cls, category: str, resize: int, options: tuple = ()) -> CategoryConfig:
        """The listed config for (category, resize, options) if there is one, else a new one."""
        name = config_name(category, resize, options)
        for c in cls.BUILDER_CONFIGS:
            if c.name == name:
                return c
        return CategoryConfig(
            name=name, category=category, resize=resize, options=option_items(options)
        )

    @classmethod
    def read_category(cls, root: str, category: str, options: tuple = ()) -> CategorySplits:
        return cls.READER(root, category, **dict(options))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip(),
            features=_features(),
            homepage=self.HOMEPAGE,
            # Integer keys in reader order, so a split's index i is the reader's record i.
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        root = os.fspath(dl_manager.manual_dir)
        cfg = self.builder_config
        splits = self.read_category(root, cfg.category, cfg.options)
        # Taken before decoding: a file edited during preparation leaves a stale fingerprint, so
        # the next run prepares again rather than trusting a mixed store.
        self.info.metadata.update(
            {
                "fingerprint": fingerprint(self.name, root, splits, cfg.resize),
                "layout": self.LAYOUT,
                "category": cfg.category,
                "resize": cfg.resize,
                "options": dict(cfg.options),
                "root": os.path.abspath(root),
                "index": {
                    "train": [relpath(r.path, root) for r in splits.train],
                    "test": [relpath(r.path, root) for r in splits.test],
                },
            }
        )
        return {
            "train": self._generate_examples(splits.train, root, cfg.resize),
            "test": self._generate_examples(splits.test, root, cfg.resize),
        }

    def _generate_examples(
        self, records: Sequence[Record], root: str, resize: int
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        with concurrent.futures.ThreadPoolExecutor(self.NUM_THREADS) as pool:
            decoded = pool.map(lambda r: preprocess.decode_resized(r, resize), records)
            for i, (rec, (img, mask)) in enumerate(zip(records, decoded)):
                yield (
                    i,
                    {
                        "image": img,
                        "mask": mask,
                        "path": relpath(rec.path, root),
                        "mask_path": relpath(rec.mask_path, root) if rec.mask_path else "",
                        "label": rec.label,
                        "defect": rec.defect,
                    },
                )


def _configs(categories: Sequence[str], resize: int) -> list[CategoryConfig]:
    return [
        CategoryConfig(name=config_name(c, resize), category=c, resize=resize) for c in categories
    ]


def _builder(layout: registry.Layout) -> type[_AnomalyDataset]:
    """The builder class a layout declares (`registry.TfdsBuilder`), named as it says."""
    hook = layout.tfds
    attrs = {
        "__doc__": hook.description,
        "__module__": __name__,
        "LAYOUT": layout.name,
        "CATEGORIES": layout.categories,
        "BUILDER_CONFIGS": _configs(layout.categories, hook.resize) if hook.resize else [],
        "READER": staticmethod(layout.read_category),
        "HOMEPAGE": hook.homepage,
        "MANUAL_DOWNLOAD_INSTRUCTIONS": hook.instructions,
    }
    return type(hook.class_name, (_AnomalyDataset,), attrs, skip_registration=True)


# layout name (config.dataset.layout) -> builder, for every registered layout that declares one
BUILDERS: dict[str, type[_AnomalyDataset]] = {
    name: _builder(layout) for name, layout in registry.LAYOUTS.items() if layout.tfds is not None
}
