"""The heavy stages over every device: discriminators with positions sharded, the greedy coreset with
the patch pool sharded, nearest-neighbour scoring with the memory bank sharded (METHOD.md sections
3-5). Each returns what its one-device counterpart returns, on the first device, with the same bits.

How each stage splits:
- Discriminators (`discriminator_scores`): every position is independent, so each device scores its
  slice of positions with the one-device code (`discriminators.score_local`); the [P, N] scores are
  collected onto one device afterwards.
- Coreset (`prepare`, `select_many`, `select`, `greedy`): each device holds a slice of the pool's
  rows and its running min-distances (one per keep mask). A step, for every mask at once: local
  argmax; one all-gather of every device's (max, candidate row, its squared norm) and one of the
  candidates' global indices; the first device holding the global max wins (the one-device argmax's
  tie rule); every device lowers its min-distances with the winners' rows. Per step that moves
  ~8*K*(R+3) bytes between devices and reads the local rows once per block of masks.
- Scoring (`nearest`): each device searches its slice of the bank for every query; the global
  nearest is the device-local one with the smallest squared distance (first device on ties), and
  its directly recomputed distance is taken from the device that owns it ([devices, Q] candidates,
  picked after the sharded program).
Row-wise arithmetic is the same code on every slice and the means used for centring come from one
call of `ops.mean_row` on the whole array, which is what makes the results bitwise equal to one
device (tests/test_parallel.py checks it on 8 host devices).

On one host, the mesh spans `jax.devices()`. On CPU, XLA's `--xla_force_host_platform_device_count`
splits the host into several devices (how the tests run this code); they share the host's memory
and cores, so chunk budgets are divided among them. XLA's CPU runtime executes collectives on its
shared thread pool and blocks there until every device arrives: only the coreset loop keeps them
(one rendezvous per step, ~0.5 ms each on this 2-core host, so it is slower than one device there),
and inputs are waited for before a sharded program starts, so no half-finished program competes for
the pool (8 host devices on 2 cores deadlocked otherwise). Kernels that wait on that pool from
inside it deadlock the same way when every device is inside one: jaxlib's batched LAPACK Cholesky
did, with R = 128 and several chunks per device, so the discriminators factor their covariances with
matmuls instead (`discriminators.linalg.cholesky_inverse`; tests/test_parallel.py runs that case).
On a 2-core host the discriminators gain 1.5x on 2 host devices and 2.1x on 8; the coreset and
scoring lose (0.8x, 0.5x), hence `parallel.enabled=discriminators` for CPU-only machines.
Accelerators run collectives on their own streams; their speedups are unmeasured here.

Several hosts: start every process with the same inputs and call, before any other JAX call,

    jax.distributed.initialize(coordinator_address="host0:1234", num_processes=H, process_id=i)

(on Cloud TPU and under SLURM/Open MPI, `jax.distributed.initialize()` with no arguments finds
these). `jax.devices()` then lists every host's devices, the mesh spans them all, inputs are placed
with `jax.make_array_from_callback` (each process fills its own devices' slices from its host copy),
replicated results are read from a local device and sharded ones gathered with
`multihost_utils.process_allgather`. Not run here: one host only.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from softpatch_jax import coreset, discriminators, ops
from softpatch_jax.io_utils import split_list

AXIS = "shards"


def default_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process)."""
    return Mesh(np.asarray(list(devices or jax.devices())), (AXIS,))


STAGES = ("discriminators", "coreset", "scoring")


