import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from softpatch_jax import ops, scoring
from softpatch_jax.memory_bank import Banks, MemoryBank
from tests.conftest import cpu_only


@pytest.mark.parametrize("distance,power", [("squared", 2), ("l2", 1)])
def test_patch_scores_match_brute_force_weighted_nn(distance, power):
    """soft weight x |q - m*|^power, m* the nearest bank row (faiss IndexFlatL2's squared form by
    default, the paper's eq. 10 with "l2")."""
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(50, 16)).astype(np.float32)
    weights = rng.uniform(0.5, 2.0, 50).astype(np.float32)
    test = rng.normal(size=(3, 20, 16)).astype(np.float32)
    mb = MemoryBank(jnp.asarray(bank), jnp.asarray(weights), jnp.arange(50))
    got = np.asarray(scoring.patch_scores(mb, jnp.asarray(test), chunk_size=7, distance=distance))
    d = np.linalg.norm(test.reshape(-1, 1, 16).astype(np.float64) - bank[None], axis=-1)
    nn = d.argmin(1)
    want = (weights[nn] * d[np.arange(len(nn)), nn] ** power).reshape(3, 20)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    if distance == "squared":
        assert np.asarray(scoring.patch_scores(mb, jnp.asarray(test), 7)).tolist() == got.tolist()


def test_unknown_distance_is_an_error_listing_the_choices():
    mb = MemoryBank(jnp.zeros((2, 3)), jnp.ones(2), jnp.arange(2))
    with pytest.raises(ValueError, match=r"'squared'.*'l2'"):
        scoring.patch_scores(mb, jnp.zeros((1, 2, 3)), 4, distance="cosine")


@pytest.mark.parametrize("shape,sigma", [((2, 40, 40), 4.0), ((1, 12, 9), 4.0), ((1, 30, 25), 1.5)])
def test_gaussian_blur_matches_scipy(shape, sigma):
    x = np.random.default_rng(1).random(shape).astype(np.float32)
    got = np.asarray(scoring.gaussian_blur(jnp.asarray(x), sigma))
    want = np.stack([ndimage.gaussian_filter(m.astype(np.float64), sigma) for m in x])
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_predict_uses_cls_bank_for_images_and_seg_bank_for_maps():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(2, 16, 8)).astype(np.float32)
    near = MemoryBank(jnp.asarray(feats[0]), jnp.ones(16), jnp.arange(16))  # test image 0 is in it
    far = MemoryBank(jnp.asarray(feats[0] + 100.0), jnp.ones(16), jnp.arange(16))
    scores, maps = scoring.predict(
        Banks(cls=near, seg=far), jnp.asarray(feats), (4, 4), (16, 16), 4.0
    )
    assert float(scores[0]) < 1e-3 < float(scores[1])
    assert maps.shape == (2, 16, 16) and float(maps.min()) > 50.0  # maps come from the far bank
    # A constant patch map stays constant through upsampling and blur.
    flat = scoring.anomaly_maps(jnp.full((1, 16), 3.0), (4, 4), (16, 16), 4.0)
    np.testing.assert_allclose(np.asarray(flat), 3.0, rtol=1e-6)


def near_tie_case(rng, d=256, m=600, q=700):
    """Adversarial queries for the certified search: exact duplicate bank rows (ties the exact
    search breaks by the lowest index), rows 1e-6 apart, queries at midpoints of two rows and on
    bank rows (distance 0), plus ordinary ones; offset far from the origin."""
    bank = rng.normal(size=(m, d)).astype(np.float32) + 30.0
    bank[m // 2 : m // 2 + 40] = bank[:40]  # exact duplicates
    bank[100:140] = bank[200:240] + 1e-6 * rng.normal(size=(40, d)).astype(np.float32)
    mid = 0.5 * (bank[300:400] + bank[400:500])
    on = bank[rng.choice(m, 100)]
    near = bank[rng.choice(m, 200)] + 0.05 * rng.normal(size=(200, d)).astype(np.float32)
    far = rng.normal(size=(q - 400, d)).astype(np.float32) * 2.0 + 30.0
    return jnp.asarray(bank), jnp.asarray(np.concatenate([mid, on, near, far]).astype(np.float32))


@pytest.mark.parametrize("chunk,emulate", [(64, True), (4096, True), (256, False)])
def test_certified_search_equals_the_exact_search_bitwise(chunk, emulate):
    """Against the jitted exact search, as scoring runs it (op by op, XLA fuses differently and the
    recomputed distance can round differently)."""
    bank, query = near_tie_case(np.random.default_rng(0))
    want_d, want_i = scoring._nearest(query, bank, chunk, ops.mean_row(bank))
    got_d, got_i, fell_back = scoring.nearest_certified(query, bank, chunk, emulate=emulate)
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
    np.testing.assert_array_equal(np.asarray(got_d), np.asarray(want_d))
    # Both ways are exercised: the duplicates and midpoints fall back, the ordinary ones do not.
    assert 40 <= fell_back < query.shape[0] // 2


def test_certified_patch_scores_equal_exact_ones():
    bank, query = near_tie_case(np.random.default_rng(1), d=64, q=500)
    mb = MemoryBank(bank, jnp.linspace(1.0, 2.0, bank.shape[0]), jnp.arange(bank.shape[0]))
    feats = query.reshape(5, 100, 64)
    want = scoring.patch_scores(mb, feats, 128)
    got = scoring.patch_scores(mb, feats, 128, search="emulated")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="exact"):
        scoring.patch_scores(mb, feats, 128, search="fast")


