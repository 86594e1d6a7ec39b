"""The benchmark of every heavy stage on synthetic arrays of the real shapes; run it as
`python -m launch.bench` (flags and what each stage measures: `__main__.py`).

  timing.py      compile once, then the median of --repeats calls; the stage's peak memory
  inputs.py      synthetic pools and features (device, host or generated on demand)
  reference.py   the authors' code (--reference_path) or its re-implementation, same arrays
  hardware.py    the coreset loop body's pool reads (compiled HLO) and the memory bandwidth
  kernels.py     stages: features, discriminators, coreset, scoring, maps
  end_to_end.py  stage: fit_many + predict
  sharded.py     stage: sharded against one device
  driver.py      the stage registry, the table, the JSON report

Nothing here imports jax at package import: `__main__` sets XLA_FLAGS (--host_devices) first.
"""