def enabled(value: str | bool, stage: str | None = None) -> bool:
    """Whether the pipeline should shard `stage` (one of `STAGES`; None: any of them) with this
    module, from the setting `value` (`config.parallel.enabled`): "auto" (more than one device),
    true/false, or a comma list of stages to shard, e.g. "discriminators" for a CPU host split into
    devices, where only the discriminators gain (bench: 2.1x on 8 host devices of 2 cores; coreset
    0.8x, scoring 0.5x)."""
    if stage is not None and stage not in STAGES:
        raise ValueError(f"unknown parallel stage {stage!r}; valid: {STAGES}")
    if isinstance(value, str):
        v = value.strip().lower()
        if v == "auto":
            return jax.device_count() > 1
        if v in ("true", "1", "yes"):
            return True
        if v in ("false", "0", "no", ""):
            return False
        listed = split_list(v)
        if not set(listed) <= set(STAGES):
            raise ValueError(
                "parallel.enabled must be auto, true, false or a comma list of stages from "
                f"{STAGES}, got {value!r}"
            )
        return stage in listed if stage is not None else True
    return bool(value)


def _place(x, m: Mesh, spec: P) -> jax.Array:
    """Puts a (host or one-device) array on the mesh with `spec`, once it is computed.

    Waiting first matters on CPU: a program still running on one device when a sharded program
    starts can leave the other devices blocked in a collective, holding threads of the pool that
    program needs (observed as a rendezvous timeout with 8 host devices on 2 cores).
    """
    x = jax.block_until_ready(x)
    sharding = NamedSharding(m, spec)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _local(x):
    """A replicated result as a plain array on this process's first device (no copy)."""
    return jax.tree.map(lambda a: a.addressable_data(0), x)


