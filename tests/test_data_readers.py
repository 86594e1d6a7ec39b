"""The MVTec, VisA and BTAD readers against miniature official trees (METHOD.md section 7)."""

import os

import numpy as np
import pytest
from fake_trees import make_btad, make_mvtec, make_visa

from softpatch_jax import data
from softpatch_jax.data import btad, mvtec, visa
from tests.conftest import dataset_options

READERS = {"mvtec": (make_mvtec, mvtec), "visa": (make_visa, visa), "btad": (make_btad, btad)}


def _tree(layout, tmp_path, seed=0):
    make, module = READERS[layout]
    return make(str(tmp_path / layout), np.random.default_rng(seed)), module


def _expected(tree, cat, split):
    return sorted(
        (os.path.join(tree.root, i.rel), i.label, i.defect,
         os.path.join(tree.root, i.mask_rel) if i.mask_rel else None)
        for i in tree.split(cat, split)
    )  # fmt: skip


@pytest.mark.parametrize("layout", sorted(READERS))
def test_reader_matches_what_was_written(layout, tmp_path):
    tree, module = _tree(layout, tmp_path)
    assert module.list_categories(tree.root) == sorted(tree.items)
    for cat in tree.items:
        splits = module.read_category(tree.root, cat)
        assert splits.category == cat
        for split, records in (("train", splits.train), ("test", splits.test)):
            got = sorted((r.path, r.label, r.defect, r.mask_path) for r in records)
            assert got == _expected(tree, cat, split)
            assert not any(r.injected or r.augment for r in records)


def test_counts_per_split_and_label(tmp_path):
    tree, _ = _tree("mvtec", tmp_path)
    s = mvtec.read_category(tree.root, "widget")
    # make_mvtec's defaults: 6 train, 3 good test images, dent x2 + scratch x3.
    assert len(s.train) == 6
    assert sum(r.label == 0 for r in s.test) == 3
    assert sum(r.label == 1 for r in s.test) == 5
    assert sorted({r.defect for r in s.test}) == ["dent", "good", "scratch"]

    tree, _ = _tree("visa", tmp_path)
    s = visa.read_category(tree.root, "pcb1")
    assert (len(s.train), sum(r.label == 0 for r in s.test), sum(r.label for r in s.test)) == (
        6,
        3,
        4,
    )

    tree, _ = _tree("btad", tmp_path)
    for cat in ("01", "02", "03"):
        s = btad.read_category(tree.root, cat)
        assert (len(s.train), sum(r.label == 0 for r in s.test), sum(r.label for r in s.test)) == (
            5,
            2,
            3,
        )


def test_btad_pairs_masks_across_extensions(tmp_path):
    tree, _ = _tree("btad", tmp_path)
    exts = {}
    for cat in ("01", "02", "03"):
        for r in btad.read_category(tree.root, cat).test:
            if r.label:
                assert (
                    os.path.splitext(os.path.basename(r.mask_path))[0]
                    == os.path.splitext(os.path.basename(r.path))[0]
                )
                exts[cat] = (os.path.splitext(r.path)[1], os.path.splitext(r.mask_path)[1])
    assert exts == {"01": (".bmp", ".png"), "02": (".png", ".png"), "03": (".bmp", ".bmp")}


def test_visa_order_does_not_depend_on_csv_row_order(tmp_path):
    a = make_visa(str(tmp_path / "a"), np.random.default_rng(1))
    b = make_visa(str(tmp_path / "b"), np.random.default_rng(1))
    lines = open(os.path.join(b.root, "split_csv", "1cls.csv"), encoding="utf-8-sig").readlines()
    with open(os.path.join(b.root, "split_csv", "1cls.csv"), "w") as f:
        f.writelines([lines[0], *reversed(lines[1:])])
    sa, sb = visa.read_category(a.root, "candle"), visa.read_category(b.root, "candle")
    rel = lambda s, root: [os.path.relpath(r.path, root) for r in s.train + s.test]
    assert rel(sa, a.root) == rel(sb, b.root)
    assert rel(sa, a.root) == sorted(rel(sa, a.root)[:6]) + sorted(rel(sa, a.root)[6:])


def _cfg(layout, root, categories="all"):
    return dataset_options(
        name=layout, layout=layout, root=root, categories=categories, resize=16, crop=12,
        batch_size=4
    )  # fmt: skip


@pytest.mark.parametrize("layout", sorted(READERS))
def test_config_entry_points(layout, tmp_path):
    tree, _ = _tree(layout, tmp_path)
    assert data.categories(_cfg(layout, tree.root)) == sorted(tree.items)
    first = sorted(tree.items)[0]
    assert data.categories(_cfg(layout, tree.root, f" {first} ")) == [first]
    with pytest.raises(ValueError, match="nope"):
        data.categories(_cfg(layout, tree.root, f"{first},nope"))
    splits = data.read(_cfg(layout, tree.root), first)
    images, masks = data.loader(_cfg(layout, tree.root), first)(splits.test)
    assert images.shape == (len(splits.test), 12, 12, 3) and images.dtype == np.uint8
    assert masks.shape == (len(splits.test), 12, 12) and masks.dtype == bool
    labels = np.array([r.label for r in splits.test])
    assert not masks[labels == 0].any()
