"""The TFDS prepared store (tfds_builders.py, prepared.py): round trip equal to decoding the files,
reuse, invalidation, interrupted preparation, and no TensorFlow needed."""

import dataclasses
import os
import re
import sys

import numpy as np
import pytest
from fake_trees import make_btad, make_mvtec, make_visa
from PIL import Image

from softpatch_jax import data
from softpatch_jax.data import noise, prepared, preprocess
from softpatch_jax.data.records import Augment
from tests.conftest import dataset_options

MAKERS = {"mvtec": make_mvtec, "visa": make_visa, "btad": make_btad}
TF_BEFORE = "tensorflow" in sys.modules


def _cfg(layout, root, data_dir, prepared_=True, resize=16, crop=12):
    return dataset_options(
        name=layout, layout=layout, root=root, categories="all", resize=resize, crop=crop,
        batch_size=4, prepared=prepared_, data_dir=str(data_dir)
    )  # fmt: skip


@pytest.mark.parametrize("layout", sorted(MAKERS))
def test_round_trip_equals_direct_decoding(layout, tmp_path):
    tree = MAKERS[layout](str(tmp_path / "src"), np.random.default_rng(0))
    for cat in sorted(tree.items):
        cfg = _cfg(layout, tree.root, tmp_path / "tfds")
        splits = data.read(cfg, cat)
        # Overlap-mode copies exercise the augmentation applied after reading.
        noisy = noise.inject(splits, noise.NoiseSpec(0.4, overlap=True), np.random.default_rng(3))
        assert any(r.augment for r in noisy.train)
        load = data.loader(cfg, cat)
        for records in (noisy.train, noisy.test):
            got = load(records)
            want = preprocess.load_records(records, resize=16, crop=12)
            for g, w in zip(got, want):
                assert g.shape == w.shape and g.dtype == w.dtype
                np.testing.assert_array_equal(g, w)
        path = prepared.store_path(layout, cat, 16, str(tmp_path / "tfds"))
        assert os.path.isfile(os.path.join(path, "metadata.json"))
    if not TF_BEFORE:
        assert "tensorflow" not in sys.modules


def test_second_read_reuses_the_store(tmp_path, monkeypatch):
    tree = make_mvtec(str(tmp_path / "src"), np.random.default_rng(0))
    d = str(tmp_path / "tfds")
    prepared.ensure("mvtec", tree.root, "widget", 16, d)
    assert prepared.is_fresh("mvtec", tree.root, "widget", 16, d)

    def fail(*args):
        raise AssertionError("prepared again")

    monkeypatch.setattr(prepared, "_prepare_locked", fail)
    store = prepared.ensure("mvtec", tree.root, "widget", 16, d)
    assert len(store) == len(tree.items["widget"])
    # A different resize is a different store; the first stays valid.
    assert not prepared.is_fresh("mvtec", tree.root, "widget", 20, d)
    monkeypatch.undo()
    prepared.ensure("mvtec", tree.root, "widget", 20, d)
    assert prepared.is_fresh("mvtec", tree.root, "widget", 16, d)


