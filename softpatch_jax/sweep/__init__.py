"""Batched ablation sweeps: a run config plus a grid, run in one process with features and
discriminator scores computed once and cached, resumable cell by cell (see engine.py)."""

from softpatch_jax.sweep.engine import RESULTS, STATS, Interrupted, run
from softpatch_jax.sweep.grid import Cell, axes, expand

__all__ = ["RESULTS", "STATS", "Cell", "Interrupted", "axes", "expand", "run"]
