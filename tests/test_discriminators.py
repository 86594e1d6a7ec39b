import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from softpatch_jax import discriminators, memory_bank, methods
from softpatch_jax.discriminators import linalg

LocalOutlierFactor = pytest.importorskip("sklearn.neighbors").LocalOutlierFactor


def clustered(rng, n_dense=30, n_sparse=15, n_out=3, r=8):
    """Two clusters of very different densities plus a few far outliers."""
    dense = rng.normal(0.0, 0.2, (n_dense, r))
    sparse = rng.normal(4.0, 1.5, (n_sparse, r))
    out = rng.normal(0.0, 6.0, (n_out, r)) + 10.0
    x = np.concatenate([dense, sparse, out]).astype(np.float32)
    return x[rng.permutation(len(x))]


@pytest.mark.parametrize("k", [3, 6, 10])
def test_lof_matches_sklearn(k):
    rng = np.random.default_rng(k)
    positions = np.stack([clustered(rng) for _ in range(5)])  # [P, N, R]
    got = np.asarray(
        discriminators.score(jnp.asarray(positions), ("lof",), params={"lof_k": k}, chunk_size=2)[
            "lof"
        ]
    )
    for p in range(positions.shape[0]):
        lof = LocalOutlierFactor(n_neighbors=k).fit(positions[p].astype(np.float64))
        want = -lof.negative_outlier_factor_
        np.testing.assert_allclose(got[p], want, rtol=1e-4)
    # The far outliers must stand out, or the test data would not exercise LOF.
    assert got.max() > 2.0


def test_mahalanobis_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 40, 6)) @ rng.normal(size=(6, 6))  # correlated
    got = np.asarray(
        discriminators.score(
            jnp.asarray(x, jnp.float32), ("gaussian",), params={"gaussian_eps": 0.01}
        )["gaussian"]
    )
    for p in range(x.shape[0]):
        mu = x[p].mean(0)
        cov = np.cov(x[p], rowvar=False, ddof=1) + 0.01 * np.eye(6)
        diff = x[p] - mu
        want = np.sqrt(np.einsum("nr,rs,ns->n", diff, np.linalg.inv(cov), diff))
        np.testing.assert_allclose(got[p], want, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n", [5, 20])
def test_mahalanobis_with_fewer_images_than_dimensions_matches_numpy(n, dtype):
    """N <= R takes the [N, N] Gram route (float32) or the float64 route ("auto" there); N=5
    (R=12) is far below, where the covariance is rank 4 and eps alone keeps it invertible."""
    rng = np.random.default_rng(n)
    x = rng.normal(size=(3, n, 12)) @ rng.normal(size=(12, 12)) + 3.0
    got = np.asarray(
        discriminators.score(
            jnp.asarray(x, jnp.float32),
            ("gaussian",),
            params={"gaussian_eps": 0.01},
            score_dtype=dtype,
        )["gaussian"]
    )
    for p in range(x.shape[0]):
        diff = x[p] - x[p].mean(0)
        cov = np.cov(x[p], rowvar=False, ddof=1) + 0.01 * np.eye(12)
        want = np.sqrt(np.einsum("nr,rs,ns->n", diff, np.linalg.inv(cov), diff))
        np.testing.assert_allclose(got[p], want, rtol=1e-4)


@pytest.mark.parametrize("r", [1, 7, 32, 33, 100, 128])
def test_cholesky_inverse_matches_numpy(r):
    """Sizes at, below and above the unblocked base (32), odd splits and a power of two."""
    rng = np.random.default_rng(r)
    a = rng.normal(size=(r + 5, r))
    s = a.T @ a / (r + 4) + 0.05 * np.eye(r)
    got = np.asarray(linalg.cholesky_inverse(jnp.asarray(s, jnp.float32)))
    want = np.linalg.inv(np.linalg.cholesky(s))
    assert np.allclose(np.triu(got, 1), 0.0)
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())


def test_cpu_chunks_stay_cache_sized():
    budget = discriminators.CPU_CHUNK_BYTES
    for n in (30, 200, 1000, 5000):
        cpu = discriminators.chunk_size_for(n, 128, platform="cpu")
        assert cpu >= 2  # a batch of one compiles differently (discriminators._batch)
        assert cpu == 2 or cpu * 4 * n * n <= budget
        assert cpu <= discriminators.chunk_size_for(n, 128, platform="gpu")
    assert discriminators.chunk_size_for(200, 128, platform="cpu") == 16


def test_nearest_matches_brute_force_and_shares_one_call():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 12, 5)).astype(np.float32)
    out = discriminators.score(
        jnp.asarray(x), ("nearest", "gaussian", "lof"), params={"lof_k": 4}, chunk_size=3
    )
    # N=12 > R=5: the Gaussian stays float32; the nearest distance carries its float64 low part.
    assert set(out) == {"nearest", "gaussian", "lof", discriminators.low_key("nearest")}
    for p in range(7):
        d = np.linalg.norm(x[p][:, None] - x[p][None], axis=-1)
        np.fill_diagonal(d, np.inf)
        np.testing.assert_allclose(np.asarray(out["nearest"][p]), d.min(1), rtol=1e-5)


