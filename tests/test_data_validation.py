"""Every bad-input case fails with an error naming the file or value and what was expected."""

import os
import re
import shutil

import numpy as np
import pytest
from fake_trees import make_btad, make_mvtec, make_visa
from PIL import Image

from softpatch_jax import data
from softpatch_jax.data import btad, mvtec, visa
from tests.conftest import dataset_options

MAKERS = {"mvtec": (make_mvtec, mvtec), "visa": (make_visa, visa), "btad": (make_btad, btad)}


def _tree(layout, tmp_path):
    make, module = MAKERS[layout]
    return make(str(tmp_path / layout), np.random.default_rng(0)), module


@pytest.mark.parametrize("layout", sorted(MAKERS))
def test_missing_root(layout, tmp_path):
    _, module = MAKERS[layout]
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing!r} does not exist")):
        module.list_categories(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing!r} does not exist")):
        module.read_category(missing, "x")
    cfg = dataset_options(layout=layout, root="", categories="all")
    with pytest.raises(ValueError, match=r"config.dataset.root is empty"):
        data.categories(cfg)
    with pytest.raises(ValueError, match=r"config.dataset.root is empty"):
        data.read(cfg, "x")


def test_unknown_layout():
    cfg = dataset_options(layout="mvtek", root="/x", categories="all")
    with pytest.raises(
        ValueError, match=r"unknown dataset layout 'mvtek'; valid: \['btad', 'demo'"
    ):
        data.categories(cfg)


@pytest.mark.parametrize("layout", sorted(MAKERS))
def test_missing_category_lists_the_others(layout, tmp_path):
    tree, module = _tree(layout, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"category 'nope' not found .* have: \[") as e:
        module.read_category(tree.root, "nope")
    assert all(c in str(e.value) for c in tree.items)


# (reader's layout, tree's layout): the error names what was expected and what the tree looks like.
@pytest.mark.parametrize(
    "reader, tree_layout, expected",
    [("visa", "mvtec", "split_csv/1cls.csv"), ("visa", "btad", "split_csv/1cls.csv"),
     ("mvtec", "btad", "train/good"), ("mvtec", "visa", "train/good"),
     ("btad", "mvtec", "train/ok"), ("btad", "visa", "train/ok")],
)  # fmt: skip
def test_wrong_layout_says_what_was_expected(reader, tree_layout, expected, tmp_path):
    tree, _ = _tree(tree_layout, tmp_path)
    module = MAKERS[reader][1]
    hint = f"layout={tree_layout}"
    with pytest.raises(FileNotFoundError, match=re.escape(expected)) as e:
        module.list_categories(tree.root)
    assert hint in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        module.read_category(tree.root, sorted(tree.items)[0])
    assert hint in str(e.value) and f"layout {reader!r} expects" in str(e.value)


def test_root_pointing_at_a_category_folder(tmp_path):
    tree, _ = _tree("mvtec", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"single category folder"):
        mvtec.list_categories(os.path.join(tree.root, "widget"))


@pytest.mark.parametrize("layout", sorted(MAKERS))
def test_defect_image_without_mask(layout, tmp_path):
    tree, module = _tree(layout, tmp_path)
    cat = sorted(tree.items)[0]
    item = next(i for i in tree.items[cat] if i.label)
    os.remove(os.path.join(tree.root, item.mask_rel))
    with pytest.raises(FileNotFoundError, match=r"has no mask") as e:
        module.read_category(tree.root, cat)
    assert os.path.join(tree.root, item.rel) in str(e.value)


def _rewrite_csv(tree, edit):
    path = os.path.join(tree.root, "split_csv", "1cls.csv")
    with open(path, encoding="utf-8-sig") as f:
        lines = f.read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join(edit(lines)) + "\n")


def test_visa_row_errors_name_the_line(tmp_path):
    tree, _ = _tree("visa", tmp_path)
    bad = next(i for i in tree.items["candle"] if i.label)
    drop_mask = lambda ls: [x.replace(f",{bad.mask_rel}", ",") for x in ls]
    _rewrite_csv(tree, drop_mask)
    with pytest.raises(FileNotFoundError, match=r"1cls.csv' line \d+: defect image .* has no mask"):
        visa.read_category(tree.root, "candle")

    tree, _ = _tree("visa", tmp_path / "b")
    _rewrite_csv(tree, lambda ls: [x.replace(",normal,", ",good,", 1) for x in ls])
    with pytest.raises(ValueError, match=r"line \d+: label 'good', expected 'normal' or 'anomaly'"):
        visa.read_category(tree.root, "candle")

    tree, _ = _tree("visa", tmp_path / "c")
    _rewrite_csv(tree, lambda ls: ["object,split,image,mask", *ls[1:]])
    with pytest.raises(ValueError, match=r"lacks columns \['label'\]"):
        visa.list_categories(tree.root)

    tree, _ = _tree("visa", tmp_path / "d")
    os.remove(os.path.join(tree.root, tree.items["pcb1"][0].rel))
    with pytest.raises(FileNotFoundError, match=r"lists image .*0000.JPG', which does not exist"):
        visa.read_category(tree.root, "pcb1")


def test_empty_splits(tmp_path):
    tree, _ = _tree("mvtec", tmp_path)
    train = os.path.join(tree.root, "widget", "train", "good")
    shutil.rmtree(train)
    os.makedirs(train)
    with pytest.raises(ValueError, match=re.escape(f"empty training split: no image in {train!r}")):
        mvtec.read_category(tree.root, "widget")

    tree, _ = _tree("btad", tmp_path)
    for d in ("ok", "ko"):
        shutil.rmtree(os.path.join(tree.root, "02", "test", d))
        os.makedirs(os.path.join(tree.root, "02", "test", d))
        if d == "ok":
            with pytest.raises(ValueError, match=r"category '02'.*test split has no normal images"):
                btad.read_category(tree.root, "02")
    with pytest.raises(ValueError, match=r"empty test split: no image in .*02/test/ok' or"):
        btad.read_category(tree.root, "02")

    tree, _ = _tree("visa", tmp_path)
    _rewrite_csv(tree, lambda ls: [x for x in ls if not x.startswith("pcb1,test,anomaly")])
    with pytest.raises(ValueError, match=r"category 'pcb1'.*test split has no anomalous images"):
        visa.read_category(tree.root, "pcb1")
    _rewrite_csv(tree, lambda ls: [x for x in ls if not x.startswith("pcb1,train")])
    with pytest.raises(ValueError, match=r"empty training split: .* no train rows for 'pcb1'"):
        visa.read_category(tree.root, "pcb1")


def test_mask_size_mismatch_is_caught_on_loading(tmp_path):
    tree, _ = _tree("btad", tmp_path)
    rec = next(r for r in btad.read_category(tree.root, "03").test if r.label)
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(rec.mask_path)
    load = data.loader(
        dataset_options(layout="btad", root=tree.root, resize=16, crop=16),
        "03",
    )
    with pytest.raises(ValueError, match=re.escape(f"mask {rec.mask_path!r} is 7x5 but its image")):
        load([rec])
