"""softpatch_jax: SoftPatch and SoftPatch+ anomaly detection with noisy training data, in JAX.

The library API (see README.md) is re-exported lazily so that `import softpatch_jax` stays cheap.
"""

__version__ = "0.1.0"