def test_effective_k_follows_sklearn_and_rejects_single_image():
    assert discriminators.settings(("lof",), {"lof_k": 6}, 4) == (("lof_k", 3),)
    assert discriminators.settings(("lof",), {"lof_k": 6}, 100) == (("lof_k", 6),)
    with pytest.raises(ValueError, match="at least 2"):
        discriminators.settings(("lof",), {"lof_k": 6}, 1)
    with pytest.raises(ValueError, match="unknown discriminator parameter"):
        discriminators.settings(("lof",), {"lof_kk": 6}, 10)


def test_rank_normalise_matches_scipy_with_ties():
    w = np.array([[3.0, 1.0, 2.0, 2.0], [5.0, 5.0, 0.0, 1.0]], np.float32)
    got_all = np.asarray(discriminators.rank_normalise(jnp.asarray(w)))
    np.testing.assert_allclose(
        got_all, stats.rankdata(w, method="average").reshape(w.shape) / w.size
    )
    got_pos = np.asarray(discriminators.rank_normalise(jnp.asarray(w), axis=1))
    want_pos = np.stack([stats.rankdata(row, method="average") / 4 for row in w])
    np.testing.assert_allclose(got_pos, want_pos)


def test_fuse_averages_ranks_and_rejects_bad_names():
    a = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    b = np.array([[4.0, 3.0], [2.0, 1.0]], np.float32)
    fused = np.asarray(
        discriminators.fuse(
            {"lof": jnp.asarray(a), "gaussian": jnp.asarray(b)}, ("lof", "gaussian")
        )
    )
    # Exactly opposite orders: every patch gets the mean rank (1+4)/2/4.
    np.testing.assert_allclose(fused, np.full((2, 2), 0.625))
    with pytest.raises(ValueError, match="valid"):
        discriminators.fuse({"lof": jnp.asarray(a)}, ("lofx",))
    with pytest.raises(ValueError, match="rank_scope"):
        discriminators.fuse({"lof": jnp.asarray(a)}, ("lof",), scope="image")


def _mahalanobis_float64(x_PxNxR, eps):
    """The reference's Gaussian in float64: inv(cov(ddof=1) + eps I), self included."""
    out = []
    for x in np.asarray(x_PxNxR, np.float64):
        diff = x - x.mean(0)
        cov = np.cov(x, rowvar=False, ddof=1) + eps * np.eye(x.shape[1])
        out.append(np.sqrt(np.einsum("nr,rs,ns->n", diff, np.linalg.inv(cov), diff)))
    return np.stack(out)


def test_gaussian_below_r_keeps_the_float64_order_that_float32_loses():
    """N=33 < R=128: every distance lies within ~0.1% of sqrt(N-1), and neighbours in the ranking
    differ below float32's resolution. "auto" computes in float64 and keeps hi + lo; their order
    (`order_key`) is the float64 oracle's, and so is the top-tau removal, where float32 is not."""
    rng = np.random.default_rng(0)
    x = (0.5 * rng.normal(size=(8, 33, 128))).astype(np.float32)
    want = _mahalanobis_float64(x, 0.01)
    assert want.std() / want.mean() < 2e-3  # the saturated regime
    got = discriminators.score(jnp.asarray(x), ("gaussian", "lof"), params={"gaussian_eps": 0.01})
    hi, lo = np.asarray(got["gaussian"]), np.asarray(got[discriminators.low_key("gaussian")])
    np.testing.assert_allclose(hi.astype(np.float64) + lo, want, rtol=1e-12)
    np.testing.assert_array_equal(hi, want.astype(np.float32))  # the value: float32(d)
    order = np.argsort(np.asarray(discriminators.order_key(got, "gaussian")).ravel(), kind="stable")
    np.testing.assert_array_equal(order, np.argsort(want.ravel(), kind="stable"))
    # The same removal as the reference's quantile threshold on float64 values.
    spec = methods.BankSpec(removal=("gaussian",), tau=0.15)
    keep = np.asarray(memory_bank.keep_mask(spec, {n: s.T for n, s in got.items()}, hi.T.shape))
    np.testing.assert_array_equal(keep, (want <= np.quantile(want, 0.85)).T)
    # float32 alone cannot: a float32 kernel's rounding over R=128-term products is many ulps,
    # and here 32 pairs of neighbours in the float64 ranking lie within 16 float32 ulps of each
    # other (which of them a float32 kernel swaps depends on the CPU's vectorisation, so the test
    # asserts the resolution, not one machine's swaps).
    f32 = discriminators.score(jnp.asarray(x), ("gaussian",), score_dtype="float32")
    assert discriminators.low_key("gaussian") not in f32
    gaps = np.diff(np.sort(want.ravel()))
    assert (gaps < 16 * np.spacing(np.float32(want.max()))).sum() >= 10


