"""InReaCh's channel selection against a numpy brute force of the paper's definition, and a
hand-built case where the one defective patch is the only one dropped."""

import jax.numpy as jnp
import numpy as np
import pytest

from softpatch_jax import inreach


def brute_force(x, grid, window, min_length, quantile):
    n, p, _ = x.shape
    h, w = grid

    def cells(q):
        y, c = divmod(q, w)
        return [
            yy * w + xx
            for yy in range(y - window, y + window + 1)
            for xx in range(c - window, c + window + 1)
            if 0 <= yy < h and 0 <= xx < w
        ]

    def nearest(a, img, q):
        cand = cells(q)
        return cand[int(np.argmin([np.sum((a - x[img, c]) ** 2) for c in cand]))]

    channels = []
    for s in range(n):
        for q in range(p):
            members = [(s, q)]
            for j in range(n):
                if j == s:
                    continue
                qs = nearest(x[s, q], j, q)
                if nearest(x[j, qs], s, qs) == q:
                    members.append((j, qs))
            feats = np.stack([x[a, b] for a, b in members])
            spread = np.linalg.norm(feats - feats.mean(0), axis=1).mean()
            channels.append((len(members) / n, spread, members))
    long = [c for c in channels if c[0] >= min_length]
    limit = np.quantile([c[1] for c in long], quantile) if long else -np.inf
    keep = np.zeros((n, p), bool)
    for _length, spread, members in long:
        if spread <= limit:
            for a, b in members:
                keep[a, b] = True
    return keep if keep.any() else np.ones((n, p), bool)


@pytest.mark.parametrize("quantile", [1.0, 0.5])
def test_keep_mask_matches_brute_force(quantile):
    rng = np.random.default_rng(0)
    grid = (3, 4)
    base = rng.normal(size=(12, 3)) * 3.0  # one pattern per position
    x = base[None] + 0.3 * rng.normal(size=(7, 12, 3))
    x[2, 5] += 8.0  # a defect
    x[5, [0, 1]] = x[5, [1, 0]]  # a shifted part
    opts = inreach.Options(window=1, min_length=0.5, spread_quantile=quantile)
    got = np.asarray(inreach.keep_mask(jnp.asarray(x, jnp.float32), grid, opts))
    want = brute_force(x.astype(np.float64), grid, 1, 0.5, quantile)
    np.testing.assert_array_equal(got, want)
    assert not got[2, 5]
    if quantile < 1.0:
        assert got.sum() < x.shape[0] * x.shape[1]


def test_hand_built_defect_is_the_only_patch_dropped():
    """2x2 grid, one distinct pattern per position; image 3 has a far patch at position 0. Every
    nominal patch is in a channel spanning at least 3 of 4 images; the defect's channel holds only
    itself (length 1/4), and no other channel takes it (not a mutual nearest neighbour)."""
    pattern = np.array([[10.0, 0.0], [0.0, 10.0], [-10.0, 0.0], [0.0, -10.0]])
    x = np.stack([pattern + 0.01 * k for k in range(4)])
    x[3, 0] = [100.0, 100.0]
    opts = inreach.Options(window=1, min_length=0.5, spread_quantile=1.0)
    got = np.asarray(inreach.keep_mask(jnp.asarray(x, jnp.float32), (2, 2), opts))
    want = np.ones((4, 4), bool)
    want[3, 0] = False
    np.testing.assert_array_equal(got, want)


def test_window_neighbours_stay_inside_the_grid():
    nb, valid = inreach.window_neighbours(2, 3, 1)
    assert nb.shape == valid.shape == (6, 9)
    assert valid.sum(1).tolist() == [4, 6, 4, 4, 6, 4]
    assert (nb[~valid] == np.repeat(np.arange(6), 9).reshape(6, 9)[~valid]).all()
