"""softpatch_jax: SoftPatch and SoftPatch+ anomaly detection with noisy training data, in JAX.

The library API (README.md) lives in its modules: `memory_bank.fit`, `scoring.predict`,
`metrics.evaluate`. Importing the package itself imports nothing else.
"""

__version__ = "0.1.0"
