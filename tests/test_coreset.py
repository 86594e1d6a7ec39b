import jax
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


def pool_with_ties(rng, n=1500, r=128):
    """A pool of R = 128 (where a [B, R] block product and a vector product differ in bits) with
    duplicated rows (exact ties in the argmax)."""
    x = (rng.normal(size=(n, r)) * rng.uniform(0.5, 3.0, r)).astype(np.float32) + 2.0
    x[n // 2 : n // 2 + 80] = x[10:90]
    return x


@pytest.mark.parametrize("strict,masks", [(False, 5), (True, 5), (False, 9), (False, 19)])
def test_select_many_rows_equal_separate_selects(strict, masks):
    """Each row of a K-mask run equals that mask run alone: K = 5, 9 (one block of K rows on CPU
    where a lone mask runs a block of 2) and 19 (two blocks)."""
    rng = np.random.default_rng(4)
    x = pool_with_ties(rng)
    keeps = rng.random((masks, x.shape[0])) > rng.uniform(0.05, 0.4, (masks, 1))
    keeps[3] = True
    prep = coreset.prepare(jnp.asarray(x), jnp.asarray(rng.choice(x.shape[0], 10, replace=False)))
    many = np.asarray(coreset.select_many(prep, jnp.asarray(keeps), 120, strict=strict))
    for k, keep in enumerate(keeps):
        one = np.asarray(coreset.select(prep, jnp.asarray(keep), 120, strict=strict))
        np.testing.assert_array_equal(many[k], one)
        if not strict:
            assert keep[one].all()
    if masks != 5:
        return
    # Different sizes: a prefix of the longest run is the shorter run.
    sizes = [120, 37, 1, 80, 120]
    cut = coreset.select_sizes(prep, jnp.asarray(keeps), sizes, strict=strict)
    for k, m in enumerate(sizes):
        one = np.asarray(coreset.select(prep, jnp.asarray(keeps[k]), m, strict=strict))
        np.testing.assert_array_equal(np.asarray(cut[k]), one)


def test_select_many_all_ties_follow_index_order():
    x = jnp.zeros((50, 4), jnp.float32)  # every distance 0
    keeps = jnp.asarray([np.ones(50, bool), np.arange(50) % 3 == 0])
    got = np.asarray(coreset.select_many(coreset.prepare(x, jnp.arange(3)), keeps, 15))
    np.testing.assert_array_equal(got[0], np.arange(15))
    np.testing.assert_array_equal(got[1], np.arange(0, 45, 3))


@pytest.mark.parametrize("r", [128, 1024])
def test_step_bits_do_not_depend_on_the_masks_alongside(r):
    """One mask's products and distances in a step are the same bits alone as among 1 to 39
    others, in any row (one block or several): what makes select_many's rows equal to separate
    runs. At R = 1024 an unsliced product's bits change with its row count (in the products; the
    distances' larger norms absorb most of it)."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(r, 5000)).astype(np.float32))
    x_sq = jnp.sum(x * x, axis=0)
    c = jnp.asarray(rng.normal(size=(40, r)).astype(np.float32))
    c_sq = jnp.sum(c * c, axis=1)
    prod, dist = jax.jit(coreset.step_products), jax.jit(coreset.step_distances)
    alone = np.asarray(prod(x, c[:1]))[0], np.asarray(dist(x, x_sq, c[:1], c_sq[:1]))[0]
    for k in (2, 5, 9, 16, 17, 40):
        order = rng.permutation(k)  # row 0 somewhere among k - 1 others
        at = np.argmax(order == 0)
        got = (
            np.asarray(prod(x, c[order]))[at],
            np.asarray(dist(x, x_sq, c[order], c_sq[order]))[at],
        )
        np.testing.assert_array_equal(got[0], alone[0], err_msg=f"products, K={k}")
        np.testing.assert_array_equal(got[1], alone[1], err_msg=f"distances, K={k}")


def test_block_rows_put_up_to_the_cap_in_one_block_on_cpu():
    if jax.default_backend() != "cpu":
        assert {coreset.block_rows(k) for k in (1, 9, 40)} == {8}
        return
    rows = {k: coreset.block_rows(k) for k in (1, 2, 9, 16, 17, 40)}
    assert rows == {1: 2, 2: 2, 9: 9, 16: 16, 17: 9, 40: 14}


def test_progress_segments_give_the_same_picks_without_retracing():
    rng = np.random.default_rng(6)
    x = jnp.asarray(pool_with_ties(rng, 400, 16))
    keeps = jnp.asarray(rng.random((2, 400)) > 0.2)
    prep = coreset.prepare(x, jnp.arange(5))
    whole = np.asarray(coreset.select_many(prep, keeps, 90))
    before = coreset._steps._cache_size()
    done = []
    segmented = np.asarray(coreset.select_many(prep, keeps, 90, progress=done.append))
    np.testing.assert_array_equal(segmented, whole)
    assert sum(done) == 90 and len(done) > 1
    assert coreset._steps._cache_size() == before  # segments reuse the whole run's compile
