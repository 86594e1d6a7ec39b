"""The sharded stages on 8 host devices equal the one-device functions bit for bit.

JAX fixes its device count when it starts, so the 8-device checks run in a child Python started
with XLA_FLAGS=--xla_force_host_platform_device_count=8; it prints one JSON line of verdicts.
"""

import json
import os
import subprocess
import sys

import pytest

from softpatch_jax import discriminators, parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json
import jax
import ml_collections
jax.config.update("jax_numpy_rank_promotion", "raise")
import jax.numpy as jnp
import numpy as np
from configs import base
from softpatch_jax import coreset, discriminators, memory_bank, methods, parallel, scoring
from softpatch_jax.experiment import options
from softpatch_jax.memory_bank import MemoryBank

out = {"devices": jax.device_count()}
same = lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b)))
rng = np.random.default_rng(0)
PARAMS = {"lof_k": 6, "gaussian_eps": 0.01}
KEY = jax.random.key(7)  # for registered discriminators that draw: replicated, same draws

# Discriminators (every registered one): 37 positions (not a multiple of 8), chunks of 3 positions
# per device.
pool = jnp.asarray(rng.normal(size=(30, 37, 12)).astype(np.float32) + 2.0)
names = discriminators.NAMES
one = discriminators.score_pool(pool, names, PARAMS, 24, key=KEY)
many = parallel.discriminator_scores(pool, names, PARAMS, 24, key=KEY)
small = parallel.discriminator_scores(pool, names, PARAMS, 8, key=KEY)  # 1 position per chunk
out["discriminators"] = {k: same(one[k], many[k]) and same(one[k], small[k]) for k in names}
# Fewer images than dimensions: the Gaussian goes through the [N, N] Gram matrix instead.
wide = jnp.asarray(rng.normal(size=(10, 19, 16)).astype(np.float32))
one = discriminators.score_pool(wide, names, PARAMS, 4, key=KEY)
many = parallel.discriminator_scores(wide, names, PARAMS, 4, key=KEY)
out["discriminators_n_below_r"] = {k: same(one[k], many[k]) for k in names}

# Coreset: a pool of 1110 rows with duplicated rows spread over shards (ties in the argmax).
x = rng.normal(size=(1110, 12)).astype(np.float32) * rng.uniform(0.5, 3.0, 12).astype(np.float32)
x[700:760] = x[10:70]
keep = jnp.asarray(rng.random(1110) > 0.15)
starts = jnp.asarray(rng.choice(1110, 10, replace=False))
a = coreset.greedy(jnp.asarray(x), keep, starts, num_samples=300)
b = parallel.greedy(jnp.asarray(x), keep, starts, num_samples=300)
out["coreset"] = same(a, b)
# The reference's unmasked first pick (coreset.strict_parity): the same on shards.
out["coreset_strict"] = same(
    coreset.greedy(jnp.asarray(x), keep, starts, num_samples=300, strict=True),
    parallel.greedy(jnp.asarray(x), keep, starts, num_samples=300, strict=True),
)
ties = jnp.zeros((50, 4), jnp.float32)  # every distance 0: picks must follow the index order
out["coreset_ties"] = same(
    coreset.greedy(ties, jnp.ones(50, bool), jnp.arange(3), num_samples=20),
    parallel.greedy(ties, jnp.ones(50, bool), jnp.arange(3), num_samples=20),
)

# Several masks in one loop (5: not a multiple of the block), R = 128 and duplicated rows: each
# row equals the one-device loop on that mask alone, strict or not, with or without progress.
wide_x = rng.normal(size=(1110, 128)).astype(np.float32) + 1.0
wide_x[700:760] = wide_x[10:70]
keeps = jnp.asarray(rng.random((5, 1110)) > rng.uniform(0.05, 0.4, (5, 1)))
prep1 = coreset.prepare(jnp.asarray(wide_x), starts)
prep8 = parallel.prepare(jnp.asarray(wide_x), starts)
out["select_many"] = all(
    same(
        parallel.select_many(prep8, keeps, 150, strict=strict, progress=progress),
        jnp.stack([coreset.select(prep1, k, 150, strict=strict) for k in keeps]),
    )
    for strict in (False, True)
    for progress in (None, lambda _: None)
)

# Scoring: a bank of 203 rows (padded to 208), queries in chunks of 64.
bank = MemoryBank(
    jnp.asarray(rng.normal(size=(203, 32)).astype(np.float32)),
    jnp.asarray(rng.uniform(1.0, 2.0, 203).astype(np.float32)),
    jnp.arange(203),
)
test = jnp.asarray(rng.normal(size=(3, 50, 32)).astype(np.float32))
out["patch_scores"] = same(
    scoring.patch_scores(bank, test, 64), scoring.patch_scores(bank, test, 64, parallel=True)
)

