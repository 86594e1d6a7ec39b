"""What bounds the coreset loop: the ops of its compiled loop body that read the [R, N] pool
(parsed from the optimised HLO text), and the memory bandwidth a few streaming kernels reach."""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from launch.bench.timing import timed
from softpatch_jax import coreset, ops


def loop_body_reads(prepared, keep, m: int) -> dict:
    """The compiled coreset loop body's ops that take the [R, N] pool as an operand."""
    # The loop itself is `coreset._steps` (`select` runs it in segments from `_init`'s carry).
    keep_K = keep[None]
    carry = coreset._init(prepared, keep_K, m, False)
    lowered = coreset._steps.lower(prepared, keep_K, carry, jnp.int32(0), jnp.int32(m), False)
    text = lowered.compile().as_text()
    r, n = prepared.x_RxN.shape
    body_name = re.search(r"while\(.*?body=%?([\w.\-]+)", text)
    if body_name is None:
        return {"parsed": False}
    start = text.index(body_name.group(1) + " ")
    block = text[start : text.index("\n}", start)]
    shape = f"f32[{r},{n}]"
    big = {
        m_.group(1)
        for m_ in re.finditer(
            r"%([\w.\-]+) = " + re.escape(shape) + r"\S* get-tuple-element", block
        )
    }
    readers = []
    for line in block.splitlines():
        mm = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\((.*)", line)
        if mm and mm.group(2) not in ("tuple", "get-tuple-element"):
            if any(f"%{b}" in mm.group(3) for b in big):
                readers.append(f"{mm.group(2)} {mm.group(1)}")
    return {"parsed": True, "ops_reading_pool": readers, "ops_in_body": block.count(" = ")}


def bandwidth(mib: int) -> dict:
    """Achievable memory bandwidth (GB/s) by a few streaming kernels on the first device."""
    n = (mib << 20) // 4
    x = jnp.ones((n,), jnp.float32)
    out = {}
    s = jax.jit(jnp.sum)
    out["jnp_sum_read"] = 4 * n / timed(lambda: s(x), 5)["seconds"] / 1e9
    scale = jax.jit(lambda a: a * 1.0001, donate_argnums=0)
    box = [jnp.ones((n,), jnp.float32)]

    def in_place():
        box[0] = scale(box[0])
        return box[0]

    out["jnp_scale_in_place_read_write"] = 8 * n / timed(in_place, 5)["seconds"] / 1e9
    mat = x.reshape(128, n // 128)
    c = jnp.ones((128,), jnp.float32)
    vm = jax.jit(ops.matmul)
    out["jnp_vecmat_read"] = 4 * n / timed(lambda: vm(c, mat), 5)["seconds"] / 1e9
    host = np.ones((n,), np.float32)
    t0 = time.perf_counter()
    for _ in range(5):
        host.sum()
    out["numpy_sum_read"] = 4 * n * 5 / (time.perf_counter() - t0) / 1e9
    out["best_generic"] = max(out["jnp_sum_read"], out["jnp_scale_in_place_read_write"])
    return out
