"""The deployment tool on a production line (issue 17): a damaged model, a hostile folder, a full disk,
a misspelt config key or a second writer must never pass a defect or destroy data, and the whole
frame is inspected. Each test builds the hostile case by hand and checks the exact outcome."""

import csv
import errno
import json
import os
import shutil
import stat

import numpy as np
import pytest
from deploy_helpers import (
    defective_image,
    fit_tiny_model,
    normal_image,
    tiny_config,
    tiny_extractor,
    write_folder,
)
from PIL import Image

from softpatch_jax import io_utils, weights
from softpatch_jax.data import folder
from softpatch_jax.deploy import commands, model, outdir, predicting, region, threshold
from softpatch_jax.experiment import config_errors


@pytest.fixture(scope="module")
def ex():
    return tiny_extractor()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, ex):
    return fit_tiny_model(tmp_path_factory, ex)


def _copy_model(path, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(path, dst)
    return dst


def _largest_array_file(path):
    files = [
        os.path.join(d, f) for d, _, fs in os.walk(os.path.join(path, model.ARRAYS)) for f in fs
    ]
    return max(files, key=os.path.getsize)


# 1. A corrupted model never scores.
def test_flipped_bytes_in_an_array_fail_load_naming_model_and_file(fitted, tmp_path):
    dst = _copy_model(fitted[1], tmp_path)
    victim = _largest_array_file(dst)
    data = bytearray(open(victim, "rb").read())
    n = min(4096, len(data))
    data[:n] = bytes(b ^ 0xFF for b in data[:n])
    open(victim, "wb").write(bytes(data))
    rel = os.path.relpath(victim, dst)
    with pytest.raises(model.DamagedModelError, match="sha256 differs") as err:
        model.load(dst)
    assert dst in str(err.value) and rel in str(err.value)


def test_missing_or_added_array_file_and_missing_manifest_are_named(fitted, tmp_path):
    dst = _copy_model(fitted[1], tmp_path)
    victim = _largest_array_file(dst)
    os.unlink(victim)
    with pytest.raises(model.DamagedModelError, match=os.path.basename(victim) + ": missing"):
        model.load(dst)
    shutil.rmtree(dst)
    dst = _copy_model(fitted[1], tmp_path)
    open(os.path.join(dst, model.ARRAYS, "stray.bin"), "wb").write(b"x")
    with pytest.raises(model.DamagedModelError, match=r"stray\.bin: not in the manifest"):
        model.load(dst)
    os.unlink(os.path.join(dst, model.MANIFEST))
    with pytest.raises(model.DamagedModelError, match=r"no manifest\.json"):
        model.load(dst)


def test_config_edit_breaks_the_checksum(fitted, tmp_path):
    dst = _copy_model(fitted[1], tmp_path)
    meta = io_utils.read_json(os.path.join(dst, model.META))
    meta["config"]["softpatch"]["tau"] = 0.5
    io_utils.write_json(os.path.join(dst, model.META), meta)
    with pytest.raises(model.DamagedModelError, match=r"model\.json: "):
        model.load(dst)


def test_a_model_of_an_older_format_is_refused_naming_its_file_and_the_format(fitted, tmp_path, ex):
    # The parameter hash is the project's one (weights.variables_sha256) since format 3.
    meta = io_utils.read_json(os.path.join(fitted[1], model.META))
    assert meta["backbone"]["params_sha256"] == weights.variables_sha256(ex.variables)
    assert meta["code"]["format"] == model.FORMAT_VERSION == 3
    dst = _copy_model(fitted[1], tmp_path)
    meta["code"]["format"] = 2  # refused before the manifest, which this edit breaks, is read
    io_utils.write_json(os.path.join(dst, model.META), meta)
    with pytest.raises(model.IncompatibleModelError) as err:
        model.load(dst)
    msg = str(err.value)
    assert os.path.join(dst, model.META) in msg and "format 2" in msg and "format 3" in msg
    assert "refit" in msg


def test_non_finite_bank_is_refused_even_with_a_matching_manifest(fitted, tmp_path, ex):
    m = fitted[0]
    cls = m.banks.cls
    inf_cls = model.MemoryBank(cls.feats_MxD.at[0, 0].set(np.inf), cls.weights_M, cls.index_M)
    bad = model.Model(model.Banks(inf_cls, inf_cls), m.projection_DxR, m.arrays, m.meta)
    path = str(tmp_path / "inf_model")
    model.save(bad, path)  # written consistently: the manifest matches the inf
    with pytest.raises(model.DamagedModelError, match="cls/feats holds 1 NaN/inf"):
        model.load(path)
    # In memory (no load): scoring gives -inf / inf; predict refuses to decide, writes nothing.
    bad.path = path
    with pytest.raises(model.DamagedModelError, match="non-finite score") as err:
        predicting.predict(bad, fitted[2], str(tmp_path / "out"), extractor=ex)
    assert path in str(err.value)
    assert not os.path.exists(tmp_path / "out")


# 2. --overwrite replaces only a model, never the inputs.
def test_overwrite_never_deletes_the_inputs_or_a_foreign_folder(fitted, tmp_path, ex):
    photos = tmp_path / "photos"
    write_folder(str(photos), 4, 0)
    (photos / "notes.txt").write_text("line 7")
    before = sorted(p.name for p in photos.rglob("*"))
    for target, why in ((photos, "holds the input"), (photos / "sub", "lies inside the input")):
        with pytest.raises(outdir.OutputFolderError, match=why):
            commands.fit_and_save(
                tiny_config(), str(photos), str(target), overwrite=True, extractor=ex
            )
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.docx").write_text("keep me")
    with pytest.raises(
        outdir.OutputFolderError, match=r"not a model.*no \.softpatch-owned\.json.*report"
    ):
        commands.fit_and_save(tiny_config(), str(photos), str(other), overwrite=True, extractor=ex)
    assert sorted(p.name for p in photos.rglob("*")) == before
    assert (other / "report.docx").read_text() == "keep me"
    # A model is replaced with --overwrite, refused without.
    dst = _copy_model(fitted[1], tmp_path)
    with pytest.raises(outdir.OutputFolderError, match="pass --overwrite"):
        model.save(fitted[0], dst)
    model.save(fitted[0], dst, overwrite=True)
    model.load(dst)


# 3. Symlink loops and repeated links: each real file once.
def test_symlink_loop_and_repeated_links_give_each_real_file_once(tmp_path):
    for rel in ("a.png", "sub/b.png", "sub/deeper/c.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / rel)
    os.symlink("..", tmp_path / "sub" / "up")  # loop
    os.symlink("sub", tmp_path / "again")  # a second way into sub
    os.symlink("a.png", tmp_path / "z_link.png")  # a second name of a.png
    os.symlink("missing.png", tmp_path / "broken.png")
    os.mkfifo(tmp_path / "pipe.png")
    listing = folder.list_images(str(tmp_path))
    names = [listing.relative(r.path) for r in listing.records]
    assert sorted(os.path.realpath(r.path) for r in listing.records) == sorted(
        os.path.realpath(tmp_path / p) for p in ("a.png", "sub/b.png", "sub/deeper/c.png")
    )
    assert len(names) == 3
    reasons = {os.path.basename(p): why for p, why in listing.skipped}
    assert "symlink loop" in reasons["up"]
    assert reasons["z_link.png"].startswith("same file as") or reasons["a.png"].startswith("same")
    assert reasons["broken.png"] == "broken symbolic link"
    assert reasons["pipe.png"] == "not a regular file"


# 4. Names that are not UTF-8 round-trip through the CSV and JSON.
def test_escape_round_trips_any_bytes():
    rng = np.random.default_rng(0)
    cases = [b"caf\xe9.png", b"a\\xff.png", b"new\nline.png", "Käse.png".encode(), b"\\"]
    cases += [
        bytes(rng.integers(1, 256, 12, dtype=np.uint8)).replace(b"/", b"_") for _ in range(50)
    ]
    for raw in cases:
        text = folder.escape(os.fsdecode(raw))
        text.encode("utf-8")  # always writable
        assert "\n" not in text
        assert os.fsencode(folder.unescape(text)) == raw


def test_non_utf8_file_name_is_scored_written_and_recoverable(fitted, ex, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    raw = b"caf\xe9_part.png"
    rng = np.random.default_rng(3)
    Image.fromarray(normal_image(rng)).save(os.path.join(os.fsencode(str(src)), raw))
    Image.fromarray(normal_image(rng)).save(src / "plain.png")
    out = tmp_path / "out"
    rows = predicting.predict(fitted[0], str(src), str(out), extractor=ex)
    assert len(rows) == 2
    with open(out / "predictions.csv", encoding="utf-8") as f:
        got = {r["image"]: r for r in csv.DictReader(f)}
    assert os.fsencode(folder.unescape("caf\\xe9_part.png")) == raw
    assert "caf\\xe9_part.png" in got
    heat = os.path.join(
        os.fsencode(str(out)), os.fsencode(folder.unescape(got["caf\\xe9_part.png"]["heatmap"]))
    )
    assert os.path.isfile(heat)
    json.loads((out / "predictions.json").read_text(encoding="utf-8"))


# 5. The whole frame: tiles cover it, a defect outside the centre crop is found.
def test_tile_starts_cover_the_frame_by_hand():
    assert region.starts(224, 224) == [0]
    assert region.starts(256, 224) == [0, 32]
    assert region.starts(768, 224) == [0, 181, 363, 544]
    v = region.views(np.zeros((256, 768, 3), np.uint8), 256, 224, "full")
    assert v.tiles.shape == (8, 224, 224, 3)
    covered = region.stitch(np.ones((8, 224, 224), np.float32), v.origins, (256, 768))
    assert np.isfinite(covered).all()  # every pixel is inside some tile
    maps = np.zeros((8, 224, 224), np.float32)
    maps[0, 5, 7] = 3.0
    assert region.stitch(maps, v.origins, (256, 768))[5, 7] == 3.0
    # Each pixel belongs to the tile with the nearest centre: x centres 112, 293, 475, 656.
    own = region.owners(v.origins, 224, (256, 768))
    assert own[0, 202] == 0 and own[0, 203] == 1 and own[0, 383] == 1 and own[0, 384] == 2
    assert own[127, 0] == 0 and own[128, 0] == 4  # y centres 112 and 144: split at 128
    # 256x256 in 2x2 tiles of a 28x28 grid (stride 8): the owned patches are the frame's 32x32.
    v2 = region.views(np.zeros((256, 256, 3), np.uint8), 256, 224, "full")
    owned = region.owned_patches(v2.origins, 224, (28, 28), (256, 256))
    assert owned.shape == (4 * 28 * 28,) and owned.sum() == 32 * 32


def test_defect_in_the_left_third_of_a_wide_frame_is_found_and_drawn(fitted, ex, tmp_path):
    rng = np.random.default_rng(7)
    defect = defective_image(rng)
    wide = np.concatenate([defect, normal_image(rng), normal_image(rng)], axis=1)  # 96x32
    (tmp_path / "in").mkdir()
    Image.fromarray(wide).save(tmp_path / "in" / "wide.png")
    m = fitted[0]
    full = predicting.predict(m, str(tmp_path / "in"), str(tmp_path / "full"), extractor=ex)[0]
    centre = predicting.predict(
        m, str(tmp_path / "in"), str(tmp_path / "centre"), extractor=ex, region="center"
    )[0]
    assert full["anomalous"] and not centre["anomalous"]
    assert full["region"].startswith("full: whole 96x32 frame") and "3 tiles" in full["region"]
    assert "NOT inspected" in centre["region"]
    heat = np.asarray(Image.open(tmp_path / "full" / full["heatmap"]))
    assert heat.shape[:2] == (32, 96)
    brightness = heat.astype(float).sum(axis=2)
    _, x = np.unravel_index(np.argmax(brightness), brightness.shape)
    assert x < 32  # the hottest pixel is in the left third, where the magenta square is
    summary = io_utils.read_json(str(tmp_path / "full" / "predictions.json"))
    assert summary["region"]["mode"] == "full"


# 6. Thresholds finite, JSON valid.
def test_nan_and_inf_thresholds_are_refused_and_json_has_no_nan(tmp_path):
    for bad in ("nan", "inf", "-inf", "mad:nan", "quantile:nan", "mad:-1"):
        with pytest.raises(ValueError, match="threshold"):
            threshold.parse(bad)
    io_utils.write_json(
        str(tmp_path / "x.json"), {"a": float("nan"), "b": [1.0, float("inf")]}, strict=True
    )

    def no_constants(name):
        raise AssertionError(f"bare {name} in JSON")

    assert json.loads((tmp_path / "x.json").read_text(), parse_constant=no_constants) == {
        "a": None,
        "b": [1.0, None],
    }


# 7. Full disk names the path; the audit is staged whole.
def test_enospc_names_the_file(tmp_path, monkeypatch):
    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io_utils.json, "dump", full)
    with pytest.raises(OSError, match=r"No space left on device: '.*x\.json'"):
        io_utils.write_json(str(tmp_path / "x.json"), {})
    assert os.listdir(tmp_path) == []


def test_audit_failing_midway_leaves_nothing(fitted, tmp_path, monkeypatch):
    from softpatch_jax.deploy import render

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(render, "contact_sheet", full)
    with pytest.raises(OSError, match="No space left"):
        commands.run_audit(fitted[1], str(tmp_path / "audit"))
    assert os.listdir(tmp_path) == []


# 8. One writer at a time; leftovers cleaned and reported; umask; no stale maps.
def test_second_writer_is_refused_while_the_first_holds_the_lock(fitted, ex, tmp_path):
    out = str(tmp_path / "out")
    with outdir.lock(out):
        with pytest.raises(outdir.OutputFolderError, match=f"another run \\(pid {os.getpid()}\\)"):
            predicting.predict(fitted[0], fitted[2], out, extractor=ex)
    assert not os.path.exists(out)
    predicting.predict(fitted[0], fitted[2], out, extractor=ex)  # lock released


def test_leftovers_cleaned_and_reported_stale_maps_gone_and_umask_followed(fitted, ex, tmp_path):
    out = tmp_path / "out"
    old = os.umask(0o027)
    try:
        predicting.predict(fitted[0], fitted[2], str(out), extractor=ex)
        (tmp_path / ".out.staging-killed").mkdir()
        (out / ".predict-staging-old").mkdir()
        with pytest.raises(outdir.OutputFolderError, match="pass --overwrite"):
            predicting.predict(fitted[0], fitted[2], str(out), extractor=ex)
        predicting.predict(
            fitted[0], fitted[2], str(out), extractor=ex, write_maps=False, overwrite=True
        )
    finally:
        os.umask(old)
    assert sorted(os.listdir(out)) == [outdir.OWNED, "predictions.csv", "predictions.json"]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    summary = io_utils.read_json(str(out / "predictions.json"))
    assert sorted(os.path.basename(p) for p in summary["cleaned_leftovers"]) == [
        ".out.staging-killed",
        ".predict-staging-old",
    ]
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(out / "predictions.csv").st_mode) == 0o640


# 9. Config errors: one line, key, value, did-you-mean, range.
def test_config_errors_name_key_value_and_suggestion():
    c = tiny_config()
    msg = config_errors.unknown_key(c, "softpatch.tua")
    assert "unknown config key 'softpatch.tua'; did you mean 'softpatch.tau'?" in msg
    assert config_errors.unknown_key(c, "softpatch.tau") is None
    c.softpatch.tau = 5.0
    with pytest.raises(config_errors.ConfigError, match=r"softpatch.tau=5.0 .* \[0, 1\)"):
        config_errors.validate(c)
    c = tiny_config()
    c.softpatch.rank_scope = "global"
    with pytest.raises(config_errors.ConfigError, match=r"rank_scope='global'.*'all', 'position'"):
        config_errors.validate(c)
    config_errors.validate(tiny_config())


def test_full_frame_fit_on_wide_images_tiles_audits_and_refuses_mixed_sizes(ex, tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "wide"
    root.mkdir()
    for i in range(8):
        img = np.concatenate([normal_image(rng), normal_image(rng)[:, :16]], axis=1)  # 48x32
        Image.fromarray(img).save(root / f"n{i}.png")
    bad = np.concatenate([normal_image(rng), defective_image(rng)[:, 16:]], axis=1)
    Image.fromarray(bad).save(root / "d.png")
    m = commands.fit_and_save(tiny_config(), str(root), str(tmp_path / "m"), extractor=ex)
    reg = m.meta["region"]
    assert (reg["tiles"], reg["origins"], reg["frame_hw"]) == (2, [[0, 0], [0, 16]], [32, 48])
    assert reg["distinct_fraction"] == pytest.approx(48 * 32 / (2 * 32 * 32))
    assert m.arrays["keep"].shape == (9, 2 * 16)  # positions = tiles x patches
    assert os.path.getsize(tmp_path / "m" / "audit" / "contact_sheet.png") > 1000
    Image.fromarray(normal_image(rng)).save(root / "square.png")
    with pytest.raises(ValueError, match=r"one size.*square\.png.*32x32.*48x32"):
        commands.fit_and_save(tiny_config(), str(root), str(tmp_path / "m2"), extractor=ex)
    assert not os.path.exists(tmp_path / "m2")


def test_main_prints_one_line_for_a_misspelt_key():
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(
        [sys.executable, "-m", "softpatch_jax.main", "--config=configs/demo.py",
         "--workdir=/nonexistent/never_written", "--config.softpatch.tua=0.1"],
        capture_output=True, text=True, cwd=repo, timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo),
    )  # fmt: skip
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert "unknown config key 'softpatch.tua'; did you mean 'softpatch.tau'?" in lines[0]


def test_audit_never_replaces_its_model_but_may_refresh_model_audit(fitted, tmp_path):
    dst = _copy_model(fitted[1], tmp_path)
    with pytest.raises(outdir.OutputFolderError, match=r"inside \(or holds\) the model"):
        commands.run_audit(dst, dst, overwrite=True)
    with pytest.raises(outdir.OutputFolderError, match="pass --overwrite"):
        commands.run_audit(dst, os.path.join(dst, "audit"))
    commands.run_audit(dst, os.path.join(dst, "audit"), overwrite=True)
    model.load(dst)  # the manifest still holds
