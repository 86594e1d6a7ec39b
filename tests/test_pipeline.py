"""End to end on a tiny generated dataset: results files, their contents, and the noise bookkeeping."""

import csv
import io
import json
import os

import numpy as np
import pytest

from configs import demo as demo_config
from softpatch_jax import features, metrics
from softpatch_jax.data import demo
from softpatch_jax.experiment import driver, grid, jsonl, options, outputs, plan

VIEWLESS = tuple(m for m in metrics.ALL if m not in metrics.SAMPLE)
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
    rows = driver.run(cfg, str(tmp_path))
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
        # eval.metrics = "all"; the demo's file names carry no views, so no sample metrics.
        assert all(0.0 <= r[m] <= 1.0 for m in VIEWLESS), r
        assert not set(metrics.SAMPLE) & set(r)
        assert r["train_anomalous"] == r["num_injected"]
        assert r["train_anomalous_fraction"] == round(r["num_injected"] / r["num_train"], 6)
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
    a = driver.run(cfg, str(tmp_path / "a"))
    b = driver.run(cfg, str(tmp_path / "b"))
    assert a[0]["num_test"] == TINY.num_test_good + 5 * TINY.num_per_defect - 2
    assert a[0]["injected"] == b[0]["injected"]
    assert [a[0][m] for m in VIEWLESS] == [b[0][m] for m in VIEWLESS]


@pytest.mark.slow
def test_a_rerun_runs_only_the_cells_it_has_not_finished(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root, noise__ratios="0.0", dataset__categories="pill")
    cfg.methods = "patchcore"
    first = driver.run(cfg, str(tmp_path))
    # A plain run keeps its features in memory: no cache folder, no sweep files.
    assert not os.path.exists(tmp_path / "cache") and not os.path.exists(tmp_path / "sweep.json")
    cfg.methods = "softpatch_lof,patchcore"
    second = driver.run(cfg, str(tmp_path))
    assert [r["method"] for r in second] == ["softpatch_lof", "patchcore"]  # the config's order
    assert second[1] == first[0]  # read back, not run again
    stats = jsonl.read(str(tmp_path / "stats.jsonl"))
    assert stats[-1]["cells_skipped"] == 1 and stats[-1]["cells_run"] == 1
    with open(tmp_path / "results.json") as f:
        assert [r["method"] for r in json.load(f)["rows"]] == ["softpatch_lof", "patchcore"]


@pytest.mark.slow
def test_a_run_draws_a_bar_per_stage_only_when_asked(tiny_root, tmp_path, monkeypatch):
    """Features, coreset picks and scoring chunks each get a bar (rate and ETA) when asked; the
    log lines that replace them without a terminal go to absl, which tests do not print."""
    cfg = tiny_config(tiny_root, noise__ratios="0.0", dataset__categories="pill")
    cfg.methods = "softpatch_plus"
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setenv("SOFTPATCH_PROGRESS", "1")
    driver.run(cfg, str(tmp_path / "bars"))
    for stage in ("features (clean)", "coreset (2 masks)", "scoring (1 method)", "cells"):
        assert f"{stage}:" in err.getvalue(), stage
    assert "img/s" in err.getvalue()  # a rate
    err.truncate(0)
    monkeypatch.setenv("SOFTPATCH_PROGRESS", "")
    driver.run(cfg, str(tmp_path / "quiet"))
    assert "scoring" not in err.getvalue() and "picks" not in err.getvalue()


def test_eval_metrics_are_checked_before_any_work(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root, eval__metrics="pixel_auroc,pixel_pro")
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['pixel_pro'\]"):
        driver.run(cfg, str(tmp_path))
    assert not os.path.exists(tmp_path / "config.json")
    cfg.eval.metrics = "pixel_ap"  # the AUROC pair comes along: the summary is drawn from it
    assert plan.eval_metrics(cfg) == ("image_auroc", "pixel_auroc", "pixel_ap")


def test_too_much_noise_states_the_maximum(tiny_root, tmp_path):
    cfg = tiny_config(
        tiny_root, noise__ratios="1.0", noise__overlap=False, dataset__categories="pill"
    )
    with pytest.raises(ValueError, match=r"at most 9"):
        driver.run(cfg, str(tmp_path))


