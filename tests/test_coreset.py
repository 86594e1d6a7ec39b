import jax.numpy as jnp
import numpy as np
import pytest

from softpatch_jax import coreset


def numpy_greedy(x, keep, starts, m):
    """The approximate greedy k-center of PatchCore, as a plain loop in float64."""
    x = x.astype(np.float64)
    dist = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    min_d = dist(x, x[starts]).mean(1)
    min_d[~keep] = -1.0
    picked = []
    for _ in range(m):
        j = int(np.argmax(min_d))
        picked.append(j)
        min_d = np.minimum(min_d, dist(x, x[j : j + 1])[:, 0])
        min_d[j] = -1.0
        min_d[~keep] = -1.0
    return np.array(picked)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_numpy_loop(seed):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(600, 16)) * rng.uniform(0.5, 3.0, 16)).astype(np.float32) + 5.0
    keep = rng.random(600) > 0.15
    starts = rng.choice(600, 10, replace=False)
    got = np.asarray(
        coreset.greedy(jnp.asarray(x), jnp.asarray(keep), jnp.asarray(starts), num_samples=60)
    )
    np.testing.assert_array_equal(got, numpy_greedy(x, keep, starts, 60))
    assert keep[got].all() and len(set(got.tolist())) == 60


def test_duplicates_and_mask_never_repicked():
    x = np.zeros((20, 3), np.float32)  # every distance is zero
    keep = np.arange(20) % 2 == 0
    got = np.asarray(
        coreset.greedy(jnp.asarray(x), jnp.asarray(keep), jnp.arange(3), num_samples=10)
    )
    assert sorted(got.tolist()) == list(range(0, 20, 2))


def test_num_samples_counts_all_patches_and_caps_at_kept():
    assert coreset.num_samples(0.1, 1000, 850) == 100
    assert coreset.num_samples(0.9, 1000, 500) == 500
    with pytest.raises(ValueError, match="ratio"):
        coreset.num_samples(0.0, 10, 10)
