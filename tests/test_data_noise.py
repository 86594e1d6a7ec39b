"""Noisy-set construction against METHOD.md section 6, with hand-computed counts."""

import dataclasses

import numpy as np
import pytest

from softpatch_jax.data.noise import NoiseSpec, inject, num_injected
from softpatch_jax.data.records import CategorySplits, Record


def _splits(n_train=20, n_good=5, n_bad=8):
    train = tuple(Record(f"train/{i}.png", 0, "good") for i in range(n_train))
    test = tuple(Record(f"test/good/{i}.png", 0, "good") for i in range(n_good)) + tuple(
        Record(f"test/bad/{i}.png", 1, "bad", mask_path=f"gt/bad/{i}.png") for i in range(n_bad)
    )
    return CategorySplits("cat", train, test)


# (ratio, N_train) -> int(r * N) worked by hand.
@pytest.mark.parametrize(
    "ratio, n, want", [(0.0, 20, 0), (0.1, 20, 2), (0.15, 20, 3), (0.35, 20, 7), (0.1, 209, 20),
                       (0.08, 900, 72), (0.4, 60, 24), (0.02, 213, 4), (0.35, 180, 63)],
)  # fmt: skip
def test_num_injected(ratio, n, want):
    assert num_injected(ratio, n) == want


def test_matches_the_reference_formula_on_every_real_category():
    # Training-set sizes of MVTec AD (15), VisA's 1cls split (12) and BTAD (3).
    mvtec = [209, 224, 219, 280, 264, 391, 245, 220, 267, 320, 230, 60, 213, 247, 240]
    visa = [900, 542, 450, 453, 450, 900, 900, 904, 901, 905, 904, 450]
    btad = [400, 399, 1000]
    sizes = mvtec + visa + btad
    assert sum(sizes[:15]) == 3629 and sum(sizes[15:27]) == 8659 and sum(sizes[27:]) == 1799
    for r in (0.0, 0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4):
        for n in sizes:
            assert num_injected(r, n) == int(r * n)


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_ratio_out_of_range(ratio):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        num_injected(ratio, 10)


def test_no_overlap_moves_anomalies_out_of_test():
    s = _splits()
    out = inject(s, NoiseSpec(0.15, overlap=False), np.random.default_rng(0))
    assert len(out.train) == 20 + 3 and out.train[:20] == s.train
    added = out.train[20:]
    assert all(r.injected and r.label == 1 and r.augment is None for r in added)
    assert len({r.path for r in added}) == 3
    bad = {r.path for r in s.test if r.label}
    assert {r.path for r in added} <= bad
    assert len(out.test) == 13 - 3
    assert not {r.path for r in added} & {r.path for r in out.test}
    assert {r.path for r in out.test} | {r.path for r in added} == {r.path for r in s.test}


def test_overlap_keeps_test_and_augments_copies():
    s = _splits()
    spec = NoiseSpec(0.35, overlap=True)
    out = inject(s, spec, np.random.default_rng(1))
    added = out.train[20:]
    assert len(added) == 7 and out.test == s.test
    assert {r.path for r in added} <= {r.path for r in s.test if r.label}
    for r in added:
        assert abs(r.augment.rotation_deg) <= 3.0
        assert abs(r.augment.translate_x) <= 0.03 and abs(r.augment.translate_y) <= 0.03
        original = next(t for t in s.test if t.path == r.path)
        assert dataclasses.replace(r, augment=None, injected=False) == original


def test_augmentation_fills_its_ranges():
    s = _splits(n_train=1000, n_bad=400)
    out = inject(
        s, NoiseSpec(0.4, overlap=True, rotation_deg=3.0, translate=0.03), np.random.default_rng(2)
    )
    aug = np.array([[r.augment.rotation_deg, r.augment.translate_x, r.augment.translate_y]
                    for r in out.train[1000:]])  # fmt: skip
    assert aug.shape == (400, 3)
    lim = np.array([3.0, 0.03, 0.03])
    assert (np.abs(aug) <= lim).all()
    # Uniform on [-l, l]: extremes near +-l, mean near 0, std near l / sqrt(3).
    assert (aug.max(0) > 0.95 * lim).all() and (aug.min(0) < -0.95 * lim).all()
    assert (np.abs(aug.mean(0)) < 0.1 * lim).all()
    np.testing.assert_allclose(aug.std(0), lim / np.sqrt(3), rtol=0.1)


def test_determinism_by_seed():
    s = _splits(n_train=50, n_bad=30)
    spec = NoiseSpec(0.3, overlap=True)
    a = inject(s, spec, np.random.default_rng(7))
    b = inject(s, spec, np.random.default_rng(7))
    c = inject(s, spec, np.random.default_rng(8))
    assert a == b
    assert a.train != c.train


def test_zero_ratio_is_the_identity():
    s = _splits()
    assert inject(s, NoiseSpec(0.0, overlap=False), np.random.default_rng(0)) == s


def test_too_many_states_the_largest_ratio():
    s = _splits(n_train=20, n_bad=4)
    # No overlap: at most 4 - 1 = 3 of 20 -> 0.15; 0.2 asks for 4.
    with pytest.raises(ValueError, match=r"asks for 4 .* at most 3, i\.e\. ratio <= 0\.1500"):
        inject(s, NoiseSpec(0.2, overlap=False), np.random.default_rng(0))
    assert len(inject(s, NoiseSpec(0.15, overlap=False), np.random.default_rng(0)).test) == 6
    # Overlap: all 4 may go -> 0.2; 0.25 asks for 5.
    assert len(inject(s, NoiseSpec(0.2, overlap=True), np.random.default_rng(0)).train) == 24
    with pytest.raises(ValueError, match=r"at most 4, i\.e\. ratio <= 0\.2000"):
        inject(s, NoiseSpec(0.25, overlap=True), np.random.default_rng(0))


def test_injecting_twice_is_refused():
    s = inject(_splits(), NoiseSpec(0.1, overlap=True), np.random.default_rng(0))
    with pytest.raises(ValueError, match="already has noise"):
        inject(s, NoiseSpec(0.1, overlap=True), np.random.default_rng(0))
