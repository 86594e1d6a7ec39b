"""Sweeps: grid expansion, cache keys, kill-and-resume, damaged cache files, vmapped scoring.

End-to-end tests swap the backbone for a cheap jitted patch descriptor (building even the tiny
random-init ResNet costs tens of seconds of eager compiles on 2 cores); everything downstream of
`features.build` is the real code, and `driver.run` (a plain run) on the same stand-in is the oracle.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from fake_trees import make_realiad, realiad_expected

from configs import demo as demo_config
from configs.sweeps import common, fuiad
from softpatch_jax import features, memory_bank, methods, scoring
from softpatch_jax.data import demo, noise
from softpatch_jax.data.records import Augment, Record
from softpatch_jax.experiment import cache, driver, grid, jsonl, options, stages

TINY = demo.DemoSpec(size=32, num_train=8, num_test_good=3, num_per_defect=1, categories=("pill",))
GRID_CELL = 4  # the stand-in backbone's patch size: a 32x32 crop gives an 8x8 feature grid


def fake_build(options):
    """A stand-in `features.build`: per 4x4 patch mean and std of each channel, mixed by a fixed
    random matrix to 16 dims. Cheap to compile; enough structure for AUROCs to mean something."""
    w = jax.random.normal(jax.random.key(7), (6, 16))

    @jax.jit
    def apply(variables, images):
        x = images.astype(jnp.float32) / 255.0
        b, h, wd, _ = x.shape
        x = x.reshape(b, h // GRID_CELL, GRID_CELL, wd // GRID_CELL, GRID_CELL, 3)
        stats = jnp.concatenate([x.mean((2, 4)), x.std((2, 4))], axis=-1)
        return jnp.tanh(stats @ variables["w"])

    crop = options.crop
    grid_hw = (crop // GRID_CELL, crop // GRID_CELL)
    info = {"weights": "random-init", "arch": "fake"}
    return features.Extractor(apply, {"w": w}, info, 8, grid_hw, (crop, crop))


@pytest.fixture
def fake_backbone(monkeypatch):
    """Swaps the backbone and counts the images that go through feature extraction."""
    seen = {"images": 0}
    extract = features.extract

    def counting_extract(ex, images, progress=None):
        seen["images"] += images.shape[0]
        return extract(ex, images, progress)

    monkeypatch.setattr(features, "build", fake_build)
    monkeypatch.setattr(features, "extract", counting_extract)
    return seen


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return demo.write(str(tmp_path_factory.mktemp("data") / "tiny"), TINY)


def sweep_config(root, **axes):
    c = common.with_sweep(demo_config.get_config())
    c.dataset.layout = "mvtec"
    c.dataset.root = root
    c.dataset.resize = c.dataset.crop = 32
    c.softpatch.projection_dim = 8
    c.noise.overlap = True
    c.noise.ratios = "0.1"
    c.methods = "patchcore,softpatch_lof"
    c.eval.save_maps = 0
    for path, values in axes.items():
        common.axis(c, path.replace("__", "."), values)
    return c


# ----------------------------------------------------------------------------- grid


def test_grid_expands_every_axis_and_the_implicit_lists():
    c = sweep_config("/nowhere", seed=(0, 1), softpatch__tau=(0.1, 0.2))
    c.noise.ratios = "0.0,0.25"
    cells = grid.expand(c, lambda ds: ["a", "b"])
    # categories x ratios x methods x seeds x taus
    assert len(cells) == 2 * 2 * 2 * 2 * 2
    assert len({x.id for x in cells}) == len(cells)
    assert {(x.category, x.ratio, x.method) for x in cells} == {
        (cat, r, m) for cat in "ab" for r in (0.0, 0.25) for m in ("patchcore", "softpatch_lof")
    }
    for x in cells:
        assert x.config.softpatch.tau == x.axes["softpatch.tau"]
        assert x.config.seed == x.axes["seed"]
        assert x.config.noise.ratios == repr(x.ratio) and x.config.methods == x.method

    def pick(**kw):
        return [x for x in cells if all(getattr(x, k, None) == v for k, v in kw.items())]

    # tau and the method only choose banks: one fit group per (category, ratio, seed).
    assert len({x.fit_key for x in cells}) == 2 * 2 * 2
    # Without injected images the noisy set is the same for every seed; with them it is not.
    assert len({x.noisy for x in pick(category="a", ratio=0.0)}) == 1
    assert len({x.noisy for x in pick(category="a", ratio=0.25)}) == 2


def test_axis_values_take_the_field_type_and_duplicates_collapse():
    c = sweep_config("/nowhere", softpatch__discriminators=(("gaussian", "lof"), "lof"))
    c.methods = "softpatch_plus"
    cells = grid.expand(c, lambda ds: ["a"])
    assert sorted(x.config.softpatch.discriminators for x in cells) == ["gaussian,lof", "lof"]
    c = sweep_config("/nowhere", seed=(0, 0, 1))
    assert len(grid.expand(c, lambda ds: ["a"])) == 2 * 2  # seeds {0, 1} x methods


def test_bad_axes_are_named():
    c = sweep_config("/nowhere", softpatch__tua=(0.1,))
    with pytest.raises(ValueError, match=r"softpatch\.tua"):
        grid.axes(c)
    c = sweep_config("/nowhere")
    c.sweep.axes.seed = 3
    with pytest.raises(ValueError, match="tuple"):
        grid.axes(c)
    c = sweep_config("/nowhere", methods=("patchcore", "softpach"))
    with pytest.raises(ValueError, match="softpach"):
        grid.expand(c, lambda ds: ["a"])


# ----------------------------------------------------------------------------- cache keys


def _records(folder, names, size=10):
    out = []
    for n in names:
        path = os.path.join(folder, n)
        with open(path, "wb") as f:
            f.write(b"x" * size)
        out.append(Record(path, 0, "good"))
    return out


def test_feature_keys_change_with_what_determines_features_and_nothing_else(tmp_path):
    train = _records(tmp_path, ["t0.png", "t1.png"])
    test = _records(tmp_path, ["q0.png"])
    c = sweep_config(str(tmp_path))
    key = cache.features_key(c, "pill", train, test, "w0")

    def changed(mutate, *, weights="w0", category="pill", records=(train, test)):
        cfg = ml_collections.ConfigDict(c.to_dict())
        mutate(cfg)
        return cache.features_key(cfg, category, *records, weights) != key

    same = lambda cfg: None
    assert not changed(same)
    for path, value in [
        ("dataset.batch_size", 3),
        ("softpatch.tau", 0.3),
        ("softpatch.lof_k", 3),
        ("methods", "patchcore"),
        ("seed", 5),
        ("noise.ratios", "0.3"),
        ("scoring.blur_sigma", 2.0),
        ("coreset.ratio", 0.5),
    ]:
        assert not changed(lambda cfg, p=path, v=value: grid.set_path(cfg, p, v)), path
    for path, value in [
        ("dataset.resize", 40),
        ("dataset.crop", 28),
        ("backbone.arch", "resnet18"),
        ("backbone.layers", "layer1,layer2"),
        ("backbone.dtype", "bfloat16"),
        ("embedding.target_dim", 512),
        ("dataset.layout", "demo"),
    ]:
        assert changed(lambda cfg, p=path, v=value: grid.set_path(cfg, p, v)), path
    assert changed(same, weights="w1")
    assert changed(same, category="wood")
    assert changed(same, records=(train[:1], test))
    with open(train[0].path, "ab") as f:  # an edited image
        f.write(b"y")
    assert changed(same)


def test_injected_and_score_keys():
    recs = [Record("/d/a.png", 1, "hole", augment=Augment(1.0, 0.01, 0.0))]
    spec = noise.NoiseSpec(0.1, True)
    k = cache.injected_key("base", spec, 0, recs)
    assert k == cache.injected_key("base", spec, 0, list(recs))
    assert k != cache.injected_key("base2", spec, 0, recs)
    assert k != cache.injected_key("base", dataclasses.replace(spec, ratio=0.2), 0, recs)
    assert k != cache.injected_key("base", dataclasses.replace(spec, overlap=False), 0, recs)
    assert k != cache.injected_key("base", dataclasses.replace(spec, rotation_deg=2.0), 0, recs)
    assert k != cache.injected_key("base", spec, 1, recs)
    moved = [dataclasses.replace(recs[0], augment=Augment(1.0, 0.02, 0.0))]
    assert k != cache.injected_key("base", spec, 0, moved)
    s = cache.scores_key("f", "lof", 6, 128, 0)
    assert s == cache.scores_key("f", "lof", 6, 128, 0)
    for other in [("g", "lof", 6, 128, 0), ("f", "gaussian", 6, 128, 0), ("f", "lof", 5, 128, 0),
                  ("f", "lof", 6, 0, 0), ("f", "lof", 6, 128, 1)]:  # fmt: skip
        assert cache.scores_key(*other) != s, other


def test_damaged_entries_are_deleted_not_reused(tmp_path):
    stats = cache.Stats()
    store = cache.Cache(str(tmp_path), stats)
    arrays = {"x": np.arange(5000, dtype=np.float32)}
    store.save("features", "k1", arrays)
    np.testing.assert_array_equal(store.load("features", "k1")["x"], arrays["x"])
    path = store.path("features", "k1")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # a flipped bit inside the array
    open(path, "wb").write(bytes(data))
    assert store.load("features", "k1") is None and not os.path.exists(path)
    store.save("features", "k2", arrays)
    os.replace(store.path("features", "k2"), store.path("features", "k3"))  # wrong name
    assert store.load("features", "k3") is None
    assert stats.as_dict() == {"features_hit": 1, "features_corrupt": 2, "features_miss": 2}
    assert not [f for f in os.listdir(tmp_path / "features") if f.startswith(".")]  # no temps


def test_jsonl_drops_a_torn_last_line(tmp_path):
    path = str(tmp_path / "r.jsonl")
    jsonl.append(path, {"cell_id": "a"})
    jsonl.append(path, {"cell_id": "b"})
    with open(path, "a") as f:
        f.write('{"cell_id": "c", "imag')  # killed mid-write
    assert [r["cell_id"] for r in jsonl.read(path, repair=True)] == ["a", "b"]
    jsonl.append(path, {"cell_id": "d"})
    assert [r["cell_id"] for r in jsonl.read(path)] == ["a", "b", "d"]


# ----------------------------------------------------------------------------- end to end


def _metrics(rows):
    return {
        (r["category"], r["method"], r["noise_ratio"], r["seed"]): (
            r["image_auroc"],
            r["pixel_auroc"],
        )
        for r in rows
    }


def test_kill_and_resume_recomputes_nothing_finished(tiny_root, tmp_path, fake_backbone):
    c = sweep_config(tiny_root, noise__ratios=(0.0, 0.25), seed=(0, 1))
    c.eval.save_maps = 2
    work = str(tmp_path / "sweep")
    calls = []

    def stop_after_three(row):
        calls.append(row["cell_id"])
        if len(calls) == 3:
            raise driver.Interrupted

    with pytest.raises(driver.Interrupted):
        driver.sweep(c, work, on_cell=stop_after_three)
    first = fake_backbone["images"]
    n_train, n_test, n_inj = 8, 3 + 5, 2  # 8 train, 3 good + 5 defects, int(0.25 * 8)
    assert first == n_train + n_test  # the clean set only: the first 3 cells are at ratio 0
    assert len(jsonl.read(os.path.join(work, driver.RESULTS))) == 3

    stats = driver.sweep(c, work)
    # 8 cells: 2 ratios x 2 seeds x 2 methods; the 3 finished are skipped.
    assert stats["cells_total"] == 8 and stats["cells_skipped"] == 3 and stats["cells_run"] == 5
    # Clean features from the cache; injected ones once per (ratio 0.25, seed): never again.
    assert stats["features_hit"] == 1 and stats["features_miss"] == 2
    assert stats["extractions_injected"] == 2 and "extractions_clean" not in stats
    assert fake_backbone["images"] - first == 2 * n_inj
    # Seed 1 at ratio 0: its LOF scores were cached by the interrupted run (the fit group had
    # started); the two ratio-0.25 groups compute theirs.
    assert stats["scores_hit"] == 1 and stats["discriminator_runs_lof"] == 2

    again = driver.sweep(c, work)
    assert again["cells_skipped"] == 8 and "cells_run" not in again
    assert not any(k.startswith(("features_", "scores_", "extractions")) for k in again)
    rows = jsonl.read(os.path.join(work, driver.RESULTS))
    assert len(rows) == len({r["cell_id"] for r in rows}) == 8
    assert len(os.listdir(os.path.join(work, "maps"))) == 8
    with np.load(os.path.join(work, "maps", rows[0]["cell_id"] + ".npz")) as z:
        assert z["maps"].shape == (2, 32, 32) and z["images"].shape == (2, 32, 32, 3)
        assert sorted(z["labels"]) == [0, 1]  # one normal image, one anomaly

    # The oracle: driver.run, one seed at a time, on the same stand-in backbone.
    want = {}
    for seed in (0, 1):
        run_cfg = sweep_config(tiny_root)
        run_cfg.noise.ratios, run_cfg.seed = "0.0,0.25", seed
        want |= _metrics(driver.run(run_cfg, str(tmp_path / f"run{seed}")))
    got = _metrics(rows)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, err_msg=str(k))


def test_a_half_written_cache_file_is_recomputed(tiny_root, tmp_path, fake_backbone):
    c = sweep_config(tiny_root, noise__ratios=(0.25,))
    c.methods = "softpatch_lof"
    c.sweep.cache_dir = str(tmp_path / "cache")
    first = _metrics(jsonl_rows(c, str(tmp_path / "a")))
    folder = tmp_path / "cache" / "features"
    entries = sorted(folder.iterdir(), key=lambda p: p.stat().st_size)
    injected, clean = entries  # the injected images' entry is the small one
    data = clean.read_bytes()
    clean.write_bytes(data[: len(data) // 2])  # as if copied in half, or written in place
    (folder / f".{injected.name}.tmp123").write_bytes(b"partial")  # a crashed writer's temp
    images = fake_backbone["images"]
    stats = driver.sweep(c, str(tmp_path / "b"))
    assert stats["features_corrupt"] == 1 and stats["features_hit"] == 1
    assert stats["extractions_clean"] == 1 and "extractions_injected" not in stats
    assert fake_backbone["images"] - images == 8 + 8  # train and test, not the injected two
    assert _metrics(jsonl.read(str(tmp_path / "b" / driver.RESULTS))) == first


def jsonl_rows(c, work):
    driver.sweep(c, work)
    return jsonl.read(os.path.join(work, driver.RESULTS))


def test_infeasible_noise_fails_before_any_work(tiny_root, tmp_path, fake_backbone):
    c = sweep_config(tiny_root, noise__ratios=(0.0, 1.0))
    c.noise.overlap = False
    with pytest.raises(ValueError, match="at most"):
        driver.sweep(c, str(tmp_path))
    assert fake_backbone["images"] == 0


def test_fuiad_sweep_runs_the_four_splits_and_matches_a_run(tmp_path, fake_backbone):
    root = make_realiad(str(tmp_path / "realiad"), np.random.default_rng(0))
    c = fuiad.get_config("realiad")
    c.dataset.root = root
    c.dataset.prepared = False
    c.dataset.resize = c.dataset.crop = 32
    c.softpatch.projection_dim = 8
    c.softpatch.lof_k = 3
    rows = jsonl_rows(c, str(tmp_path / "sweep"))
    assert len(rows) == 2 * 4 * 3  # categories x splits x methods
    for r in rows:
        want = realiad_expected(root, r["category"], r["dataset.split"])
        assert r["train_anomalous"] == len(want["train_anomalous"])
        assert (r["train_anomalous"] > 0) == (r["dataset.split"] != "fuiad_0.0")
        assert r["num_train"] == len(want["train"]) and r["num_test"] == len(want["test"])
        assert r["train_anomalous_fraction"] == round(r["train_anomalous"] / r["num_train"], 6)
        ratio = float(r["dataset.split"].split("_")[1])  # the split's name counts samples
        assert r["train_anomalous_sample_fraction"] == ratio and r["train_samples"] == 10
        assert r["noise_ratio"] == 0.0 and r["num_injected"] == 0
        assert {"sample_auroc", "sample_ap"} <= set(r)
    # The oracle: driver.run of one split on the same stand-in backbone.
    run_cfg = fuiad.get_config("realiad")
    del run_cfg["sweep"]
    run_cfg.dataset.update(root=root, prepared=False, resize=32, crop=32, split="fuiad_0.4")
    run_cfg.softpatch.update(projection_dim=8, lof_k=3)
    want = driver.run(run_cfg, str(tmp_path / "run"))
    got = {(r["category"], r["method"]): r for r in rows if r["dataset.split"] == "fuiad_0.4"}
    for w in want:
        g = got[(w["category"], w["method"])]
        for m in ("image_auroc", "pixel_auroc", "sample_auroc", "sample_ap"):
            np.testing.assert_allclose(g[m], w[m], atol=1e-6, err_msg=m)
        assert g["train_anomalous"] == w["train_anomalous"]
    # A FUIAD split with injected noise on top fails before any work.
    c.noise.ratios = "0.0,0.1"
    images = fake_backbone["images"]
    with pytest.raises(ValueError, match="fixes the training set's noise"):
        driver.sweep(c, str(tmp_path / "bad"))
    assert fake_backbone["images"] == images


# ----------------------------------------------------------------------------- vmapped scoring


def test_vmapped_scoring_equals_predict_per_bank():
    rng = np.random.default_rng(0)
    n, p, d = 10, 16, 12
    feats = rng.normal(size=(1, p, d)) + 0.3 * rng.normal(size=(n, p, d))
    feats[2, 5] += 5.0
    feats = jnp.asarray(feats, jnp.float32)
    cfg = sweep_config("/nowhere")
    cfg.coreset.ratio = 0.2
    cfg.softpatch.discriminators = "nearest,lof"
    specs = []
    for tau in (0.05, 0.1, 0.3):
        cfg.softpatch.tau = tau
        for m in ("patchcore", "softpatch_lof", "softpatch_plus", "image_denoise"):
            specs.append(
                dataclasses.replace(methods.spec(m, options.method_options(cfg)), name=f"{m}@{tau}")
            )
    key = jax.random.key(3)
    want = memory_bank.fit_many(key, feats, options.fit_options(cfg), specs)
    test = jnp.asarray(rng.normal(size=(4, p, d)), jnp.float32)
    opts = scoring.Options(blur_sigma=1.0)
    predicted = scoring.score_many(want.banks, test, (4, 4), (8, 8), opts, vmap=True)
    for s in specs:
        # One bank object when the method builds no segmentation bank: scored once.
        assert (want.banks[s.name].seg is want.banks[s.name].cls) == (s.seg is None)
        image, maps = scoring.predict(want.banks[s.name], test, (4, 4), (8, 8), 1.0)
        image_vmapped = np.asarray(predicted[s.name][0]).max(axis=1)
        np.testing.assert_allclose(image_vmapped, np.asarray(image), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(predicted[s.name][1]), np.asarray(maps), rtol=1e-5)


def test_cached_float64_gaussian_keeps_its_low_part(tmp_path):
    """A float64 Gaussian (N <= R) is cached with its low part, so a run from the cache removes the
    same patches as the run that computed it."""
    cfg = demo_config.get_config()
    cfg.softpatch.projection_dim = 16
    feats = jax.random.normal(jax.random.key(0), (9, 12, 32))  # N=9 <= R=16: float64
    store = cache.Cache(str(tmp_path), cache.Stats())
    first = stages.prepare(store, jax.random.key(1), feats, "f", cfg, ("gaussian",))
    again = stages.prepare(store, jax.random.key(1), feats, "f", cfg, ("gaussian",))
    assert first.computed == ("gaussian",) and again.computed == ()
    assert set(again.scores_NxP) == {"gaussian", "gaussian_lo"}
    for name, s in first.scores_NxP.items():
        np.testing.assert_array_equal(np.asarray(again.scores_NxP[name]), np.asarray(s))
