"""launch/fit_seconds.py: one row per (category, noise ratio, method), each method fitted alone, and
the table's means checked against hand-computed ones."""

import numpy as np
import pytest

from launch import fit_seconds
from softpatch_jax.data import demo
from tests.test_registered import TINY, _config


def test_table_is_the_mean_over_categories():
    rows = [
        {"category": "a", "noise_ratio": 0.0, "method": "patchcore", "fit_seconds": 1.0},
        {"category": "b", "noise_ratio": 0.0, "method": "patchcore", "fit_seconds": 2.0},
        {"category": "a", "noise_ratio": 0.0, "method": "inreach", "fit_seconds": 0.5},
        {"category": "b", "noise_ratio": 0.0, "method": "inreach", "fit_seconds": 0.25},
        {"category": "a", "noise_ratio": 0.2, "method": "patchcore", "fit_seconds": 3.0},
        {"category": "a", "noise_ratio": 0.2, "method": "inreach", "fit_seconds": 4.0},
    ]
    lines = fit_seconds.table(rows).splitlines()
    assert lines[0] == "| noise | patchcore | inreach |"
    assert lines[2] == "| 0.0 | 1.50 | 0.38 |"  # (1 + 2) / 2, (0.5 + 0.25) / 2
    assert lines[3] == "| 0.2 | 3.00 | 4.00 |"


@pytest.mark.slow
def test_every_method_is_fitted_alone_at_every_ratio(tmp_path):
    root = demo.write(str(tmp_path / "tiny"), TINY)
    c = _config(root)
    c.methods = "patchcore,softpatch_lof,inreach"
    rows = fit_seconds.fit_seconds(c, repeats=1)
    got = [(r["noise_ratio"], r["method"]) for r in rows]
    assert got == [(q, m) for q in (0.0, 0.25) for m in ("patchcore", "softpatch_lof", "inreach")]
    assert all(np.isfinite(r["fit_seconds"]) and r["fit_seconds"] > 0 for r in rows)
    assert {r["num_train"] for r in rows} == {TINY.num_train, TINY.num_train + 2}  # 25% of 8