def _bump(path, arr):
    """Rewrite a file with new content and a later mtime."""
    Image.fromarray(arr).save(path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_a_changed_added_or_removed_file_invalidates(tmp_path):
    tree = make_mvtec(str(tmp_path / "src"), np.random.default_rng(0), hw=(16, 16))
    d = str(tmp_path / "tfds")
    store = prepared.ensure("mvtec", tree.root, "widget", 16, d)
    rec = data.read(_cfg("mvtec", tree.root, d), "widget").train[0]
    new = np.full((16, 16, 3), 42, np.uint8)
    _bump(rec.path, new)
    assert not prepared.is_fresh("mvtec", tree.root, "widget", 16, d)
    store = prepared.ensure("mvtec", tree.root, "widget", 16, d)
    np.testing.assert_array_equal(store.load_records([rec], 16)[0][0], new)

    extra = os.path.join(tree.root, "widget", "train", "good", "999.png")
    Image.fromarray(new).save(extra)
    assert not prepared.is_fresh("mvtec", tree.root, "widget", 16, d)
    store = prepared.ensure("mvtec", tree.root, "widget", 16, d)
    assert len(store) == len(tree.items["widget"]) + 1
    os.remove(extra)
    assert not prepared.is_fresh("mvtec", tree.root, "widget", 16, d)


def test_interrupted_preparation_is_never_reused(tmp_path, monkeypatch):
    tree = make_btad(str(tmp_path / "src"), np.random.default_rng(0))
    d = str(tmp_path / "tfds")
    path = prepared.store_path("btad", "01", 16, d)
    real = preprocess.decode_resized
    calls = []

    def flaky(record, resize):
        calls.append(record.path)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-way
        return real(record, resize)

    monkeypatch.setattr(preprocess, "decode_resized", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepared.ensure("btad", tree.root, "01", 16, d)
    monkeypatch.undo()
    assert not os.path.exists(path)
    assert not prepared.is_fresh("btad", tree.root, "01", 16, d)
    # A run killed outright leaves TFDS's temp folder; a later run ignores and removes it.
    junk = os.path.join(os.path.dirname(path), "incomplete.ABC123_1.0.0")
    os.makedirs(junk)
    store = prepared.ensure("btad", tree.root, "01", 16, d)
    assert not os.path.exists(junk)
    s = data.read(_cfg("btad", tree.root, d), "01")
    np.testing.assert_array_equal(
        store.load_records(s.test, 12)[0], preprocess.load_records(s.test, 16, 12)[0]
    )
    # A store that lost its metadata (half-copied, say) counts as missing.
    os.remove(os.path.join(path, "metadata.json"))
    assert not prepared.is_fresh("btad", tree.root, "01", 16, d)
    prepared.ensure("btad", tree.root, "01", 16, d)
    assert prepared.is_fresh("btad", tree.root, "01", 16, d)


def test_truncated_image_fails_preparation_naming_it(tmp_path):
    tree = make_visa(str(tmp_path / "src"), np.random.default_rng(0))
    d = str(tmp_path / "tfds")
    bad = os.path.join(tree.root, tree.items["candle"][2].rel)
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 3)
    with pytest.raises(ValueError, match=re.escape(f"cannot read image {bad!r}")):
        prepared.ensure("visa", tree.root, "candle", 16, d)
    assert not os.path.exists(prepared.store_path("visa", "candle", 16, d))
    assert not [n for n in os.listdir(os.path.join(d, "visa")) if n.startswith("candle-16") and
                n != "candle-16.lock" and os.listdir(os.path.join(d, "visa", n))]  # fmt: skip


def test_lookups_are_strict(tmp_path):
    tree = make_mvtec(str(tmp_path / "src"), np.random.default_rng(0))
    d = str(tmp_path / "tfds")
    store = prepared.ensure("mvtec", tree.root, "widget", 16, d)
    other = data.read(_cfg("mvtec", tree.root, d), "gizmo").train[0]
    with pytest.raises(KeyError, match=r"gizmo/train/good/000.png' is not in the prepared store"):
        store.load_records([other], 12)
    bad = next(r for r in data.read(_cfg("mvtec", tree.root, d), "widget").test if r.label)
    wrong = dataclasses.replace(bad, mask_path=os.path.join(tree.root, "elsewhere.png"))
    with pytest.raises(ValueError, match=r"names mask .*elsewhere.png' but the store"):
        store.load_records([wrong], 12)
    # No mask on the record means an all-False mask, as on the direct path.
    no_mask = dataclasses.replace(bad, mask_path=None, augment=Augment(1.0, 0.01, -0.02))
    np.testing.assert_array_equal(
        store.load_records([no_mask], 12)[1], preprocess.load_records([no_mask], 16, 12)[1]
    )
    assert not store.load_records([no_mask], 12)[1].any()
    assert store.load_records([], 12)[0].shape == (0, 12, 12, 3)


def test_layouts_without_a_store_say_so(tmp_path):
    with pytest.raises(ValueError, match=r"no prepared store for layout 'demo'.*\['btad', 'mvtec'"):
        prepared.store_path("demo", "x", 16, str(tmp_path))
