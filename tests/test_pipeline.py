"""End to end on a tiny generated dataset: results files, their contents, and the noise bookkeeping."""

import csv
import json
import os

import numpy as np
import pytest

from configs import demo as demo_config
from softpatch_jax import features, pipeline
from softpatch_jax.data import demo

TINY = demo.DemoSpec(
    size=64, num_train=10, num_test_good=4, num_per_defect=2, categories=("fabric", "pill")
)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return demo.write(str(tmp_path_factory.mktemp("data") / "tiny"), TINY)


def tiny_config(root, **overrides):
    c = demo_config.get_config()
    c.dataset.layout = "mvtec"
    c.dataset.root = root
    c.dataset.resize = c.dataset.crop = 64
    c.dataset.batch_size = 8
    c.backbone.arch = "resnet_tiny"
    c.backbone.allow_random_init = True
    c.methods = "patchcore,softpatch_lof,softpatch_plus"
    for k, v in overrides.items():
        section, key = k.split("__")
        c[section][key] = v
    return c


@pytest.mark.slow
def test_run_writes_results_and_tracks_injected_images(tiny_root, tmp_path, capsys):
    cfg = tiny_config(tiny_root, noise__ratios="0.0,0.2", noise__overlap=True)
    rows = pipeline.run(cfg, str(tmp_path))
    for name in ("config.json", "results.json", "results.csv", "summary.md"):
        assert os.path.isfile(tmp_path / name), name
    assert len(rows) == 2 * 2 * 3  # categories x ratios x methods
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved["weights"]["weights"] == "random-init"
    assert len(saved["rows"]) == len(rows)
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    test_count = TINY.num_test_good + 5 * TINY.num_per_defect
    for r in rows:
        assert 0.0 <= r["image_auroc"] <= 1.0 and 0.0 <= r["pixel_auroc"] <= 1.0
        assert r["weights"] == "random-init"
        expected = int(r["noise_ratio"] * TINY.num_train)
        assert r["num_injected"] == len(r["injected"]) == expected
        assert r["num_train"] == TINY.num_train + expected
        assert r["num_test"] == test_count  # overlap: injected anomalies stay in the test set
        assert all(
            f"{os.sep}test{os.sep}" in p and f"{os.sep}good{os.sep}" not in p for p in r["injected"]
        )
        assert r["time_features"] > 0 and r["time_scoring"] > 0
    out = capsys.readouterr().out
    assert "| fabric |" in out and "random-init" in out


@pytest.mark.slow
def test_no_overlap_removes_injected_from_test_and_is_deterministic(tiny_root, tmp_path):
    cfg = tiny_config(
        tiny_root, noise__ratios="0.2", noise__overlap=False, dataset__categories="pill"
    )
    cfg.methods = "softpatch_lof"
    a = pipeline.run(cfg, str(tmp_path / "a"))
    b = pipeline.run(cfg, str(tmp_path / "b"))
    assert a[0]["num_test"] == TINY.num_test_good + 5 * TINY.num_per_defect - 2
    assert a[0]["injected"] == b[0]["injected"]
    assert (a[0]["image_auroc"], a[0]["pixel_auroc"]) == (b[0]["image_auroc"], b[0]["pixel_auroc"])


def test_too_much_noise_states_the_maximum(tiny_root, tmp_path):
    cfg = tiny_config(
        tiny_root, noise__ratios="1.0", noise__overlap=False, dataset__categories="pill"
    )
    with pytest.raises(ValueError, match=r"at most 9"):
        pipeline.run(cfg, str(tmp_path))


def test_feature_extraction_compiles_once_for_ragged_batches(tiny_root):
    cfg = tiny_config(tiny_root)
    ex = features.build(cfg)
    images = np.random.default_rng(0).integers(0, 255, (19, 64, 64, 3), dtype=np.uint8)
    out = features.extract(ex, images)  # batches of 8, 8, 3 (padded)
    assert out.shape == (19, *ex.grid, 1024)
    assert ex.apply._cache_size() == 1
    # Padding never leaks into the real rows: the last image alone gives the same features.
    np.testing.assert_allclose(
        np.asarray(features.extract(ex, images[-1:]))[0], np.asarray(out[-1]), atol=1e-5
    )


def test_bad_config_values_are_named(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root)
    cfg.methods = "patchcore,softpach"
    with pytest.raises(ValueError, match="softpach"):
        pipeline.run(cfg, str(tmp_path))
    cfg = tiny_config(tiny_root, dataset__categories="carpet")
    with pytest.raises(ValueError, match="carpet"):
        pipeline.run(cfg, str(tmp_path))