def _collect(x):
    """A sharded result, whole, on this process's first device, through the host (small arrays).

    Not an all-gather inside the sharded program: XLA's CPU runtime runs collectives on its shared
    thread pool, and devices that finish their share early block pool threads in the rendezvous
    that the others still need for their work; with 8 host devices on 2 cores that deadlocked.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return jax.tree.map(lambda a: jax.device_put(np.asarray(a), jax.local_devices()[0]), x)


def _pad(x: jax.Array, multiple: int, axis: int, mode: str = "constant") -> jax.Array:
    pad = (-x.shape[axis]) % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, mode=mode)


def _sharing_memory(m: Mesh) -> int:
    """How many mesh devices share one memory pool: all of them on CPU (host RAM), else one."""
    return m.size if m.devices.flat[0].platform == "cpu" else 1


# --- discriminators: positions sharded ---------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _discriminators_fn(m: Mesh, names: tuple, params: tuple, chunk: int, dtype: str):
    drawing = discriminators.needs_key(names)

    def local(pool_NxLxR, key):
        key = key if drawing else None  # a placeholder where none draws
        return discriminators.score_local(pool_NxLxR, names, params, chunk, dtype, key)

    return jax.jit(
        jax.shard_map(
            local, mesh=m, in_specs=(P(None, AXIS, None), P()), out_specs=P(AXIS), check_vma=False
        )
    )


def discriminator_scores(
    pool_NxPxR: jax.Array,
    names: tuple[str, ...],
    params: Mapping[str, Any] | None,
    chunk_size: int,
    score_dtype: str = "auto",
    key: jax.Array | None = None,
    mesh: Mesh | None = None,
) -> dict[str, jax.Array]:
    """`discriminators.score_pool` with positions sharded: {name: [P, N]}. The key (for
    discriminators that draw) is replicated: every position sees the same draws, as on one device.

    chunk_size: positions per chunk for one device with the whole memory to itself; divided among
    devices that share memory.
    """
    m = mesh or default_mesh()
    p = pool_NxPxR.shape[1]
    chunk = max(1, chunk_size // _sharing_memory(m))
    # Edge padding repeats the last position: real data, so no degenerate covariance; trimmed below.
    # Every device gets at least 2 positions: a batch of one compiles differently (see
    # `discriminators._batch`).
    multiple = m.size * (2 if p > 1 else 1)
    x = _place(_pad(pool_NxPxR, multiple, axis=1, mode="edge"), m, P(None, AXIS, None))
    names = discriminators.check_names(names)
    settings = discriminators.settings(names, params, pool_NxPxR.shape[0])
    key = discriminators.checked_key(names, key)
    key = _place(jax.random.key_data(jax.random.key(0)) if key is None else key, m, P())
    out = _collect(_discriminators_fn(m, names, settings, chunk, score_dtype)(x, key))
    return {k: v[:p] for k, v in out.items()}


# --- coreset: pool rows sharded ----------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _prepare_fn(m: Mesh):
    spec = coreset.Prepared(P(None, AXIS), P(AXIS), P(AXIS))
    return jax.jit(
        jax.shard_map(
            coreset.prepare_rows,
            mesh=m,
            in_specs=(P(AXIS, None), P(), P()),
            out_specs=spec,
            check_vma=False,
        )
    )


def prepare(
    feats_NxR: jax.Array, starts_S: jax.Array, mesh: Mesh | None = None
) -> coreset.Prepared:
    """`coreset.prepare` with the pool's rows sharded (padded with zero rows to a multiple of the
    device count; `select` never picks them)."""
    m = mesh or default_mesh()
    centre = ops.mean_row(feats_NxR)
    start_rows = feats_NxR[starts_S]
    x = _place(_pad(feats_NxR, m.size, axis=0), m, P(AXIS, None))
    return _prepare_fn(m)(x, _place(centre, m, P()), _place(start_rows, m, P()))


@functools.lru_cache(maxsize=32)
def _init_fn(m: Mesh, strict: bool):
    def local(start_L, keep_KxL, valid_L):
        # Padding rows start at -1 and stay there (min with a step's 0 or -1), strict or not.
        return jnp.where(valid_L, coreset.initial_distances(start_L, keep_KxL, strict), -1.0)

    spec = (P(AXIS), P(None, AXIS), P(AXIS))
    return jax.jit(
        jax.shard_map(local, mesh=m, in_specs=spec, out_specs=P(None, AXIS), check_vma=False)
    )


@functools.lru_cache(maxsize=32)
def _select_fn(m: Mesh, strict: bool):
    def local(x_RxL, x_sq_L, keep_KxL, min_d_KxL, picked_KxM, lo, hi):
        me = jax.lax.axis_index(AXIS)
        offset = me * x_sq_L.shape[0]
        rows = jnp.arange(keep_KxL.shape[0])

        def step(i, carry):
            min_d, picked = carry
            lj_K = ops.first_argmax(min_d)
            c_KxR = jnp.take(x_RxL, lj_K, axis=1).T
            # One gather carries every device's candidates: min-distance, squared norm and row.
            cand = jnp.concatenate([min_d[rows, lj_K][:, None], x_sq_L[lj_K][:, None], c_KxR], 1)
            all_cand = jax.lax.all_gather(cand, AXIS)  # [devices, K, R + 2]
            all_idx = jax.lax.all_gather((lj_K + offset).astype(jnp.int32), AXIS)  # [devices, K]
            best_K = jnp.argmax(all_cand[:, :, 0], axis=0)  # first device on ties: first index
            win = all_cand[best_K, rows]
            d = coreset.step_distances(x_RxL, x_sq_L, win[:, 2:], win[:, 1])
            min_d = jnp.minimum(min_d, coreset.masked_step(d, keep_KxL, strict))
            mine = jnp.where(me == best_K, -1.0, min_d[rows, lj_K])
            min_d = min_d.at[rows, lj_K].set(mine)
            return min_d, picked.at[:, i].set(all_idx[best_K, rows])

        return jax.lax.fori_loop(lo, hi, step, (min_d_KxL, picked_KxM))

    spec = (P(None, AXIS), P(AXIS), P(None, AXIS), P(None, AXIS), P(), P(), P())
    return jax.jit(
        jax.shard_map(local, mesh=m, in_specs=spec, out_specs=(P(None, AXIS), P()), check_vma=False)
    )


def select_many(
    prepared: coreset.Prepared,
    keep_KxN: jax.Array,
    num_samples: int,
    mesh: Mesh | None = None,
    strict: bool = False,
    progress=None,
) -> jax.Array:
    """`coreset.select_many` on `prepare`'s sharded inputs: indices [K, num_samples] into the
    unpadded pool, bitwise those of one device (progress: as there)."""
    m = mesh or default_mesh()
    n = keep_KxN.shape[1]
    keep = _place(_pad(keep_KxN, m.size, axis=1), m, P(None, AXIS))  # padding rows: never picked
    valid = _place(_pad(jnp.ones((n,), bool), m.size, axis=0), m, P(AXIS))
    carry = (
        _init_fn(m, bool(strict))(prepared.start_N, keep, valid),
        _place(jnp.zeros((keep.shape[0], int(num_samples)), jnp.int32), m, P()),
    )
    fn = _select_fn(m, bool(strict))
    for lo, hi in coreset.segments(int(num_samples), progress):
        carry = fn(prepared.x_RxN, prepared.x_sq_N, keep, *carry, jnp.int32(lo), jnp.int32(hi))
        if progress is not None:
            jax.block_until_ready(carry)
            progress(hi - lo)
    return _local(carry[1])


def select(
    prepared: coreset.Prepared,
    keep_N: jax.Array,
    num_samples: int,
    mesh: Mesh | None = None,
    strict: bool = False,
    progress=None,
) -> jax.Array:
    """`coreset.select` on `prepare`'s sharded inputs: indices [num_samples] into the unpadded pool."""
    return select_many(prepared, keep_N[None], num_samples, mesh, strict, progress)[0]


