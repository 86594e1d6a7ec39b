"""The prepared store: METHOD.md section 2's decoding and resizing done once per category and kept
as a TFDS array_record dataset (`tfds_builders.py`), so that runs and sweeps that read the same
images again skip the image decoder.

`ensure` checks the store against the source (`tfds_builders.fingerprint`) and prepares it when it
is missing or stale; `PreparedStore.load_records` then serves records by their path, the identity
an image keeps through noise injection (METHOD.md section 6), and finishes them with the same
`preprocess.finish` as the direct path, so both give identical arrays.

Safety: TFDS writes into an `incomplete.*` folder and renames it when done, and the fingerprint is
written inside that folder, so an interrupted preparation never looks complete. A file lock per
store keeps concurrent runs (a sweep's workers) from preparing the same store twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from softpatch_jax.data import preprocess, tfds_builders
from softpatch_jax.data.records import Record

_METADATA = "metadata.json"


def default_data_dir() -> str:
    """Where stores go when config.dataset.data_dir is empty: $TFDS_DATA_DIR, as TFDS itself."""
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def _builder_cls(layout: str) -> type[tfds_builders._AnomalyDataset]:
    if layout not in tfds_builders.BUILDERS:
        raise ValueError(
            f"no prepared store for layout {layout!r}: set config.dataset.prepared=False, or use "
            f"one of {sorted(tfds_builders.BUILDERS)}"
        )
    return tfds_builders.BUILDERS[layout]


def _stored_fingerprint(path: epath.Path) -> str | None:
    try:
        with open(os.path.join(path, _METADATA)) as f:
            return json.load(f).get("fingerprint")
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _lock(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def store_path(
    layout: str, category: str, resize: int, data_dir: str = "", options: dict | None = None
) -> str:
    """DATA_DIR/BUILDER/CATEGORY[-OPTIONS]-RESIZE/VERSION, where a store lives."""
    cls = _builder_cls(layout)
    return os.path.join(
        data_dir or default_data_dir(),
        cls.name,
        tfds_builders.config_name(category, resize, tfds_builders.option_items(options)),
        str(cls.VERSION),
    )


def is_fresh(
    layout: str,
    root: str,
    category: str,
    resize: int,
    data_dir: str = "",
    options: dict | None = None,
) -> bool:
    """True when the store exists and was made from the source as it is now."""
    _, want = _source_fingerprint(layout, root, category, resize, options)
    return _stored_fingerprint(store_path(layout, category, resize, data_dir, options)) == want


def _source_fingerprint(
    layout: str, root: str, category: str, resize: int, options: dict | None
) -> tuple[type, str]:
    """(builder class, fingerprint of the source as it is now): the reader validates the source."""
    cls = _builder_cls(layout)
    splits = cls.read_category(root, category, tfds_builders.option_items(options))
    return cls, tfds_builders.fingerprint(cls.name, root, splits, resize)


def _prepare_locked(
    cls: type, root: str, category: str, resize: int, data_dir: str, options: dict | None = None
) -> None:
    path = store_path(cls.LAYOUT, category, resize, data_dir, options)
    config_dir = os.path.dirname(path)
    # A stale store, and leftovers of interrupted runs: only a run holding the lock writes here.
    for name in os.listdir(config_dir) if os.path.isdir(config_dir) else ():
        if name.startswith("incomplete.") or name == os.path.basename(path):
            shutil.rmtree(os.path.join(config_dir, name))
    logging.info("preparing %s/%s from %s into %s", cls.name, category, root, path)
    builder = cls(
        data_dir=data_dir or default_data_dir(),
        config=cls.config_for(category, resize, tfds_builders.option_items(options)),
        file_format="array_record",
    )
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))


def prepare(
    layout: str,
    root: str,
    category: str,
    resize: int,
    data_dir: str = "",
    options: dict | None = None,
) -> str:
    """(Re)builds the store for one category, replacing any existing one; returns its path.

    Raises what the reader raises for a bad source, and ValueError naming the file for an image
    that cannot be decoded; in both cases no store is left behind.
    """
    cls = _builder_cls(layout)
    path = store_path(layout, category, resize, data_dir, options)
    with _lock(os.path.dirname(path) + ".lock"):
        _prepare_locked(cls, root, category, resize, data_dir, options)
    return path


def ensure(
    layout: str,
    root: str,
    category: str,
    resize: int,
    data_dir: str = "",
    options: dict | None = None,
) -> PreparedStore:
    """The store for (layout, category, resize, reader options), prepared first if missing or
    stale. `options` are the reader's own (Real-IAD's split and resolution, `data.options`).

    Validates the source with the layout's reader on every call (a directory walk and a stat per
    file, milliseconds), so a changed, added or removed file is never served from an old store.
    """
    cls, want = _source_fingerprint(layout, root, category, resize, options)
    path = store_path(layout, category, resize, data_dir, options)
    if _stored_fingerprint(path) != want:
        with _lock(os.path.dirname(path) + ".lock"):
            # Another run may have prepared it while this one waited for the lock.
            if _stored_fingerprint(path) != want:
                _prepare_locked(cls, root, category, resize, data_dir, options)
        if _stored_fingerprint(path) != want:
            raise RuntimeError(
                f"the source of {path!r} changed while it was being prepared (files under "
                f"{root!r} were modified); run again"
            )
    return PreparedStore(path, root)


class PreparedStore:
    """Read access to one prepared category; records are looked up by path relative to `root`."""

    def __init__(self, path: str, root: str):
        self.path = path
        self.root = root
        with open(os.path.join(path, _METADATA)) as f:
            meta = json.load(f)
        self.resize: int = meta["resize"]
        builder = tfds.builder_from_directory(path)
        self._sources = {split: builder.as_data_source(split) for split in meta["index"]}
        self._where: dict[str, tuple[str, int]] = {
            rel: (split, i) for split, rels in meta["index"].items() for i, rel in enumerate(rels)
        }

    def __len__(self) -> int:
        return len(self._where)

    def _example(self, record: Record) -> dict:
        rel = tfds_builders.relpath(record.path, self.root)
        if rel not in self._where:
            raise KeyError(
                f"image {record.path!r} is not in the prepared store {self.path!r} (made from "
                f"another root or category?)"
            )
        split, i = self._where[rel]
        ex = self._sources[split][i]
        if ex["path"].decode() != rel:  # the index and the files must agree; cheap to check
            raise RuntimeError(
                f"store {self.path!r} is inconsistent at {split}[{i}]: prepare again"
            )
        return ex

    def load_record(self, record: Record, crop: int) -> tuple[np.ndarray, np.ndarray]:
        """One record -> (image uint8 [crop, crop, 3], mask bool [crop, crop])."""
        ex = self._example(record)
        img = ex["image"]
        if record.mask_path is None:
            mask = np.zeros(img.shape[:2], bool)
        else:
            stored = ex["mask_path"].decode()
            if stored != tfds_builders.relpath(record.mask_path, self.root):
                raise ValueError(
                    f"record {record.path!r} names mask {record.mask_path!r} but the store "
                    f"{self.path!r} holds {stored or 'no mask'!r} for it"
                )
            mask = ex["mask"]
        return preprocess.finish(img, mask, record.augment, crop)

    def load_records(self, records: Sequence[Record], crop: int) -> tuple[np.ndarray, np.ndarray]:
        """Records -> images uint8 [N, crop, crop, 3], masks bool [N, crop, crop]."""
        if not records:
            return np.zeros((0, crop, crop, 3), np.uint8), np.zeros((0, crop, crop), bool)
        pairs = [self.load_record(r, crop) for r in records]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
