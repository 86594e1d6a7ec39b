"""Test-wide settings: CPU, float32, and implicit rank promotion is an error (nanodo's habit)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
