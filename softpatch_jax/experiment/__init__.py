"""The experiment driver and what it needs: a config expanded into a grid of cells, each cell one
results row (a plain run is the grid of its categories x noise ratios x methods, with no axes).

  grid.py     cells and their content keys (cell id, fit group, noisy set), `parse_ratios`
  plan.py     the cells checked, categories read and noisy sets drawn before any work; root keys
  stages.py   feature extraction, the fitting path through the cache, scoring (vmapped over banks)
  cache.py    content-keyed features and discriminator scores (on disk for a sweep, else memory)
  jsonl.py    results.jsonl: appended and fsynced per cell, torn last line dropped on resume
  outputs.py  a cell's results row and saved maps; a plain run's results.json/csv, summary.md
  driver.py   `run` (a plain run: `main.py`, notebooks), `sweep` (`launch/sweep.py`), `execute`

Imports flow down that list. Importing the package itself imports nothing.
"""