def greedy(
    feats_NxR: jax.Array,
    keep_N: jax.Array,
    starts_S: jax.Array,
    num_samples: int,
    mesh: Mesh | None = None,
    strict: bool = False,
) -> jax.Array:
    """`coreset.greedy` with the pool sharded; bitwise the same indices."""
    m = mesh or default_mesh()
    return select(prepare(feats_NxR, starts_S, m), keep_N, num_samples, m, strict)


# --- scoring: memory bank sharded --------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _nearest_fn(m: Mesh, chunk_size: int):
    def local(query_QxD, bank_LxD, valid_L, centre_1xD):
        offset = jax.lax.axis_index(AXIS) * bank_LxD.shape[0]
        bank = bank_LxD.astype(jnp.float32) - centre_1xD
        bank_sq = jnp.where(valid_L, ops.sq_norms(bank), jnp.inf)

        def chunk(q):
            best, idx, dist = ops.nearest_rows(q.astype(jnp.float32) - centre_1xD, bank, bank_sq)
            return best, dist, (idx + offset).astype(jnp.int32)

        # Each device's candidates [1, Q]; the global pick happens after (no collective inside).
        return jax.tree.map(lambda a: a[None], ops.chunked_map(chunk, query_QxD, chunk_size))

    spec = (P(), P(AXIS, None), P(AXIS), P())
    return jax.jit(jax.shard_map(local, mesh=m, in_specs=spec, out_specs=P(AXIS), check_vma=False))


@jax.jit
def _pick_nearest(best_KxQ: jax.Array, dist_KxQ: jax.Array, idx_KxQ: jax.Array):
    win = jnp.argmin(best_KxQ, axis=0)[None]  # first device on ties = the lowest global index
    pick = lambda a: jnp.take_along_axis(a, win, axis=0)[0]
    return pick(dist_KxQ), pick(idx_KxQ)


def nearest(
    query_QxD: jax.Array, bank_MxD: jax.Array, chunk_size: int, mesh: Mesh | None = None
) -> tuple[jax.Array, jax.Array]:
    """`scoring.nearest` with the bank's rows sharded: distance [Q] and bank index [Q]."""
    m = mesh or default_mesh()
    centre = ops.mean_row(bank_MxD)
    valid = _pad(jnp.ones((bank_MxD.shape[0],), bool), m.size, axis=0)
    bank = _place(_pad(bank_MxD, m.size, axis=0), m, P(AXIS, None))
    fn = _nearest_fn(m, int(chunk_size))
    out = fn(_place(query_QxD, m, P()), bank, _place(valid, m, P(AXIS)), _place(centre, m, P()))
    return _pick_nearest(*_collect(out))
