"""Real-IAD as its official evaluator (ADEval 1.1.0) computes it (softpatch_jax/official_eval.py,
the binned AUPR of metrics.py): a run on a miniature Real-IAD tree, its ADEval pickle, and every
AUPR of its results row against ADEval's procedure restated in numpy (tests/adeval_oracle.py);
masks binarised at > 127; the two FUIAD fractions."""

import os
import pickle

import numpy as np
import pytest
from adeval_oracle import evaluate_pickle, inter_linear
from fake_trees import make_realiad
from PIL import Image

from softpatch_jax import official_eval
from softpatch_jax.data import preprocess, realiad
from softpatch_jax.experiment import driver


def _mark_nothing(root: str) -> tuple[str, str]:
    """Two listed test masks of mint that mark no pixel by ADEval's rule: one all zero, one faint
    (127 where the defect is). Returns their image paths."""
    std = realiad.read_category(root, "mint", "standard", "256")
    ng = [r for r in std.test if r.label == 1]
    zero, faint = ng[0], ng[-1]
    mask = np.asarray(Image.open(faint.mask_path))
    Image.fromarray(np.zeros_like(mask)).save(zero.mask_path)
    Image.fromarray(np.where(mask > 0, 127, 0).astype(np.uint8)).save(faint.mask_path)
    return zero.path, faint.path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One category of fuiad_0.4, random-init resnet_tiny, images 32x40 resized to 24x30 and
    centre-cropped to 20x20 (so maps are upsampled and the crop leaves margins), with the ADEval
    pickle written."""
    from configs import realiad as realiad_config

    tmp = tmp_path_factory.mktemp("official")
    root = make_realiad(str(tmp / "root"), np.random.default_rng(0))
    zero, faint = _mark_nothing(root)
    c = realiad_config.get_config()
    c.dataset.update(root=root, categories="mint", split="fuiad_0.4", prepared=False)
    c.dataset.update(resize=24, crop=20, batch_size=8)
    c.backbone.update(arch="resnet_tiny", allow_random_init=True)
    c.methods = "patchcore"
    c.eval.adeval_pickle = True
    assert c.eval.pixel_resolution == "original"  # Real-IAD's default
    (row,) = driver.run(c, str(tmp / "run"))
    return {"root": root, "workdir": str(tmp / "run"), "row": row, "zero": zero, "faint": faint}


def _pickle(run) -> dict:
    with open(official_eval.pickle_path(run["workdir"], run["row"]["cell_id"]), "rb") as f:
        return pickle.load(f)


def test_pickle_is_adevals_input_format(run):
    doc = _pickle(run)
    test = realiad.read_category(run["root"], "mint", "fuiad_0.4", "256").test
    assert sorted(doc) == sorted(r.path for r in test)
    masks = {r.path: r.mask_path for r in test}
    for path, (amap, score, mask) in doc.items():
        assert isinstance(amap, np.ndarray) and amap.dtype == np.float32 and amap.shape == (24, 30)
        assert isinstance(score, float) and np.isfinite(score)
        assert mask == masks[path] and (mask is None or os.path.isfile(mask))
        # The crop window holds the model's map; the margins it cut off hold its minimum.
        assert np.all(amap[:, :5] == amap[2:22, 5:25].min())
    assert doc[run["zero"]][2] is None and doc[run["faint"]][2] is None


def test_row_aupr_equals_adevals_binned_definition(run):
    """Sample, image and pixel AUPR of the results row = the numpy restatement of ADEval on the
    pickle (its masks at their own 32x40, > 127; its maps resized by INTER_LINEAR)."""
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    got, row = evaluate_pickle(_pickle(run)), run["row"]
    for ours, theirs in (("sample_aupr", "s_aupr"), ("image_aupr", "i_aupr")):
        np.testing.assert_allclose(row[ours], got[theirs], atol=1e-6, err_msg=ours)
    np.testing.assert_allclose(row["pixel_aupr"], got["p_aupr"], atol=1e-5)
    # The pixels are the same: our exact pixel AUROC over them is scikit-learn's on the oracle's.
    np.testing.assert_allclose(
        row["pixel_auroc"], roc_auc_score(got["p_labels"], got["p_scores"]), atol=1e-5
    )
    assert got["p_labels"].size == 25 * 32 * 40  # every test image at its original size
    # The binned AUPR is not the step AP: both are reported, each under its own name.
    assert row["image_aupr"] != row["image_ap"]


def test_listed_masks_marking_nothing_are_normal_views(run):
    labels = evaluate_pickle(_pickle(run))["i_labels"]
    test = realiad.read_category(run["root"], "mint", "fuiad_0.4", "256").test
    by_path = {r.path: r for r in test}
    for path in (run["zero"], run["faint"]):
        assert by_path[path].label == 0 and by_path[path].mask_path is None
        assert not labels[path]  # ADEval's label too
    assert {p for p, r in by_path.items() if r.label} == {p for p, v in labels.items() if v}
    assert run["row"]["num_test"] == 25 and sum(labels.values()) == 3 * 4 - 2


def test_one_pixel_above_127_is_anomalous(tmp_path):
    root = make_realiad(str(tmp_path / "root"), np.random.default_rng(1))
    std = realiad.read_category(root, "audiojack", "standard", "256")
    rec = next(r for r in std.test if r.label == 1)
    mask = np.zeros_like(np.asarray(Image.open(rec.mask_path)))
    mask[3, 4] = 128
    Image.fromarray(mask).save(rec.mask_path)
    again = {r.path: r for r in realiad.read_category(root, "audiojack", "standard", "256").test}
    assert again[rec.path].label == 1 and again[rec.path].mask_path == rec.mask_path
    gt = official_eval.read_mask(rec.mask_path, rec.path)
    assert gt.sum() == 1 and gt[3, 4]


@pytest.mark.parametrize("split,samples,images", [
    ("fuiad_0.1", 0.1, 4 / 50), ("fuiad_0.2", 0.2, 8 / 50), ("fuiad_0.4", 0.4, 16 / 50),
])  # fmt: skip
def test_fuiad_fractions_of_samples_and_of_images(run, split, samples, images):
    """The split's name counts defective samples (all their views in training); the anomalous
    images are fewer, since each defective sample has one view that does not show the defect."""
    s = realiad.read_category(run["root"], "mint", split, "256")
    assert s.train_anomalous_samples / s.train_samples == samples
    assert len(s.train_anomalous) / len(s.train) == pytest.approx(images)
    if split == "fuiad_0.4":
        row = run["row"]
        assert row["train_anomalous_sample_fraction"] == samples
        assert row["train_anomalous_fraction"] == round(images, 6)


def test_upsampling_is_opencvs_inter_linear():
    rng = np.random.default_rng(0)
    frames = [rng.random((h, w)).astype(np.float32) for h, w in ((6, 8), (6, 8), (5, 9), (7, 7))]
    sizes = [(13, 17), (13, 17), (10, 27), (4, 5)]  # up, up, up by 2 and 3, down
    for f, size, got in zip(frames, sizes, official_eval.upsample(frames, sizes)):
        assert got.shape == size
        np.testing.assert_allclose(got, inter_linear(f, *size), atol=1e-6)


def test_frames_follow_the_resize_and_crop_geometry():
    maps = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4) + 1
    sizes = [(10, 15), (16, 8)]  # landscape and portrait originals; shorter side resized to 6
    f0, f1 = official_eval.frame_maps(maps, sizes, resize=6)
    assert f0.shape == (6, 9) and f1.shape == (12, 6)
    image = np.zeros((10, 15, 3), np.uint8)
    assert preprocess.resize_shorter(image, 6).shape[:2] == f0.shape
    np.testing.assert_array_equal(f0[1:5, 2:6], maps[0])  # torchvision's rounded offsets
    assert (f0 == maps[0].min()).sum() == 6 * 9 - 16 + 1
    np.testing.assert_array_equal(f1[4:8, 1:5], maps[1])


def test_pixel_resolution_is_checked():
    assert official_eval.check_resolution("original") == "original"
    with pytest.raises(
        ValueError, match=r"eval.pixel_resolution 'full'; valid: \['crop', 'original'\]"
    ):
        official_eval.check_resolution("full")
