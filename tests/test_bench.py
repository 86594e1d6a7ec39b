"""A tiny smoke run of launch/bench.py (every stage, the reference loops, 2 host devices): it must
finish and write a report whose figures hang together. Timings themselves are not asserted."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_smoke_run(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "launch.bench",
        "--n=12",
        "--p=16",
        "--d=32",
        "--r=8",
        "--test_images=2",
        "--feature_images=2",
        "--batch_size=2",
        "--arch=resnet_tiny",
        "--image_size=64",
        "--repeats=1",
        "--coreset_ratio=0.2",
        "--reference_impl",
        "--reference_coreset_steps=5",
        "--bandwidth_mib=8",
        "--host_devices=2",
        "--stages=all",
        f"--out={out}",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "RANDOM-INIT" in proc.stdout
    report = json.loads(out.read_text())
    rows = {r["stage"]: r for r in report["rows"]}
    assert set(rows) == {
        "features",
        "discriminators",
        "coreset",
        "scoring",
        "maps",
        "end_to_end",
        "parallel",
    }
    assert rows["features"]["weights"] == "random-init"
    assert rows["features"]["out_shape"] == [2, 8, 8, 32]
    disc = rows["discriminators"]
    assert disc["reference"]["impl"].startswith("re-implementation")
    assert disc["reference"]["lof_max_rel_diff_vs_ours"] < 1e-3  # same LOF as scikit-learn
    core = rows["coreset"]
    assert core["samples"] == int(0.2 * 12 * 16)
    assert core["loop_body"]["parsed"]
    assert any(op.startswith("dot") for op in core["loop_body"]["ops_reading_pool"])
    assert rows["end_to_end"]["bank_sizes"] == [38, 38]
    par = rows["parallel"]
    assert par["devices"] == 2
    assert all(par[k]["bitwise_equal"] for k in ("discriminators", "coreset", "scoring"))