# The library path: fit_many and predict with and without parallel.
cfg = base.get_config()
cfg.softpatch.projection_dim = 8
feats = jnp.asarray(rng.normal(size=(14, 36, 16)).astype(np.float32))
specs = [methods.spec("softpatch_plus", options.method_options(cfg))]
f1 = memory_bank.fit_many(jax.random.key(3), feats, options.fit_options(cfg), specs, parallel=False)
f2 = memory_bank.fit_many(jax.random.key(3), feats, options.fit_options(cfg), specs, parallel=True)
b1, b2 = f1.banks["softpatch_plus"], f2.banks["softpatch_plus"]
out["fit_many"] = all(
    same(getattr(getattr(b1, s), f), getattr(getattr(b2, s), f))
    for s in ("cls", "seg")
    for f in ("index_M", "weights_M", "feats_MxD")
) and all(same(f1.scores_NxP[k], f2.scores_NxP[k]) for k in f1.scores_NxP)
cfg.parallel = ml_collections.ConfigDict({"enabled": "discriminators"})  # that stage only
f3 = memory_bank.fit_many(jax.random.key(3), feats, options.fit_options(cfg), specs)
b3 = f3.banks["softpatch_plus"]
out["fit_many_stage_list"] = all(
    same(getattr(getattr(b1, s), f), getattr(getattr(b3, s), f))
    for s in ("cls", "seg")
    for f in ("index_M", "weights_M", "feats_MxD")
)
p1 = scoring.predict(b1, feats[:3], (6, 6), (24, 24), 4.0, 32)
p2 = scoring.predict(b1, feats[:3], (6, 6), (24, 24), 4.0, 32, parallel=True)
out["predict"] = same(p1[0], p2[0]) and same(p1[1], p2[1])
cfg.parallel = ml_collections.ConfigDict({"enabled": "auto"})
out["auto"] = parallel.enabled(cfg.parallel.enabled)
print(json.dumps(out))
"""


# Several chunks per device, R = 128: jaxlib's LAPACK Cholesky spread its batch over the shared
# thread pool and waited there, so with both devices inside it this hung forever (on 2 cores).
DEADLOCK_CHILD = r"""
import json
import jax
import jax.numpy as jnp
import numpy as np
from softpatch_jax import discriminators, parallel

rng = np.random.default_rng(0)
PARAMS = {"lof_k": 6, "gaussian_eps": 0.01}
pool = jnp.asarray(rng.normal(size=(100, 16, 128)).astype(np.float32))
names = ("nearest", "gaussian", "lof")
many = parallel.discriminator_scores(pool, names, PARAMS, 4)
one = discriminators.score_pool(pool, names, PARAMS, 4)
same = {k: bool(np.array_equal(np.asarray(one[k]), np.asarray(many[k]))) for k in names}
print(json.dumps({"devices": jax.device_count(), "same": same}))
"""


def run_child(code: str, devices: int, timeout: float | None = None) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {devices}-device child did not finish in {timeout} s (deadlock?)")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def child_result():
    return run_child(CHILD, 8)


def test_discriminators_with_several_chunks_per_host_device_finish():
    result = run_child(DEADLOCK_CHILD, 2, timeout=180)
    assert result["devices"] == 2
    assert result["same"] == {"nearest": True, "gaussian": True, "lof": True}


def test_child_sees_eight_devices(child_result):
    assert child_result["devices"] == 8
    assert child_result["auto"] is True  # "auto" turns the sharded path on with >1 device


def test_discriminators_bitwise_equal(child_result):
    every = {name: True for name in discriminators.NAMES}  # each registered one, bootstrap too
    assert child_result["discriminators"] == every
    assert child_result["discriminators_n_below_r"] == every


def test_coreset_indices_bitwise_equal_including_ties(child_result):
    assert child_result["coreset"]
    assert child_result["coreset_strict"]
    assert child_result["coreset_ties"]


def test_select_many_bitwise_equal_to_separate_one_device_loops(child_result):
    assert child_result["select_many"]


def test_scoring_and_library_path_equal(child_result):
    assert child_result["patch_scores"]
    assert child_result["fit_many"]
    assert child_result["fit_many_stage_list"]
    assert child_result["predict"]


def test_enabled_reads_the_setting():
    assert parallel.enabled("auto") is False  # one device in the test process
    assert parallel.enabled("true") is True
    assert parallel.enabled(False) is False
    with pytest.raises(ValueError, match="auto, true, false or a comma list"):
        parallel.enabled("sometimes")
    only = "discriminators, scoring"
    assert [parallel.enabled(only, s) for s in parallel.STAGES] == [True, False, True]
    with pytest.raises(ValueError, match="unknown parallel stage"):
        parallel.enabled(only, "features")
