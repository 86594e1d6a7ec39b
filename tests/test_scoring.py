import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from softpatch_jax import scoring
from softpatch_jax.memory_bank import Banks, MemoryBank


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
