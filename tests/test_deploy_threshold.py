"""The held-out folds' coresets, selected together in one pass, equal one greedy run per fold."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import demo
from softpatch_jax import coreset, memory_bank, scoring
from softpatch_jax.deploy import threshold
from softpatch_jax.experiment import options
from softpatch_jax.memory_bank import MemoryBank


def test_heldout_scores_equal_one_coreset_per_fold():
    rng = np.random.default_rng(0)
    n, p, d = 12, 20, 8
    feats = jnp.asarray(rng.normal(size=(n, p, d)).astype(np.float32))
    pool = feats.reshape(n * p, d)
    keep = jnp.asarray(rng.random((n, p)) > 0.1)
    weights = jnp.asarray(rng.uniform(1.0, 2.0, (n, p)).astype(np.float32))
    starts = jnp.arange(0, n * p, 17)
    fold = threshold.fold_of(n, 4, seed=0)
    cfg = demo.get_config()
    cfg.softpatch.projection_dim = 0
    prepared = memory_bank.prepare(
        jax.random.key(0), feats, options.fit_options(cfg), (), starts=starts
    )
    got = threshold.heldout_patch_scores(prepared, feats, keep, weights, 0.2, fold, 64)
    for k in np.unique(fold):
        held = fold == k
        train_keep = keep.reshape(-1) & ~jnp.asarray(np.repeat(held, p))
        m = coreset.num_samples(0.2, int(n - held.sum()) * p, int(jnp.sum(train_keep)))
        idx = coreset.greedy(pool, train_keep, starts, num_samples=m)
        bank = MemoryBank(pool[idx], weights.reshape(-1)[idx], idx)
        want = scoring.patch_scores(bank, feats[np.flatnonzero(held)], 64)
        np.testing.assert_array_equal(got[held], np.asarray(want))