def test_search_bounds_hold_against_float64():
    """The bfloat16 distance and the exact search's expanded one stay within their bounds of the
    true squared distance (float64 oracle), on centred data as the search sees it."""
    rng = np.random.default_rng(2)
    d = 512
    q = (rng.normal(size=(64, d)) * rng.uniform(0.1, 10, d)).astype(np.float32)
    b = (rng.normal(size=(300, d)) * rng.uniform(0.1, 10, d)).astype(np.float32)
    true = ((q[:, None].astype(np.float64) - b[None]) ** 2).sum(-1)
    scale = (q.astype(np.float64) ** 2).sum(1)[:, None] + (b.astype(np.float64) ** 2).sum(1)[None]
    c_low, c_exact, _ = ops.search_bounds(d)
    qs, bs = ops.sq_norms(jnp.asarray(q)), ops.sq_norms(jnp.asarray(b))
    low = qs[:, None] + bs[None] - 2.0 * ops.reduced_products(jnp.asarray(q), jnp.asarray(b), True)
    exact = ops.pairwise_sqdist(jnp.asarray(q), jnp.asarray(b))
    assert (np.abs(np.asarray(low, np.float64) - true) <= c_low * scale).all()
    assert (np.abs(np.asarray(exact, np.float64) - true) <= c_exact * scale).all()
    # ... and are not vacuous: the bfloat16 error is a sizeable part of its bound.
    assert np.abs(np.asarray(low, np.float64) - true).max() > 0.01 * c_low * scale.max()


@pytest.mark.parametrize("t,p,chunk", [(13, 20, 7), (40, 49, 64), (3, 20, 64), (9, 16, 8)])
def test_image_segments_cover_the_test_set_in_equal_multi_chunk_segments(t, p, chunk):
    segs = scoring.image_segments(t, p, chunk)
    covered = np.zeros(t, int)
    for lo, hi in segs:
        covered[lo:hi] += 1
    assert covered.min() >= 1 and segs[-1][1] == t and len({hi - lo for lo, hi in segs}) == 1
    if len(segs) > 1:  # every segment two search chunks or more, so chunks keep their shape
        assert (segs[0][1] - segs[0][0]) * p >= 2 * chunk and len(segs) <= 20


@pytest.mark.parametrize("search", ["exact", "emulated"])
def test_scoring_with_progress_equals_one_call_and_brute_force(search):
    """Scored in segments with progress: bitwise the one-call scores, each image counted once,
    one compile for all segments, and within float32 rounding of a float64 brute force."""
    rng = np.random.default_rng(3)
    t, p, d = 23, 12, 16
    test = jnp.asarray(rng.normal(size=(t, p, d)).astype(np.float32) + 3.0)
    rows = [rng.normal(size=(m, d)).astype(np.float32) + 3.0 for m in (90, 60)]
    w = [rng.uniform(1.0, 2.0, len(r)).astype(np.float32) for r in rows]
    mb = [MemoryBank(jnp.asarray(r), jnp.asarray(x), jnp.arange(len(r))) for r, x in zip(rows, w)]
    banks = Banks(cls=mb[0], seg=mb[1])
    kw = dict(grid=(3, 4), image_size=(6, 8), blur_sigma=1.0, chunk_size=10, search=search)
    whole = scoring.predict(banks, test, **kw)
    compiled = scoring._patch_scores._cache_size()
    done = []
    parts = scoring.predict(banks, test, progress=done.append, **kw)
    for a, b in zip(whole, parts):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    assert sum(done) == t and len(done) > 1
    if search == "exact":
        assert scoring._patch_scores._cache_size() <= compiled + 2  # per bank, one for all segments
    q = np.asarray(test, np.float64).reshape(-1, 1, d)
    dist = np.linalg.norm(q - rows[0][None], axis=-1)
    want = (w[0][dist.argmin(1)] * dist.min(1) ** 2).reshape(t, p).max(1)
    np.testing.assert_allclose(np.asarray(parts[0]), want, rtol=1e-5)


