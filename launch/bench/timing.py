"""Timing a stage: one call to compile, then the median of --repeats calls under
block_until_ready, with the stage's peak memory (the process's peak resident set, reset before each
stage, on CPU; the device's peak_bytes_in_use on accelerators)."""

from __future__ import annotations

import resource
import statistics
import time

import jax


def reset_peak() -> None:
    """Resets the kernel's peak-RSS mark (VmHWM) so the next reading covers one stage only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_bytes() -> dict:
    out = {"process_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    try:
        with open("/proc/self/status") as f:
            hwm = [ln for ln in f if ln.startswith("VmHWM:")]
        out["stage_peak_rss_gb"] = int(hwm[0].split()[1]) / 2**20
    except (OSError, IndexError):
        pass
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_gb"] = stats["peak_bytes_in_use"] / 2**30
    return out


def timed(fn, repeats: int) -> dict:
    """First call (compile + run), then the median of `repeats` calls, and the stage's peak memory."""
    reset_peak()
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"seconds": med, "first_call_s": first, "times": times, **peak_bytes()}
