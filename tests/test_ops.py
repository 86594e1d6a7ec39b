import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softpatch_jax import ops


def test_cpu_budget_comes_from_available_memory_and_chunks_are_powers_of_two():
    free = ops.device_memory_bytes()
    assert free >= 1 << 28
    avail = ops.host_available_bytes()
    if jax.devices()[0].platform == "cpu" and avail is not None:
        assert abs(free - avail) < 0.25 * avail  # the host's available memory, not a fixed 4 GiB
    for per_row, budget in [(1000, 10_000_000), (7, 1 << 30), (10**12, 1 << 20)]:
        rows = ops.chunk_rows(per_row, budget)
        assert rows >= 1 and rows & (rows - 1) == 0
        assert rows == 1 or rows * per_row <= budget // 4


@pytest.mark.parametrize("n,chunk", [(10, 3), (9, 3), (5, 8), (1, 1)])
def test_chunked_map_overlaps_the_last_chunk_instead_of_padding(n, chunk):
    x = jnp.arange(n * 2, dtype=jnp.float32).reshape(n, 2)
    got = ops.chunked_map(lambda c: (c * 2.0, c[:, 0] + 1.0), x, chunk)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(x) * 2.0)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(x)[:, 0] + 1.0)


def test_fixed_order_sum_matches_numpy_and_ignores_the_block_size():
    x = np.random.default_rng(0).normal(size=(1110, 13)).astype(np.float32)
    whole = np.asarray(jax.jit(ops.sq_norms)(jnp.asarray(x)))
    part = np.asarray(jax.jit(ops.sq_norms)(jnp.asarray(x[:139])))
    np.testing.assert_array_equal(whole[:139], part)
    np.testing.assert_allclose(whole, (x.astype(np.float64) ** 2).sum(1), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(ops.fixed_order_mean(jnp.asarray(x), axis=0)), x.mean(0), atol=1e-6
    )
