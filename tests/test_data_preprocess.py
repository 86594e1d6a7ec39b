"""Decoding, resize / crop, mask binarisation and the overlap augmentation (METHOD.md sections 2
and 6), checked against numpy on lossless images."""

import os
import re

import numpy as np
import pytest
from fake_trees import make_btad, make_mvtec
from PIL import Image

from softpatch_jax.data import btad, mvtec, preprocess
from softpatch_jax.data.records import Augment, Record


def test_no_resample_path_is_a_plain_center_crop(tmp_path):
    tree = make_mvtec(str(tmp_path), np.random.default_rng(0), hw=(20, 24))
    for cat in ("widget", "gizmo"):  # RGB and grayscale
        splits = mvtec.read_category(tree.root, cat)
        records = splits.train + splits.test
        # Shorter side already 20: no resampling; crop 12 starts at (4, 6).
        images, masks = preprocess.load_records(records, resize=20, crop=12)
        for img, mask, rec in zip(images, masks, records):
            px = tree.pixels[os.path.relpath(rec.path, tree.root)]
            rgb = np.repeat(px[..., None], 3, -1) if px.ndim == 2 else px
            np.testing.assert_array_equal(img, rgb[4:16, 6:18])
            if rec.mask_path is None:
                assert not mask.any()
            else:
                m = tree.pixels[os.path.relpath(rec.mask_path, tree.root)]
                np.testing.assert_array_equal(mask, m[4:16, 6:18] > 0)


def test_btad_mixed_extensions_decode_losslessly(tmp_path):
    tree = make_btad(str(tmp_path), np.random.default_rng(0))
    for cat in ("01", "02", "03"):
        recs = [r for r in btad.read_category(tree.root, cat).test if r.label]
        h, w = tree.pixels[os.path.relpath(recs[0].path, tree.root)].shape[:2]
        s = min(h, w)
        images, masks = preprocess.load_records(recs, resize=s, crop=s)
        for img, mask, rec in zip(images, masks, recs):
            px = tree.pixels[os.path.relpath(rec.path, tree.root)]
            m = tree.pixels[os.path.relpath(rec.mask_path, tree.root)] > 0
            top, left = round((h - s) / 2), round((w - s) / 2)
            np.testing.assert_array_equal(img, px[top : top + s, left : left + s])
            np.testing.assert_array_equal(mask, m[top : top + s, left : left + s])


@pytest.mark.parametrize(
    "hw, resize, want",
    [
        ((20, 24), 10, (10, 12)),
        ((24, 20), 10, (12, 10)),
        ((15, 40), 10, (10, 26)),
        ((9, 9), 9, (9, 9)),
    ],
)
def test_resize_shorter_sizes(hw, resize, want):
    # torchvision truncates the longer side: int(10 * 40 / 15) = 26.
    out = preprocess.resize_shorter(np.full((*hw, 3), 77, np.uint8), resize)
    assert out.shape == (*want, 3)
    assert (out == 77).all()  # bilinear keeps a constant image constant
    m = preprocess.resize_shorter(
        (np.arange(hw[0] * hw[1]) % 2).reshape(hw).astype(np.uint8), resize, True
    )
    assert set(np.unique(m)) <= {0, 1}  # nearest never invents values


def test_center_crop_offsets_round_half_to_even():
    a = np.arange(21 * 23).reshape(21, 23)
    # (21 - 12) / 2 = 4.5 -> 4 and (23 - 12) / 2 = 5.5 -> 6, as Python's round (torchvision).
    np.testing.assert_array_equal(preprocess.center_crop(a, 12), a[4:16, 6:18])
    with pytest.raises(ValueError, match="crop 22 is larger"):
        preprocess.center_crop(a, 22)


