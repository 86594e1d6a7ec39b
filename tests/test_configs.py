"""Each paper config runs end to end through `python -m softpatch_jax.main` on a miniature tree of its
dataset's official layout (tests/fake_trees.py), reading through the prepared TFDS store."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import fake_trees

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "--config.backbone.arch=resnet_tiny",
    "--config.backbone.allow_random_init=True",
    "--config.dataset.resize=32",
    "--config.dataset.crop=32",
    "--config.dataset.batch_size=4",
    "--config.methods=patchcore,softpatch_lof,softpatch_plus",
    "--config.softpatch.lof_k=3",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,make,ratios",
    [
        ("mvtec", fake_trees.make_mvtec, "0.34"),
        ("visa", fake_trees.make_visa, "0.34"),
        ("btad", fake_trees.make_btad, "0.4"),
    ],
)
def test_paper_config_runs_end_to_end(tmp_path, name, make, ratios):
    tree = make(str(tmp_path / "data"), np.random.default_rng(0))
    workdir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "softpatch_jax.main",
        f"--config=configs/{name}.py",
        f"--workdir={workdir}",
        f"--config.dataset.root={tree.root}",
        f"--config.dataset.data_dir={tmp_path / 'tfds'}",
        f"--config.noise.ratios={ratios}",
        *TINY,
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(workdir / "results.json") as f:
        rows = json.load(f)["rows"]
    categories = sorted(tree.items)
    assert sorted({r["category"] for r in rows}) == categories
    assert len(rows) == len(categories) * 3
    for r in rows:
        n_train = len(tree.split(r["category"], "train"))
        assert r["num_injected"] == int(r["noise_ratio"] * n_train + 1e-9)
        assert 0.0 <= r["image_auroc"] <= 1.0
    assert "random-init" in proc.stdout
    assert os.path.isdir(tmp_path / "tfds")  # the prepared store was written and read


@pytest.mark.slow
def test_realiad_config_runs_a_fuiad_split_end_to_end(tmp_path):
    root = fake_trees.make_realiad(str(tmp_path / "data"), np.random.default_rng(0), nested=True)
    workdir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "softpatch_jax.main",
        "--config=configs/realiad.py",
        f"--workdir={workdir}",
        f"--config.dataset.root={root}",
        f"--config.dataset.data_dir={tmp_path / 'tfds'}",
        "--config.dataset.split=fuiad_0.2",
        *TINY,
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(workdir / "results.json") as f:
        rows = json.load(f)["rows"]
    assert sorted({r["category"] for r in rows}) == ["audiojack", "mint"]
    assert len(rows) == 2 * 3
    for r in rows:
        want = fake_trees.realiad_expected(root, r["category"], "fuiad_0.2")
        assert r["dataset.split"] == "fuiad_0.2" and r["num_injected"] == 0
        assert (r["train_anomalous"], r["num_train"]) == (len(want["train_anomalous"]), 50)
        # fuiad_0.2: 2 of the 10 training samples are defective, 8 of their 10 views show it.
        assert r["train_anomalous_fraction"] == round(8 / 50, 6)
        assert (r["train_anomalous_samples"], r["train_samples"]) == (2, 10)
        assert r["train_anomalous_sample_fraction"] == 0.2
        assert all(0.0 <= r[m] <= 1.0 for m in ("image_auroc", "sample_auroc", "sample_ap"))
    assert "image AUROC / sample AUROC / pixel AUROC" in proc.stdout
    assert (
        "anomalous training images: audiojack 8/50 (16.0%) in 2/10 defective samples (20.0%), "
        "mint 8/50 (16.0%) in 2/10 defective samples (20.0%)"
    ) in proc.stdout
    assert os.path.isdir(tmp_path / "tfds" / "real_iad")  # through the prepared store
