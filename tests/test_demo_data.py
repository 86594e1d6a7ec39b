import hashlib
import os

import numpy as np
from PIL import Image

from softpatch_jax.data import demo, mvtec

SPEC = demo.DemoSpec(
    size=64, num_train=3, num_test_good=2, num_per_defect=1, categories=("wood", "washer")
)


def _digest(root):
    h = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            with open(os.path.join(folder, f), "rb") as fh:
                h.update(f.encode() + fh.read())
    return h.hexdigest()


def test_layout_counts_and_masks(tmp_path):
    root = demo.write(str(tmp_path / "d"), SPEC)
    assert mvtec.list_categories(root) == ["washer", "wood"]
    for cat in SPEC.categories:
        splits = mvtec.read_category(root, cat)
        assert len(splits.train) == 3
        assert sum(r.label == 0 for r in splits.test) == 2
        defects = [r for r in splits.test if r.label == 1]
        assert sorted(r.defect for r in defects) == sorted(demo.DEFECTS)
        for r in defects:
            mask = np.asarray(Image.open(r.mask_path))
            img = np.asarray(Image.open(r.path))
            assert mask.shape == img.shape[:2] and set(np.unique(mask)) <= {0, 255}
            assert 5 <= (mask > 0).sum() <= 0.2 * mask.size, (r.path, (mask > 0).sum())


def test_deterministic_by_seed(tmp_path):
    a = _digest(demo.write(str(tmp_path / "a"), SPEC))
    b = _digest(demo.write(str(tmp_path / "b"), SPEC))
    c = _digest(demo.write(str(tmp_path / "c"), demo.DemoSpec(**{**SPEC.__dict__, "seed": 1})))
    assert a == b != c


def test_defect_changes_exactly_the_masked_region_mostly():
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    clean, _ = demo.render("wood", rng_a, 96)
    # Same generator state up to the defect: re-render with a defect and compare.
    dirty, mask = demo.render("wood", rng_b, 96, "hole")
    changed = np.abs(dirty.astype(int) - clean.astype(int)).max(-1) > 40
    assert mask.any()
    assert (changed & mask).sum() >= 0.8 * mask.sum()  # the masked pixels did change


def test_opacity_fades_the_defect_but_not_its_mask():
    # Same seed, same defect: half the opacity moves the masked pixels half as far from the image
    # with the defect at opacity 0 (same random stream, so same lighting, blur and noise), and the
    # mask is the defect's shape either way.
    clean, _ = demo.render("fabric", np.random.default_rng(3), 96, "stain", 1.0, (0.0, 0.0))
    full, mask_full = demo.render("fabric", np.random.default_rng(3), 96, "stain", 1.0, (1.0, 1.0))
    half, mask_half = demo.render("fabric", np.random.default_rng(3), 96, "stain", 1.0, (0.5, 0.5))
    np.testing.assert_array_equal(mask_full, mask_half)
    assert mask_full.sum() > 50
    shift_full = np.abs(full.astype(float) - clean)[mask_full].mean()
    shift_half = np.abs(half.astype(float) - clean)[mask_full].mean()
    assert 0.35 * shift_full < shift_half < 0.65 * shift_full, (shift_full, shift_half)
