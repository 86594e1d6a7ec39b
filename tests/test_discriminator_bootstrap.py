"""The bootstrap discriminator (MeDS step 1) against a numpy brute force with the same draws, and
its reach through the registry: method name, config validation, sweep axis, cache parameter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from configs.sweeps import discriminators as disc_sweep
from softpatch_jax import discriminators, methods
from softpatch_jax.discriminators import bootstrap
from softpatch_jax.experiment import config_errors, options

KEY = jax.random.key(3)


def brute_force(x_PxNxR: np.ndarray, picked_BxNxN: np.ndarray) -> np.ndarray:
    x = x_PxNxR.astype(np.float64)
    p, n, _ = x.shape
    out = np.zeros((p, n))
    for q in range(p):
        for i in range(n):
            dists = []
            for b in range(picked_BxNxN.shape[0]):
                js = np.flatnonzero(picked_BxNxN[b, i])
                dists.append(min(np.linalg.norm(x[q, i] - x[q, j]) for j in js))
            out[q, i] = np.mean(dists)
    return out


def test_draws_are_exact_size_subsets_of_the_other_images():
    picked = np.asarray(bootstrap.draws(jax.random.key(0), 9, 5, 3))
    assert picked.shape == (5, 9, 9)
    assert (picked.sum(-1) == 3).all()
    assert not picked[:, np.arange(9), np.arange(9)].any()  # never the patch's own image
    assert len({picked[b].tobytes() for b in range(5)}) == 5  # B different draws


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_bootstrap_matches_numpy_brute_force_with_the_same_draws(fraction):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 14, 6)).astype(np.float32)
    x[:, 3] += 6.0  # one defective image: far from every sub-bank
    params = {"bootstrap_banks": 4, "bootstrap_fraction": fraction}
    got = np.asarray(
        discriminators.score(jnp.asarray(x), ("bootstrap",), params, chunk_size=2, key=KEY)[
            "bootstrap"
        ]
    )
    m = bootstrap.bank_size(fraction, 14)
    assert m == max(1, round(fraction * 13))
    picked = np.asarray(
        bootstrap.draws(discriminators.discriminator_key(KEY, "bootstrap"), 14, 4, m)
    )
    np.testing.assert_allclose(got, brute_force(x, picked), rtol=1e-4, atol=1e-5)
    assert (got.argmax(axis=1) == 3).all()


def test_bootstrap_is_deterministic_per_key_and_needs_one():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 10, 4)).astype(np.float32))
    a = discriminators.score(x, ("bootstrap",), key=KEY)["bootstrap"]
    b = discriminators.score(x, ("bootstrap", "lof"), key=KEY)["bootstrap"]
    c = discriminators.score(x, ("bootstrap",), key=jax.random.key(4))["bootstrap"]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # other names change no draw
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    with pytest.raises(ValueError, match="pass a key"):
        discriminators.score(x, ("bootstrap",))


def test_bootstrap_reaches_methods_config_and_sweeps_through_the_registry():
    assert "bootstrap" in discriminators.NAMES
    spec = methods.spec("softpatch_bootstrap", options.method_options(base.get_config()))
    assert spec.cls.removal == ("bootstrap",) and spec.cls.soft_weight == "bootstrap"
    c = base.get_config()
    assert c.softpatch.bootstrap_banks == 10 and c.softpatch.bootstrap_fraction == 0.1
    c.softpatch.discriminator = "bootstrap"
    config_errors.validate(c)
    c.softpatch.bootstrap_fraction = 0.0
    with pytest.raises(config_errors.ConfigError, match="bootstrap_fraction"):
        config_errors.validate(c)
    assert "bootstrap" in disc_sweep.SUBSETS
    settings = discriminators.settings(("bootstrap",), {}, 20)
    assert discriminators.cache_param("bootstrap", settings, "float32") == [10, 0.1]
