"""The Real-IAD reader (softpatch_jax/data/realiad.py) on a miniature official tree: every split in
both JSON locations, unlabelled FUIAD training items, the config entry points, the prepared store,
and bad input named with its file."""

import json
import os

import numpy as np
import pytest
from fake_trees import make_realiad, realiad_expected

from softpatch_jax import data
from softpatch_jax.data import preprocess, realiad
from softpatch_jax.experiment import driver, plan
from tests.conftest import dataset_options

CATEGORIES = ["audiojack", "mint"]


@pytest.fixture(scope="module", params=[False, True], ids=["beside", "nested"])
def tree(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("realiad") / "root"
    return make_realiad(str(root), np.random.default_rng(0), nested=request.param)


@pytest.fixture
def fresh(tmp_path):
    """A tree of its own, for tests that break it."""
    return make_realiad(str(tmp_path / "root"), np.random.default_rng(1))


@pytest.mark.parametrize("split", list(realiad.SPLITS))
def test_reader_matches_the_files_in_every_split(tree, split):
    assert realiad.list_categories(tree, split, "256") == CATEGORIES
    for cat in CATEGORIES:
        splits = realiad.read_category(tree, cat, split, "256")
        want = realiad_expected(tree, cat, split)
        got_train = [(r.path, r.label, r.defect, r.mask_path) for r in splits.train]
        got_test = [(r.path, r.label, r.defect, r.mask_path) for r in splits.test]
        assert got_train == want["train"]
        assert got_test == want["test"]
        assert list(splits.train_anomalous) == want["train_anomalous"]
        assert not any(r.injected or r.augment for r in splits.train + splits.test)


def test_ng_views_stored_as_ok_are_normal_and_fuiad_noise_is_counted(tree):
    std = realiad.read_category(tree, "mint", "standard", "256")
    hidden = [r for r in std.test if f"{os.sep}NG{os.sep}" in r.path and r.label == 0]
    # 3 NG test samples, each with its C5 view stored as OK (no mask): normal, whatever the folder.
    assert len(hidden) == 3 and all("_C5_" in r.path and r.mask_path is None for r in hidden)
    assert sum(r.label for r in std.test) == 3 * 4
    assert std.train_anomalous == ()
    counts, samples = {}, {}
    for split in realiad.FUIAD_SPLITS:
        s = realiad.read_category(tree, "mint", split, "256")
        # Training items from NG folders are unlabelled: normal records without masks.
        from_ng = [r for r in s.train if f"{os.sep}NG{os.sep}" in r.path]
        assert all(r.label == 0 and r.mask_path is None for r in s.train)
        assert set(s.train_anomalous) <= {r.path for r in from_ng}
        assert len(from_ng) == len(s.train_anomalous) * 5 // 4  # whole samples, C5 not anomalous
        counts[split] = (len(s.train_anomalous), len(s.train))
        samples[split] = (s.train_anomalous_samples, s.train_samples)
        # Nothing of the training list is tested on; the test set is the standard split's.
        assert not {r.path for r in s.train} & {r.path for r in s.test}
        assert s.test == std.test
    # As in the official lists: one training-list size, the ratio counting defective samples.
    assert counts == {
        "fuiad_0.0": (0, 50),
        "fuiad_0.1": (4, 50),
        "fuiad_0.2": (8, 50),
        "fuiad_0.4": (16, 50),
    }
    assert samples == {"fuiad_0.0": (0, 10), "fuiad_0.1": (1, 10), "fuiad_0.2": (2, 10),
                       "fuiad_0.4": (4, 10)}  # fmt: skip


def test_single_view_has_one_view_per_sample(tree):
    s = realiad.read_category(tree, "audiojack", "single_view", "256")
    assert all("_C1_" in r.path for r in s.train + s.test)
    assert len(s.train) == 10 and len(s.test) == 2 + 3


def _cfg(root, split="fuiad_0.2", resolution="256", **kw):
    fields = dict(
        name="real_iad", layout="realiad", root=root, categories="all", resize=32, crop=24,
        batch_size=4, split=split, resolution=resolution, prepared=False, data_dir="",
    )  # fmt: skip
    return dataset_options(**{**fields, **kw})


def test_config_entry_points(tree):
    assert data.categories(_cfg(tree)) == CATEGORIES
    assert data.fixed_noise(_cfg(tree)) and not data.fixed_noise(_cfg(tree, "standard"))
    splits = data.read(_cfg(tree), "mint")
    images, masks = data.loader(_cfg(tree), "mint")(splits.test)
    assert images.shape == (len(splits.test), 24, 24, 3) and images.dtype == np.uint8
    labels = np.array([r.label for r in splits.test])
    assert not masks[labels == 0].any() and masks[labels == 1].any()


def test_prepared_store_equals_direct_decoding_one_store_per_split(fresh, tmp_path):
    from softpatch_jax.data import prepared

    d = tmp_path / "tfds"
    for split in ("fuiad_0.4", "standard"):
        cfg = _cfg(fresh, split, prepared=True, data_dir=str(d))
        splits = data.read(cfg, "audiojack")
        load = data.loader(cfg, "audiojack")
        for records in (splits.train, splits.test):
            for g, w in zip(load(records), preprocess.load_records(records, 32, 24)):
                np.testing.assert_array_equal(g, w)
        opts = data.options(cfg)
        assert prepared.is_fresh("realiad", fresh, "audiojack", 32, str(d), opts)
    names = sorted(os.listdir(d / "real_iad"))
    assert [n for n in names if not n.endswith(".lock")] == [
        "audiojack-256-fuiad_0.4-32",
        "audiojack-256-standard-32",
    ]


def test_fuiad_split_refuses_injected_noise(tree, tmp_path):
    from configs import realiad as realiad_config

    c = realiad_config.get_config()
    c.dataset.root = tree
    c.noise.ratios = "0.0,0.1"
    with pytest.raises(ValueError, match=r"fixes the training set's noise.*noise.ratios=0.0"):
        driver.run(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "config.json")
    c.dataset.split = "standard"  # the standard split has a clean training list: injection allowed
    plan.check_noise(c, [0.1])


def _edit_json(root, category, split, edit):
    path = os.path.join(root, realiad.SPLITS[split], f"{category}.json")
    with open(path) as f:
        doc = json.load(f)
    edit(doc)
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d["test"][3].pop("mask_path"), r"test\[3\] lacks \['mask_path'\]"),
        (lambda d: d["train"][0].update(view="C1"), r"train\[0\] has unknown \['view'\]"),
        (lambda d: d["meta"].pop("normal_class"), r'"meta" lacks \[\'normal_class\'\]'),
        (lambda d: d.update(val=[]), r"the top level has unknown \['val'\]"),
        (lambda d: d.pop("test"), r"the top level lacks \['test'\]"),
    ],
)
def test_json_with_a_missing_or_unknown_key_names_the_file(fresh, edit, message):
    path = _edit_json(fresh, "mint", "fuiad_0.1", edit)
    with pytest.raises(ValueError, match=message) as e:
        realiad.read_category(fresh, "mint", "fuiad_0.1", "256")
    assert path in str(e.value) and "expected exactly" in str(e.value)


