"""The deployment tool end to end on a tiny mixed-format folder: fit -> save -> load -> predict,
the audit finding planted defects, determinism, compatibility checks and failure without leftovers.

One extractor and one fitted model per module (random-init resnet_tiny, 32x32): every later fit has
the same shapes and reuses the compiled functions."""

import dataclasses
import errno
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from deploy_helpers import tiny_config, tiny_extractor, write_folder

from softpatch_jax import features, io_utils, outdir, scoring, weights
from softpatch_jax.data import folder, images
from softpatch_jax.deploy import commands, fitting, model, predicting


@pytest.fixture(scope="module")
def ex():
    return tiny_extractor()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, ex):
    """A model fitted on 12 normal images in nine formats/modes and 2 planted defects, with a
    truncated image (skipped) and a text file (ignored) beside them."""
    root = tmp_path_factory.mktemp("train")
    defective = write_folder(str(root), 12, 2, mixed=True)
    (root / "notes.txt").write_text("operator notes")
    data = (root / "img_01.jpg").read_bytes()
    (root / "sub" / "broken.png").write_bytes(data[: len(data) // 3])
    path = str(tmp_path_factory.mktemp("models") / "m")
    opts = fitting.Options(skip_bad_images=True)
    m = commands.fit_and_save(tiny_config(), str(root), path, opts, extractor=ex)
    return m, path, str(root), defective


def _features(ex, paths):
    imgs = np.stack([images.load(p, 32, 32) for p in paths])
    f = features.extract(ex, imgs)
    return f.reshape(f.shape[0], -1, f.shape[-1])


def test_fit_reads_every_format_skips_bad_lists_ignored_and_audits_defects_on_top(fitted):
    m, path, root, defective = fitted
    train = m.meta["training"]
    assert len(train["images"]) == 14
    assert {os.path.splitext(n)[1] for n in train["images"]} == {
        ".png", ".jpg", ".bmp", ".tif", ".webp"
    }  # fmt: skip
    assert [b["path"] for b in train["skipped_bad"]] == [os.path.join(root, "sub", "broken.png")]
    assert train["ignored_non_images"] == [os.path.join(root, "notes.txt")]
    audit = fitting.audit_of(m)
    assert sorted(audit.names[i] for i in audit.order[:2]) == defective
    with open(os.path.join(path, "audit", "audit.csv")) as f:
        lines = f.read().splitlines()
    assert sorted(line.split(",")[1] for line in lines[1:3]) == defective
    assert os.path.getsize(os.path.join(path, "audit", "contact_sheet.png")) > 1000
    for name in ("model.json", "arrays"):
        assert os.path.exists(os.path.join(path, name))
    meta = io_utils.read_json(os.path.join(path, "model.json"))
    assert (
        meta["backbone"]["arch"] == "resnet_tiny" and len(meta["backbone"]["params_sha256"]) == 64
    )
    assert meta["code"]["softpatch_jax"] and meta["preprocessing"]["crop"] == 32


def test_save_load_predict_gives_the_in_memory_scores(fitted, ex, tmp_path):
    m, path, root, _ = fitted
    loaded = model.load(path)
    for a, b in ((m.banks.cls, loaded.banks.cls), (m.banks.seg, loaded.banks.seg)):
        np.testing.assert_array_equal(np.asarray(a.feats_MxD), np.asarray(b.feats_MxD))
        np.testing.assert_array_equal(np.asarray(a.weights_M), np.asarray(b.weights_M))
    rows = predicting.predict(loaded, root, str(tmp_path), skip_bad_images=True, extractor=ex)
    paths = [r["path"] for r in rows]
    want, maps = scoring.predict(m.banks, _features(ex, paths), ex.grid, ex.image_size)
    np.testing.assert_allclose([r["score"] for r in rows], np.asarray(want), rtol=1e-5)
    np.testing.assert_allclose(
        [r["map_max"] for r in rows], np.asarray(maps).max(axis=(1, 2)), rtol=1e-5
    )
    thr = m.meta["threshold"]["value"]
    assert all(r["anomalous"] == (r["score"] > thr) for r in rows)
    summary = io_utils.read_json(str(tmp_path / "predictions.json"))
    assert summary["skipped_bad"][0]["path"].endswith("broken.png")
    for r in rows:
        assert os.path.isfile(tmp_path / r["heatmap"]) and os.path.isfile(tmp_path / r["overlay"])
    hidden = [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert hidden == [outdir.OWNED]  # no staging left; the record of what predict wrote


def test_same_seed_and_inputs_give_identical_results(fitted, ex, tmp_path):
    m, _, root, _ = fitted
    again, _, _ = fitting.fit(tiny_config(), root, fitting.Options(skip_bad_images=True), ex)
    for name in ("cls", "seg"):
        a, b = getattr(m.banks, name), getattr(again.banks, name)
        np.testing.assert_array_equal(np.asarray(a.index_M), np.asarray(b.index_M))
        np.testing.assert_array_equal(np.asarray(a.weights_M), np.asarray(b.weights_M))
    for key in m.arrays:
        np.testing.assert_array_equal(m.arrays[key], again.arrays[key], err_msg=key)
    runs = [
        predicting.predict(m, root, str(tmp_path / d), skip_bad_images=True, extractor=ex)
        for d in "ab"
    ]
    assert [r["score"] for r in runs[0]] == [r["score"] for r in runs[1]]


def test_incompatible_models_are_refused_naming_every_difference(fitted, ex):
    m = fitted[0]
    assert model.check_compatible(m, ex) == []  # same install: nothing differs
    other = dataclasses.replace(ex, variables=jax.tree.map(lambda v: v * 1.01, ex.variables))
    with pytest.raises(model.IncompatibleModelError, match="params_sha256"):
        model.check_compatible(m, other)
    meta = json.loads(json.dumps(m.meta))
    meta["backbone"]["arch"] = "wide_resnet50_2"
    meta["embedding"]["dim"] = 1024
    meta["code"]["softpatch_jax"] = "0.0.1"
    changed = dataclasses.replace(m, meta=meta)
    with pytest.raises(model.IncompatibleModelError) as err:
        model.check_compatible(changed, ex)
    msg = str(err.value)
    assert "backbone.arch: model has 'wide_resnet50_2', this install has 'resnet_tiny'" in msg
    assert "embedding.dim: model has 1024, this install has 64" in msg and "0.0.1" in msg
    meta["backbone"]["arch"], meta["embedding"]["dim"] = "resnet_tiny", 64
    tolerated = model.check_compatible(changed, ex, strict_version=False)
    assert any("0.0.1" in t for t in tolerated)


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_saving_leaves_no_model_and_no_temp(fitted, tmp_path, monkeypatch):
    monkeypatch.setattr(io_utils.json, "dump", _enospc)
    with pytest.raises(OSError, match="No space left"):
        model.save(fitted[0], str(tmp_path / "m"))
    assert os.listdir(tmp_path) == []


def test_disk_full_midway_through_predict_leaves_out_unchanged(fitted, ex, tmp_path, monkeypatch):
    m, _, root, _ = fitted
    out = tmp_path / "out"
    predicting.predict(m, root, str(out), skip_bad_images=True, extractor=ex)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    real, calls = io_utils.atomic_open, []

    def failing_open(path, mode="w", **kw):
        calls.append(path)
        if len(calls) == 5:  # the fifth file: a PNG in the middle of the run
            return _failing(real(path, mode, **kw))
        return real(path, mode, **kw)

    monkeypatch.setattr(io_utils, "atomic_open", failing_open)
    with pytest.raises(OSError, match="No space left"):
        predicting.predict(
            m, root, str(out), skip_bad_images=True, extractor=ex, overwrite=True, threshold="0"
        )
    after = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before  # the earlier prediction, byte for byte
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging folder, no lock left


class _failing:
    """Wraps a real atomic_open context so the write fails like a full disk does."""

    def __init__(self, ctx):
        self.ctx = ctx

    def __enter__(self):
        f = self.ctx.__enter__()
        f.write = _enospc
        return f

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)


def test_unwritable_folders_are_named_before_any_work(fitted, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        commands.fit_and_save(tiny_config(), fitted[2], str(blocker / "m"))
    with pytest.raises(PermissionError, match=str(blocker)):
        predicting.predict(fitted[0], fitted[2], str(blocker / "out"))


def test_nan_features_name_the_image(fitted, ex, tmp_path):
    m, _, root, _ = fitted
    poisoned = folder.list_images(root).records[3].path

    def apply(variables, imgs):
        out = ex.apply(variables, imgs)
        bad = jnp.all(imgs == jnp.asarray(images.load(poisoned, 32, 32))[None], axis=(1, 2, 3))
        return jnp.where(bad[:, None, None, None], jnp.nan, out)

    nan_ex = dataclasses.replace(ex, apply=apply)
    with pytest.raises(FloatingPointError, match=os.path.basename(poisoned)):
        fitting.fit(tiny_config(), root, fitting.Options(skip_bad_images=True), nan_ex)
    with pytest.raises(FloatingPointError, match=os.path.basename(poisoned)):
        predicting.predict(m, root, str(tmp_path), skip_bad_images=True, extractor=nan_ex)
    assert os.listdir(tmp_path) == []


def test_bad_inputs_fail_fast_with_the_name(fitted, ex, tmp_path):
    m, _, root, _ = fitted
    with pytest.raises(images.BadImageError, match=r"broken.png.*--skip_bad_images"):
        predicting.predict(m, root, str(tmp_path / "o"), extractor=ex)
    assert not os.path.exists(tmp_path / "o" / "predictions.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images found"):
        fitting.fit(tiny_config(), str(tmp_path / "empty"), extractor=ex)
    with pytest.raises(ValueError, match="threshold 'mad3'"):
        fitting.fit(tiny_config(), root, fitting.Options(threshold="mad3"), ex)
    with pytest.raises(FileNotFoundError, match="not a saved model"):
        model.load(str(tmp_path))


def test_predict_honours_scoring_search_with_the_exact_searchs_results(
    fitted, ex, tmp_path, monkeypatch
):
    """Deploy scores through `scoring.score_banks` (the composition experiments use) with the
    model's `scoring.search`: "auto" and the certified bfloat16 search (emulated on CPU, where
    "auto" is exact) give the exact search's scores and maps, bit for bit."""
    m, _, root, _ = fitted

    def with_search(search):
        config = json.loads(json.dumps(m.meta["config"]))
        config["scoring"]["search"] = search
        return dataclasses.replace(m, meta={**m.meta, "config": config})

    calls = []
    certified = scoring.nearest_certified
    monkeypatch.setattr(
        scoring, "nearest_certified", lambda *a, **k: calls.append(k) or certified(*a, **k)
    )
    composed = scoring.score_banks
    searches = []
    monkeypatch.setattr(
        scoring,
        "score_banks",
        lambda *a, **k: searches.append(a[4].search) or composed(*a, **k),
    )
    rows = {}
    for search in ("exact", "auto", "emulated"):
        out = tmp_path / search
        rows[search] = predicting.predict(
            with_search(search), root, str(out), skip_bad_images=True, extractor=ex
        )
    assert set(searches) == {"exact", "auto", "emulated"}  # one scoring function behind all
    assert calls and all(k.get("emulate") for k in calls)  # the certified search really ran
    for search in ("auto", "emulated"):
        for key in ("score", "map_max"):
            assert [r[key] for r in rows[search]] == [r[key] for r in rows["exact"]], (search, key)


def test_params_hash_is_remembered_only_for_the_same_leaves(ex):
    """The compatibility check's parameter hash (weights.variables_sha256 the oracle) is reused
    for the very same jax leaves and recomputed for any other tree."""
    want = weights.variables_sha256(ex.variables)
    assert model._params_sha256(ex.variables) == want
    assert model._params_sha256(ex.variables) == want  # remembered
    changed = jax.tree.map(lambda a: a + 1, ex.variables)
    assert model._params_sha256(changed) == weights.variables_sha256(changed) != want
    host = jax.tree.map(np.array, ex.variables)  # numpy leaves may change in place: never kept
    assert model._params_sha256(host) == want
    host_leaf = jax.tree.leaves(host)[0]
    host_leaf += 1
    assert model._params_sha256(host) != want


def test_feature_dim_is_traced_once_per_extractor(ex, monkeypatch):
    """identity()'s embedding dim equals the extractor's real output width (the oracle: one
    forward pass) and is traced once, not on every predict."""
    model._DIM_CACHE.clear()
    traced = []
    real = jax.eval_shape
    monkeypatch.setattr(jax, "eval_shape", lambda *a, **k: traced.append(1) or real(*a, **k))
    want = ex.apply(ex.variables, np.zeros((1, *ex.image_size, 3), np.uint8)).shape[-1]
    assert model._feature_dim(ex) == want
    assert model._feature_dim(ex) == want
    assert len(traced) == 1