def test_augment_translation_and_rotation_against_numpy():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess.augment(a, Augment(0.0, 0.0, 0.0)), a)
    # +10% of the width = 2 px to the right, edges replicated.
    cols = np.clip(np.arange(20) - 2, 0, 19)
    np.testing.assert_array_equal(preprocess.augment(a, Augment(0.0, 0.1, 0.0)), a[:, cols])
    rows = np.clip(np.arange(20) + 3, 0, 19)
    np.testing.assert_array_equal(preprocess.augment(a, Augment(0.0, 0.0, -0.15)), a[rows])
    np.testing.assert_array_equal(preprocess.augment(a, Augment(90.0, 0.0, 0.0)), np.rot90(a))
    np.testing.assert_array_equal(preprocess.augment(a, Augment(-90.0, 0.0, 0.0)), np.rot90(a, -1))


def test_finish_moves_the_mask_with_the_image():
    img = np.zeros((16, 16, 3), np.uint8)
    img[4:8, 4:8] = 200
    mask = img[..., 0] > 0
    out_img, out_mask = preprocess.finish(img, mask, Augment(0.0, 0.125, 0.25), crop=16)
    np.testing.assert_array_equal(out_mask, np.roll(mask, (4, 2), (0, 1)))
    np.testing.assert_array_equal(out_img[..., 0] > 0, out_mask)


def test_image_modes_to_rgb():
    g16 = np.array([[0, 65535], [32768, 257]], np.uint16)
    out = preprocess.to_rgb_uint8(Image.fromarray(g16))
    np.testing.assert_array_equal(out[..., 0], np.round(g16 / 65535 * 255).astype(np.uint8))
    assert out.shape == (2, 2, 3)
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 9, 0  # transparent: alpha is dropped, colour kept
    np.testing.assert_array_equal(preprocess.to_rgb_uint8(Image.fromarray(rgba))[..., 0], 9)


def test_mask_binarisation_any_mode():
    vals = np.array([[0, 1], [128, 255]], np.uint8)
    expect = vals > 0
    np.testing.assert_array_equal(preprocess.mask_to_bool(Image.fromarray(vals)), expect)
    np.testing.assert_array_equal(preprocess.mask_to_bool(Image.fromarray(vals > 0)), expect)
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[1, 1, 2] = 1  # a faint blue pixel still counts (a luminance conversion would drop it)
    np.testing.assert_array_equal(preprocess.mask_to_bool(Image.fromarray(rgb)), rgb.any(-1))
    # A palette whose index 0 is white: colours decide, not indices.
    p = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    p.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    np.testing.assert_array_equal(preprocess.mask_to_bool(p), np.array([[1, 0], [0, 1]], bool))
    la = np.zeros((2, 2, 2), np.uint8)
    la[..., 1] = 255  # opaque alpha must not count as defect
    assert not preprocess.mask_to_bool(Image.fromarray(la, mode="LA")).any()


def _png(path, arr):
    Image.fromarray(arr).save(path)
    return str(path)


def test_truncated_or_unreadable_image_names_the_file(tmp_path):
    good = _png(tmp_path / "good.png", np.full((32, 32, 3), 5, np.uint8))
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    trunc = _png(tmp_path / "trunc.png", noise)
    with open(trunc, "r+b") as f:
        f.truncate(os.path.getsize(trunc) // 2)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("not an image")
    for bad in (trunc, str(empty), str(text)):
        with pytest.raises(ValueError, match=re.escape(f"cannot read image {bad!r}")):
            preprocess.load_records([Record(good, 0, "good"), Record(bad, 0, "good")], 16, 16)
        with pytest.raises(ValueError, match=re.escape(f"cannot read image {bad!r}")):
            preprocess.load_record(Record(good, 1, "x", mask_path=bad), 16, 16)


def test_mask_of_another_size_is_rejected(tmp_path):
    img = _png(tmp_path / "a.png", np.zeros((20, 24, 3), np.uint8))
    mask = _png(tmp_path / "a_mask.png", np.zeros((24, 20), np.uint8))
    with pytest.raises(ValueError, match=r"a_mask.png' is 20x24 but its image .*a.png' is 24x20"):
        preprocess.load_record(Record(img, 1, "x", mask_path=mask), 16, 16)