def test_order_key_is_dense_ranks_of_hi_plus_lo():
    rng = np.random.default_rng(1)
    hi = rng.choice(np.float32([1.0, 2.0, 3.0]), size=(6, 7))
    lo = rng.choice(np.float32([-1e-8, 0.0, 2e-8]), size=(6, 7))
    lo[0, :2] = lo[1, :2] = 0.0  # exact ties share a rank
    hi[0, :2] = hi[1, :2] = 2.0
    key = discriminators.order_key(
        {"gaussian": jnp.asarray(hi), "gaussian_lo": jnp.asarray(lo)}, "gaussian"
    )
    want = stats.rankdata(hi.astype(np.float64) + lo, method="dense").reshape(hi.shape) - 1
    np.testing.assert_array_equal(np.asarray(key), want)
    # Without a low part the key is the score itself.
    np.testing.assert_array_equal(discriminators.order_key({"lof": jnp.asarray(hi)}, "lof"), hi)


def test_precision_auto_follows_n_r_and_platform_and_rejects_unknown():
    names = ("gaussian", "nearest", "lof")

    def dtypes(setting, n, platform=None):
        d = discriminators.resolve_precision(setting, n, 128, names, platform=platform)
        return tuple(d[k] for k in names)

    assert dtypes("auto", 128, "cpu") == ("float64", "float64", "float32")
    assert dtypes("auto", 129, "gpu") == ("float32", "float64", "float32")
    assert dtypes("auto", 10, "tpu") == ("float32", "float32", "float32")
    assert dtypes("float32", 10) == ("float32", "float32", "float32")
    with pytest.raises(ValueError, match=r"score_dtype must be .*'half'"):
        discriminators.resolve_precision("half", 10, 128)


def test_nearest_distance_is_exact_where_the_expanded_form_cancels():
    """A tight cluster and one far image: after centring the cluster's norms are ~25x its
    distances, so the float32 expanded form |a|^2 + |b|^2 - 2ab loses digits; the float64
    re-rank of the candidates gives the exact distance (hi + lo against a float64 brute force),
    its order, and the reference's removal."""
    rng = np.random.default_rng(3)
    x = 1e-2 * rng.normal(size=(16, 40, 32))  # a tight cluster...
    x[:, 0] += 10.0  # ...and one far image, which moves the centre away from the cluster
    x = x.astype(np.float32)
    x64 = x.astype(np.float64)
    d2 = ((x64[:, :, None] - x64[:, None]) ** 2).sum(-1)
    d2[:, np.arange(40), np.arange(40)] = np.inf
    want = np.sqrt(d2.min(-1))
    got = discriminators.score(jnp.asarray(x), ("nearest",))
    hi, lo = np.asarray(got["nearest"]), np.asarray(got[discriminators.low_key("nearest")])
    np.testing.assert_allclose(hi.astype(np.float64) + lo, want, rtol=1e-13)
    order = np.asarray(discriminators.order_key(got, "nearest")).ravel()
    np.testing.assert_array_equal(
        np.argsort(order, kind="stable"), np.argsort(want.ravel(), kind="stable")
    )
    # The float32 expanded form alone is measurably off here (what the re-rank repairs).
    f32 = np.asarray(
        discriminators.score(jnp.asarray(x), ("nearest",), score_dtype="float32")["nearest"]
    )
    assert np.abs(f32 / want - 1).max() > 1e-5
    # With LOF in the same call: the same nearest distances, and LOF unchanged.
    both = discriminators.score(jnp.asarray(x), ("nearest", "lof"), params={"lof_k": 5})
    np.testing.assert_array_equal(np.asarray(both["nearest"]), hi)
    lof32 = discriminators.score(
        jnp.asarray(x), ("lof",), params={"lof_k": 5}, score_dtype="float32"
    )["lof"]
    np.testing.assert_array_equal(np.asarray(both["lof"]), np.asarray(lof32))


def test_readme_lists_every_registered_discriminator_with_its_parameters():
    """README's discriminator table is the registry's: a new module is documented there."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    rows = {
        line.split("|")[1].strip().strip("`"): line
        for line in readme.splitlines()
        if line.startswith("| `")
    }
    for name in discriminators.NAMES:
        assert name in rows, f"README's discriminator table lacks {name!r}"
        for key, default in discriminators.REGISTRY[name].params.items():
            assert f"`{key}`={default}" in rows[name], (name, key)


def test_registry_shares_intermediates_once_per_position():
    """Every registered discriminator in one call: each shared intermediate is built once per
    traced position, whoever asks for it."""
    built = []
    original = dict(discriminators.SHARED)
    try:
        for name, fn in original.items():
            discriminators.SHARED[name] = lambda pos, *a, _n=name, _f=fn: (
                built.append((_n, a)),
                _f(pos, *a),
            )[1]
        x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 9, 4)).astype(np.float32))
        discriminators.score(x, discriminators.NAMES, chunk_size=3, key=jax.random.key(0))
    finally:
        discriminators.SHARED.update(original)
    assert built and len(built) == len(set(built))
