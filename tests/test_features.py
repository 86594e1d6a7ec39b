"""Feature extraction's batch shapes (features.batch_plan): exact cover, bounded compiled shapes, and
the same features as the padded fixed-size batches used before (the oracle: that path, written out
here with a zero-padded batch)."""

import jax.numpy as jnp
import numpy as np
import pytest

from softpatch_jax import features, weights


@pytest.mark.parametrize(
    "n, batch_size, sizes",
    [
        (0, 8, []),
        (1, 32, [1]),
        (20, 32, [16, 4]),
        (19, 8, [8, 8, 2, 1]),
        (32, 32, [32]),
        (33, 32, [32, 1]),
        (31, 32, [16, 8, 4, 2, 1]),
        (30, 24, [24, 4, 2]),
        (5, 1, [1, 1, 1, 1, 1]),
    ],
)
def test_batch_plan_hand_cases(n, batch_size, sizes):
    plan = features.batch_plan(n, batch_size)
    assert [size for _, size in plan] == sizes
    assert [start for start, _ in plan] == list(np.cumsum([0, *sizes])[:-1])


@pytest.mark.parametrize("batch_size", [1, 2, 7, 8, 24, 32])
def test_batch_plan_covers_exactly_with_few_shapes(batch_size):
    allowed = features.batch_sizes(batch_size)
    bound = int(np.floor(np.log2(batch_size))) + (1 if batch_size & (batch_size - 1) == 0 else 2)
    assert len(allowed) <= bound
    used = set()
    for n in range(0, 3 * batch_size + 2):
        plan = features.batch_plan(n, batch_size)
        covered = np.concatenate([np.arange(s, s + k) for s, k in plan]) if plan else []
        np.testing.assert_array_equal(covered, np.arange(n))
        used |= {k for _, k in plan}
    assert used <= set(allowed)
    assert features.batch_sizes(32) == (1, 2, 4, 8, 16, 32)
    assert features.batch_sizes(24) == (1, 2, 4, 8, 16, 24)
    with pytest.raises(ValueError, match="batch_size"):
        features.batch_sizes(0)


def _extractor(arch, crop, allow_random_init):
    bb = weights.Backbone(arch, "", "", "", allow_random_init, "float32")
    return features.build(features.Options(bb, 3, 64, 64, crop, 8))


def _padded_oracle(ex, images):
    """The former path: every batch zero-padded to batch_size, the real rows kept."""
    outs = []
    for start in range(0, len(images), ex.batch_size):
        batch = images[start : start + ex.batch_size]
        padded = np.zeros((ex.batch_size, *batch.shape[1:]), np.uint8)
        padded[: len(batch)] = batch
        outs.append(np.asarray(ex.apply(ex.variables, jnp.asarray(padded)))[: len(batch)])
    return np.concatenate(outs)


@pytest.mark.parametrize(
    "arch, crop, random_init",
    [("resnet_tiny", 32, True), ("efficientnet_lite0", 64, True)],
)
def test_bucketed_batches_equal_padded_batches(arch, crop, random_init):
    ex = _extractor(arch, crop, random_init)
    images = np.random.default_rng(0).integers(0, 255, (13, crop, crop, 3), dtype=np.uint8)
    ours = np.asarray(features.extract(ex, images))  # batches of 8, 4, 1
    assert ex.apply._cache_size() == 3
    oracle = _padded_oracle(ex, images)
    # A batch's size may change XLA's blocking of the sums, so float32 rounding, not bits: the
    # differences stay at float32 epsilon relative to the features' scale.
    scale = np.abs(oracle).max()
    np.testing.assert_allclose(ours, oracle, rtol=0, atol=4e-7 * scale)
    # One image costs one image: it runs as a batch of one (no further compile for batch 1).
    one = np.asarray(features.extract(ex, images[:1]))
    np.testing.assert_allclose(one, oracle[:1], rtol=0, atol=4e-7 * scale)
    assert ex.apply._cache_size() == 3
