"""Test-wide settings: CPU unless JAX_PLATFORMS says otherwise, float32, and implicit rank promotion
is an error (nanodo's habit); the persistent compilation cache is off (SOFTPATCH_COMPILE_CACHE).

On an accelerator (`JAX_PLATFORMS=cuda python -m pytest -q tests`): float32 matmuls and convolutions
default to full precision, as on a CPU (GPUs default to TF32, ~1e-3 relative, and the tests compare
with float64, scikit-learn and torch oracles at CPU tolerances); tests that hold only on XLA's CPU
backend are skipped with their reason (`-rs` lists them); the multi-device and subprocess tests run
their children on the CPU whatever the parent uses.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The command lines cache compiled programs under the user's cache folder (compile_cache.py); the
# tests (and the command lines they start) never write there.
os.environ["SOFTPATCH_COMPILE_CACHE"] = "off"

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

ACCELERATOR = jax.default_backend() != "cpu"
if ACCELERATOR:
    jax.config.update("jax_default_matmul_precision", "highest")


def cpu_only(reason: str):
    """Skips a test on accelerators, saying why it holds on XLA's CPU backend only."""
    return pytest.mark.skipif(ACCELERATOR, reason=f"CPU only: {reason}")


def pytest_report_header(config):
    lines = [f"jax backend: {jax.default_backend()} ({jax.device_count()} devices)"]
    if ACCELERATOR:
        lines.append(
            "accelerator: default matmul precision pinned to 'highest'; CPU-only tests skip "
            "with their reason (-rs)"
        )
    return lines


def dataset_options(**fields):
    """data.Options of configs/base.py's dataset section with `fields` changed."""
    from configs import base
    from softpatch_jax.experiment import options

    ds = base.get_config().dataset
    ds.update(fields)
    return options.dataset_options(ds)
