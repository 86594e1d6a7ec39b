"""A tiny smoke run of launch/bench/ (every stage, the reference loops, 2 host devices): it must
finish and write a report whose figures hang together. Timings themselves are not asserted."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_smoke_run(tmp_path):
    pytest.importorskip("torch", reason="--reference_impl runs the reference loops in torch")
    pytest.importorskip("sklearn", reason="--reference_impl runs scikit-learn's LOF")
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
    # The step's product reads the pool (a dot, or a fusion XLA builds around it) besides the
    # gather of the picked column; nothing else in the loop body touches it.
    reads = core["loop_body"]["ops_reading_pool"]
    assert any(op.startswith(("dot", "fusion")) for op in reads) and len(reads) <= 2, reads
    assert rows["end_to_end"]["bank_sizes"] == [38, 38]
    par = rows["parallel"]
    assert par["devices"] == 2
    assert all(par[k]["bitwise_equal"] for k in ("discriminators", "coreset", "scoring"))


FAKE_AUTHORS_FILE = """
import faiss  # not installed here: the method must be run without importing the module


class SoftPatch:
    def _compute_lof(self, k, embedding):
        positions, images, _ = embedding.shape
        clf = LocalOutlierFactor(n_neighbors=int(k), metric="l2")
        scores = torch.zeros(size=(positions, images))
        for i in range(positions):
            clf.fit(embedding[i].cpu())
            scores[i] = torch.Tensor(-clf.negative_outlier_factor_)
        return scores
"""


def test_reference_lof_runs_the_authors_method_without_importing_their_module(tmp_path):
    """--reference_path: the LOF is the method from their src/softpatch.py (here a stand-in with the
    same signature and an unavailable import), fed the [P, N, R] layout, and it agrees with ours."""
    pytest.importorskip("torch")
    sklearn_lof = pytest.importorskip("sklearn.neighbors").LocalOutlierFactor
    import argparse

    import numpy as np

    from launch.bench import reference
    from softpatch_jax import memory_bank

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "softpatch.py").write_text(FAKE_AUTHORS_FILE)
    pool = np.random.default_rng(0).standard_normal((15, 6, 4)).astype(np.float32)  # [N, P, R]
    ours = np.asarray(memory_bank.discriminator_scores(pool, ("lof",), {"lof_k": 5})["lof"])
    args = argparse.Namespace(reference_path=str(tmp_path), reference_positions=0, lof_k=5)
    res = reference.lof(args, pool, ours)
    assert res["impl"].startswith("authors' SoftPatch._compute_lof")
    assert res["positions_run"] == 6 and not res["scaled_from_subset"]
    assert res["lof_max_rel_diff_vs_ours"] < 1e-4
    # The same figures as the re-implementation (scikit-learn per position, [N, R] slices).
    direct = -sklearn_lof(n_neighbors=5).fit(pool[:, 2]).negative_outlier_factor_
    np.testing.assert_allclose(ours[:, 2], direct, rtol=1e-4)

    (tmp_path / "src" / "softpatch.py").write_text("class SoftPatch:\n    pass\n")
    with pytest.raises(ValueError, match=r"softpatch\.py: no method SoftPatch\._compute_lof"):
        reference.lof(args, pool, ours)


def test_latency_interleaves_and_takes_medians_of_per_repeat_ratios():
    from launch.bench import latency

    calls = []
    fake = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = latency.interleaved(fake, repeats=3)
    # One warm-up each, then the order reversed every other round.
    assert calls == ["a", "b", "c", "a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert all(len(v) == 3 for v in times.values())
    times = {"x": [2.0, 10.0, 3.0], "y": [1.0, 1.0, 2.0]}
    assert latency.ratio(times, "x", "y") == 2.0  # median of 2, 10, 1.5 (not 15 / 4)


def test_deploy_latency_needs_a_model(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "launch.bench", "--stages=deploy_latency", f"--out={tmp_path}/b"],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert res.returncode != 0 and "--deploy_model" in res.stderr + res.stdout