def test_vmapped_scoring_with_progress_equals_one_call():
    rng = np.random.default_rng(4)
    test = jnp.asarray(rng.normal(size=(17, 12, 8)).astype(np.float32))
    bank = lambda m: MemoryBank(
        jnp.asarray(rng.normal(size=(m, 8)).astype(np.float32)), jnp.ones(m), jnp.arange(m)
    )
    a, b, c = bank(40), bank(40), bank(30)
    banks = {"x": Banks(cls=a, seg=c), "y": Banks(cls=b, seg=b)}
    args = (banks, test, (3, 4), (6, 8), scoring.Options(blur_sigma=1.0, chunk_size=9))
    whole = scoring.score_many(*args, vmap=True)
    done = []
    parts = scoring.score_many(*args, vmap=True, progress=done.append)
    assert sum(done) == 17 and len(done) > 1
    for name in banks:
        for x, y in zip(whole[name], parts[name]):
            np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_cpu_chunk_is_a_cache_sized_block():
    # M=10,000: an 8 MB block holds 209 rows -> the 256-row floor; M=2,000: 1,048 -> 1,024.
    assert scoring.chunk_size_for(10_000, platform="cpu") == 256
    assert scoring.chunk_size_for(2_000, platform="cpu") == 1024
    assert scoring.chunk_size_for(100, platform="cpu") == 16384
    for m in (100, 2_000, 10_000, 100_000):
        cpu = scoring.chunk_size_for(m, platform="cpu")
        assert cpu <= scoring.chunk_size_for(m, platform="gpu")
        assert cpu == 256 or cpu * 4 * m <= scoring.CPU_BLOCK_BYTES
        assert cpu & (cpu - 1) == 0


@cpu_only("chunk-size independence of the bits is a property of XLA's CPU kernels")
def test_chunk_size_keeps_indices_and_bits():
    """The nearest rows against a float64 brute force; chunked runs bitwise equal to each other
    and within float32 rounding of one unchunked call, with the same indices."""
    rng = np.random.default_rng(3)
    bank = jnp.asarray(rng.normal(size=(600, 64)).astype(np.float32))
    query = jnp.asarray(rng.normal(size=(1500, 64)).astype(np.float32))
    centre = ops.mean_row(bank)
    runs = {c: scoring._nearest(query, bank, c, centre) for c in (256, 300, 512, 2048)}
    d64 = np.linalg.norm(
        np.asarray(query, np.float64)[:, None] - np.asarray(bank, np.float64)[None], axis=-1
    )
    np.testing.assert_array_equal(np.asarray(runs[256][1]), d64.argmin(1))
    for c in (300, 512, 2048):
        np.testing.assert_array_equal(np.asarray(runs[c][1]), np.asarray(runs[256][1]))
    for c in (300, 512):
        assert np.asarray(runs[c][0]).tobytes() == np.asarray(runs[256][0]).tobytes()
    np.testing.assert_allclose(np.asarray(runs[2048][0]), np.asarray(runs[256][0]), rtol=2e-6)


@pytest.mark.parametrize(
    "chunk, queries, want",
    [(512, 784, 392), (512, 100, 512), (512, 1024, 512), (256, 1568, 224), (1000, 3001, 751)],
)
def test_balanced_chunks_split_evenly(chunk, queries, want):
    got = scoring.balanced(chunk, queries)
    assert got == want and got <= chunk
    # As many chunks as `chunk` gives, none of them larger than needed.
    assert -(-queries // got) == -(-queries // chunk)
    assert queries <= chunk or -(-queries // got) * got - queries < -(-queries // got)
