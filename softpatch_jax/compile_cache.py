"""JAX's persistent compilation cache for the command lines, so a second run of the same command
compiles nothing (issue 26).

Every entry point (`softpatch_jax.main`, `launch.sweep`, `softpatch_jax.deploy`, `launch.bench`)
calls `enable(FLAG.value)` before its first jit. Compiled XLA executables are then kept under
`$SOFTPATCH_CACHE/jax_compile` (default `~/.cache/softpatch_jax/jax_compile`, beside the demo data),
keyed by JAX on the computation, its shapes, the jax/jaxlib version, the device and the XLA flags,
so a stale entry is never used: a changed program or version simply compiles again.

`--compile_cache=off` (or the environment variable `SOFTPATCH_COMPILE_CACHE=off`) turns it off; a
folder given either way is used instead of the default. The tests set `SOFTPATCH_COMPILE_CACHE=off`
(tests/conftest.py) so they never write into the user's cache.

At exit, one log line says what happened: how many computations were compiled (and their compile
seconds) and how many were loaded from the cache; "0 compiled" is the second run's signature.
"""

from __future__ import annotations

import atexit
import os
import threading

from absl import flags, logging

ENV = "SOFTPATCH_COMPILE_CACHE"
OFF = ("off", "0", "false", "no", "none")

FLAG = flags.DEFINE_string(
    "compile_cache",
    None,
    "Folder of JAX's persistent compilation cache; 'off' disables it. Default: "
    f"${ENV} if set, else $SOFTPATCH_CACHE/jax_compile (~/.cache/softpatch_jax/jax_compile).",
)

_counts = {"programs": 0, "seconds": 0.0, "cache_hits": 0}
_lock = threading.Lock()
_state = {"dir": None, "listening": False}


def cache_root() -> str:
    """The project's cache folder: $SOFTPATCH_CACHE, else ~/.cache/softpatch_jax."""
    return os.environ.get(
        "SOFTPATCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "softpatch_jax")
    )


def resolve(setting: str | None = None) -> str | None:
    """The cache folder for a flag value (None/"" = the environment, then the default), or None
    when the cache is off."""
    value = setting if setting else os.environ.get(ENV, "")
    if value.strip().lower() in OFF:
        return None
    return (
        os.path.abspath(os.path.expanduser(value))
        if value
        else os.path.join(cache_root(), "jax_compile")
    )


def _on_event(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        with _lock:
            _counts["cache_hits"] += 1


def _on_duration(event: str, duration: float, **_) -> None:
    # Timed around compile-or-load: a persistent cache hit counts here too.
    if event == "/jax/core/compile/backend_compile_duration":
        with _lock:
            _counts["programs"] += 1
            _counts["seconds"] += duration


def counts() -> dict:
    """Since `enable`: "programs" (executables obtained), "cache_hits" (of them, loaded from the
    persistent cache), "compiled" (the rest: compiled by XLA), "seconds" (spent obtaining them)."""
    with _lock:
        c = dict(_counts)
    return {**c, "compiled": c["programs"] - c["cache_hits"]}


def summary() -> str:
    c = counts()
    where = _state["dir"] or "off"
    return (
        f"jax compilation: {c['compiled']} compiled, {c['cache_hits']} loaded from the persistent "
        f"cache ({where}); {c['seconds']:.1f} s obtaining {c['programs']} programs"
    )


def _log_summary() -> None:
    logging.info("%s", summary())


def enable(setting: str | None = None) -> str | None:
    """Turns the persistent compilation cache on (unless `setting` or $SOFTPATCH_COMPILE_CACHE says
    off) and starts counting compilations; returns the folder, or None when off.

    Every computation is cached, however fast it compiled (JAX's default skips those under 1 s,
    which on a CPU is most of a predict's dozens of small programs).
    """
    import jax  # imported here: launch.bench sets XLA_FLAGS before jax starts

    path = resolve(setting)
    if not _state["listening"]:
        jax.monitoring.register_event_listener(_on_event)
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        atexit.register(_log_summary)
        _state["listening"] = True
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        _state["dir"] = None
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # a cache is an optimisation: never a reason to fail the run
        logging.warning("compilation cache off: cannot create %s (%s)", path, e)
        jax.config.update("jax_enable_compilation_cache", False)
        _state["dir"] = None
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _state["dir"] = path
    return path