def test_feature_extraction_compiles_once_per_batch_shape(tiny_root):
    cfg = tiny_config(tiny_root)
    ex = features.build(options.extractor_options(cfg))
    images = np.random.default_rng(0).integers(0, 255, (19, 64, 64, 3), dtype=np.uint8)
    out = features.extract(ex, images)  # batches of 8, 8, 2, 1 (features.batch_plan)
    assert out.shape == (19, *ex.grid, 1024)
    assert ex.apply._cache_size() == 3
    features.extract(ex, images[:17])  # 8, 8, 1: no new shape
    assert ex.apply._cache_size() == 3
    # A batch's other rows never leak into an image: the last image alone gives the same features.
    np.testing.assert_allclose(
        np.asarray(features.extract(ex, images[-1:]))[0], np.asarray(out[-1]), atol=1e-5
    )


def test_bad_config_values_are_named(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root)
    cfg.methods = "patchcore,softpach"
    with pytest.raises(ValueError, match="softpach"):
        driver.run(cfg, str(tmp_path))
    cfg = tiny_config(tiny_root, dataset__categories="carpet")
    with pytest.raises(ValueError, match="carpet"):
        driver.run(cfg, str(tmp_path))


def _records(*paths):
    from softpatch_jax.data.records import Record

    return tuple(Record(path=p, label=int("good" not in p), defect=p.split("/")[-2]) for p in paths)


def test_map_indices_adds_the_chosen_images_and_names_a_missing_one():
    recs = _records(
        "/d/pill/test/good/000.png",
        "/d/pill/test/good/001.png",
        "/d/pill/test/crack/000.png",
        "/d/pill/test/crack/003.png",
        "/d/pill/test/hole/000.png",
    )
    labels = np.array([r.label for r in recs])
    # The default pick (one good, one anomaly) plus the chosen crack/003; another category's
    # choice is not this category's business.
    chosen = grid.parse_map_images("pill/crack/003.png, wood/good/000.png")
    assert chosen == [("pill", "crack/003.png"), ("wood", "good/000.png")]
    assert outputs.map_indices(labels, 2, recs, "pill", chosen).tolist() == [0, 2, 3]
    assert outputs.map_indices(labels, 0, recs, "pill", chosen).tolist() == [3]
    assert outputs.map_indices(labels, 0, recs, "pill", chosen[1:]).tolist() == []
    # A suffix must match whole path components: "rack/003.png" is not crack/003.png.
    with pytest.raises(ValueError, match=r"'pill/rack/003\.png' matches none of the 5 test images"):
        outputs.map_indices(labels, 0, recs, "pill", [("pill", "rack/003.png")])
    assert (
        outputs.map_indices(labels, 0, recs, "pill", [("pill", "x.png")], required=False).size == 0
    )
    with pytest.raises(ValueError, match=r"'pill': expected CATEGORY/PATH"):
        grid.parse_map_images("pill")


@pytest.mark.slow
def test_chosen_images_get_their_maps_saved(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root, noise__ratios="0.0", dataset__categories="pill")
    cfg.methods = "patchcore"
    cfg.eval.save_maps = 0  # the chosen image alone
    cfg.eval.map_images = "pill/hole/001.png"
    (row,) = driver.run(cfg, str(tmp_path / "ok"))
    with np.load(tmp_path / "ok" / "maps" / f"{row['cell_id']}.npz") as z:
        assert [p.replace(os.sep, "/").rsplit("/", 2)[-2:] for p in z["paths"]] == [
            ["hole", "001.png"]
        ]
        assert z["maps"].shape[0] == 1 and z["masks"][0].any()
    cfg.eval.map_images = "pill/hole/009.png"
    with pytest.raises(ValueError, match=r"hole/009\.png"):
        driver.run(cfg, str(tmp_path / "bad"))
    cfg.eval.map_images = "carpet/hole/000.png"
    with pytest.raises(ValueError, match="carpet"):
        driver.run(cfg, str(tmp_path / "bad2"))