def test_listed_but_absent_image_or_mask_names_both_files(fresh):
    s = realiad.read_category(fresh, "mint", "standard", "256")
    bad = next(r for r in s.test if r.label == 1)
    os.remove(bad.mask_path)
    with pytest.raises(FileNotFoundError, match=r"mint\.json.*lists mask .*\.png.*does not exist"):
        realiad.read_category(fresh, "mint", "standard", "256")
    os.remove(s.train[0].path)
    with pytest.raises(FileNotFoundError, match=r"train\[\d+\] lists image .*does not exist"):
        realiad.read_category(fresh, "mint", "standard", "256")


def test_bad_split_resolution_category_or_folder(fresh, tmp_path):
    with pytest.raises(ValueError, match=r"unknown Real-IAD split 'fuiad_0.3'.*fuiad_0.4"):
        realiad.read_category(fresh, "mint", "fuiad_0.3", "256")
    with pytest.raises(ValueError, match=r"unknown Real-IAD resolution '300'.*'raw'"):
        data.categories(_cfg(fresh, resolution="300"))
    with pytest.raises(FileNotFoundError, match=r"realiad_512.*does not exist \(have: \['256'\]\)"):
        realiad.read_category(fresh, "mint", "standard", "512")
    with pytest.raises(FileNotFoundError, match=r"'toy' not found.*\['audiojack', 'mint'\]"):
        realiad.read_category(fresh, "toy", "standard", "256")
    os.rename(
        os.path.join(fresh, "realiad_jsons_fuiad_0.2"), os.path.join(fresh, "moved_fuiad_0.2")
    )
    with pytest.raises(
        FileNotFoundError, match=r"split 'fuiad_0.2': no folder.*realiad_jsons_fuiad_0.2"
    ):
        realiad.list_categories(fresh, "fuiad_0.2", "256")
    with open(os.path.join(fresh, "realiad_jsons_sv", "mint.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=r"cannot read Real-IAD split file .*realiad_jsons_sv"):
        realiad.read_category(fresh, "mint", "single_view", "256")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        realiad.list_categories(str(tmp_path / "nowhere"), "standard", "256")
