"""Issue 25's hostile cases: each of its 16 findings rebuilt by hand and its exact outcome checked
(never delete what is not ours, never pass a defect silently, one line instead of a traceback).
Plumbing only: the tiny random-init config of deploy_helpers."""

import csv
import dataclasses
import errno
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from deploy_helpers import fit_tiny_model, normal_image, tiny_config, tiny_extractor
from PIL import Image

from softpatch_jax import cli, features, io_utils, outdir
from softpatch_jax.data import demo, folder, images
from softpatch_jax.deploy import commands, fitting, model, predicting, region, threshold
from softpatch_jax.experiment import config_errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ex():
    return tiny_extractor()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, ex):
    return fit_tiny_model(tmp_path_factory, ex)


def _tree(root) -> dict[str, str]:
    """{relative path: sha256} of every file under root (the user's files, byte for byte)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO),
    )  # fmt: skip


def _one_line(res: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith(("I", "W"))]
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr[-2000:]
    return lines[0]


SMALL_DEMO = demo.DemoSpec(size=32, num_train=2, num_test_good=1, num_per_defect=1)


# 1. The demo generator never deletes a folder it did not write.
def test_demo_generator_refuses_a_foreign_folder_and_replaces_only_its_own(tmp_path):
    root = tmp_path / "precious"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "thesis.txt").write_text("keep")
    spec = dataclasses.replace(SMALL_DEMO, categories=("pill",))
    for overwrite in (False, True):
        with pytest.raises(outdir.OutputFolderError, match=r"not a demo dataset.*it holds: sub"):
            demo.write(str(root), spec, overwrite=overwrite)
    assert _tree(root) == {"sub/thesis.txt": hashlib.sha256(b"keep").hexdigest()}
    assert sorted(os.listdir(tmp_path)) == ["precious"]  # no staging or lock left
    own = tmp_path / "own"
    demo.write(str(own), spec)
    with pytest.raises(outdir.OutputFolderError, match="pass --overwrite"):
        demo.write(str(own), spec)
    demo.write(str(own), spec, overwrite=True)
    assert os.path.isfile(own / "demo_spec.json")
    res = _main("-m", "softpatch_jax.data.demo", f"--out={root}", "--size=32")
    assert "not a demo dataset" in _one_line(res)
    assert (root / "sub" / "thesis.txt").read_text() == "keep"


# 2. make_demo into an existing folder: refused whole, nothing overwritten.
def test_make_demo_never_touches_an_existing_folder(tmp_path):
    out = tmp_path / "d2"
    (out / "source").mkdir(parents=True)
    (out / "train").mkdir()
    (out / "source" / "main.c").write_text("int main(){}")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(out / "train" / "img_0000.png")
    before = _tree(out)
    for overwrite in (False, True):
        with pytest.raises(outdir.OutputFolderError, match=r"'source'|it holds: source, train"):
            commands.make_demo(str(out), spec=SMALL_DEMO, overwrite=overwrite)
    assert _tree(out) == before
    fresh = tmp_path / "fresh"
    info = commands.make_demo(str(fresh), spec=SMALL_DEMO)
    assert info["train"] == len(os.listdir(fresh / "train")) == 2
    (fresh / "train" / "mine.png").write_bytes(b"x")
    with pytest.raises(outdir.OutputFolderError, match=r"holds 'train/mine\.png'"):
        commands.make_demo(str(fresh), spec=SMALL_DEMO, overwrite=True)
    os.unlink(fresh / "train" / "mine.png")
    commands.make_demo(str(fresh), spec=SMALL_DEMO, overwrite=True)  # only ours: replaced


# 3. --overwrite judges every entry, not the marker file.
def test_overwrite_refuses_photos_in_a_prediction_and_a_stray_marker(fitted, ex, tmp_path):
    m, _, train = fitted
    out = tmp_path / "pred"
    predicting.predict(m, train, str(out), extractor=ex)
    Image.fromarray(normal_image(np.random.default_rng(9))).save(out / "my_photo.png")
    with pytest.raises(outdir.OutputFolderError, match=r"holds 'my_photo\.png', which this tool"):
        predicting.predict(m, train, str(out), extractor=ex, overwrite=True)
    assert os.path.isfile(out / "my_photo.png")
    archive = tmp_path / "archive"
    archive.mkdir()
    Image.fromarray(normal_image(np.random.default_rng(0))).save(archive / "a.png")
    shutil.copy(out / "predictions.json", archive / "predictions.json")
    before = _tree(archive)
    with pytest.raises(outdir.OutputFolderError, match=r"holds a predictions\.json but no list"):
        predicting.predict(m, train, str(archive), extractor=ex, overwrite=True)
    assert _tree(archive) == before
    os.unlink(out / "my_photo.png")
    predicting.predict(m, train, str(out), extractor=ex, overwrite=True, write_maps=False)
    assert not os.path.exists(out / "heatmaps")  # ours, replaced whole


def test_fit_overwrite_refuses_notes_and_a_golden_folder_in_the_model(fitted, tmp_path):
    m, path, _ = fitted
    dst = tmp_path / "m"
    shutil.copytree(path, dst)
    (dst / "NOTES.txt").write_text("lot 7")
    (dst / "golden").mkdir()
    (dst / "golden" / "ref.png").write_bytes(b"png")
    before = _tree(dst)
    with pytest.raises(outdir.OutputFolderError, match=r"holds 'NOTES\.txt'"):
        model.save(m, str(dst), overwrite=True)
    os.unlink(dst / "NOTES.txt")
    with pytest.raises(outdir.OutputFolderError, match=r"holds 'golden'"):
        model.save(m, str(dst), overwrite=True)
    assert set(_tree(dst).items()) == set(before.items()) - {("NOTES.txt", before["NOTES.txt"])}
    shutil.rmtree(dst / "golden")
    model.save(m, str(dst), overwrite=True)
    model.load(str(dst))


# 4. A crash leftover holding the only copy is restored, and kept until the new output is in.
def test_crash_leftover_is_restored_and_kept_until_the_new_output_is_in_place(tmp_path):
    target = tmp_path / "out"
    with outdir.staged(str(target), "x.txt", "test") as (stage, _):
        open(os.path.join(stage, "x.txt"), "w").write("first")
    old = tmp_path / ".out.old-killed"
    old.mkdir()
    os.replace(target, old / "out")  # killed between the two renames: the only copy
    with pytest.raises(RuntimeError, match="boom"):
        with outdir.staged(str(target), "x.txt", "test", overwrite=True) as (stage, cleaned):
            raise RuntimeError("boom")
    assert (target / "x.txt").read_text() == "first"  # restored, though the run failed
    assert not old.exists()
    old2 = tmp_path / ".out.old-killed2"
    old2.mkdir()
    shutil.copytree(target, old2 / "out")  # a superseded copy: kept while the run works
    with outdir.staged(str(target), "x.txt", "test", overwrite=True) as (stage, cleaned):
        assert old2.exists() and str(old2) in cleaned
        open(os.path.join(stage, "x.txt"), "w").write("second")
    assert (target / "x.txt").read_text() == "second"
    assert sorted(os.listdir(tmp_path)) == ["out"]
    # Without --overwrite the restored output is kept and the run refused.
    os.mkdir(old)
    os.replace(target, old / "out")
    with pytest.raises(outdir.OutputFolderError, match=r"already holds a test.*pass --overwrite"):
        with outdir.staged(str(target), "x.txt", "test"):
            pass
    assert (target / "x.txt").read_text() == "second"


# 5. A threshold that computes to inf passes every defect: refused, naming the rule.
def test_a_rule_that_computes_a_non_finite_threshold_is_refused(fitted, ex, tmp_path):
    scores = np.array([1.0, 3.0, 5.0, 20.0])  # median 4, MAD 2
    assert threshold.value("mad:3", scores) == pytest.approx(4 + 3 * 1.4826 * 2)
    with pytest.raises(ValueError, match=r"threshold 'mad:1e308' gives inf"):
        threshold.value("mad:1e308", scores)
    # Beyond float32 (the scores' type) no score can exceed it: as good as inf.
    with pytest.raises(ValueError, match=r"threshold 'mad:1e300' gives 2\.96.*e\+300"):
        threshold.value("mad:1e300", scores)
    with pytest.raises(ValueError, match="1e39"):
        threshold.value("1e39", scores)
    assert threshold.value("3e38", scores) == 3e38
    with pytest.raises(ValueError, match="mad:1e308"):
        predicting.predict(
            fitted[0], fitted[2], str(tmp_path / "p"), threshold="mad:1e308", write_maps=False,
            extractor=ex,
        )  # fmt: skip
    assert not os.path.exists(tmp_path / "p")


# 6. 12-bit data in 16-bit PNGs: the range is found at fit, recorded, used and checked at predict.
def test_twelve_bit_pngs_use_their_range_recorded_with_the_model(ex, tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "t12"
    root.mkdir()
    for i in range(6):
        grey = normal_image(rng)[..., 0].astype(np.uint16) * 16  # 0..4080: a 12-bit sensor
        Image.fromarray(grey).save(root / f"{i}.png")
    assert images.sixteen_bit_range([str(root / "0.png")]) == (4095, 1)
    assert images.sixteen_bit_range([]) == (65535, 0)
    grey = np.asarray(Image.open(root / "0.png"), np.float64)
    by_hand = np.clip(np.rint(grey * 255 / 4095), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(images.decode(str(root / "0.png"), 4095)[..., 0], by_hand)
    fixed = images.decode(str(root / "0.png"))
    assert len(np.unique(fixed)) <= 17 < len(np.unique(by_hand))  # the fixed scale's squeeze
    m = commands.fit_and_save(tiny_config(), str(root), str(tmp_path / "m"), extractor=ex)
    assert m.meta["decoding"]["sixteen_bit_max"] == 4095
    assert model.load(str(tmp_path / "m")).meta["decoding"]["sixteen_bit_images"] == 6
    hot = tmp_path / "hot.png"
    Image.fromarray(np.full((32, 32), 5000, np.uint16)).save(hot)
    with pytest.raises(images.BadImageError, match=r"16-bit sample value 5000 is above 4095"):
        predicting.predict(m, str(hot), str(tmp_path / "p"), extractor=ex)
    rows = predicting.predict(m, str(root), str(tmp_path / "p2"), extractor=ex, write_maps=False)
    assert len(rows) == 6


# 7. Identical training images: a threshold without margin is a warning, kept in the model.
def test_degenerate_training_set_is_warned_and_recorded(ex, tmp_path):
    assert threshold.spread_warning(np.array([1.0, 2.0, 3.0])) is None
    assert "all 3 held-out" in threshold.spread_warning(np.zeros(3))
    assert "MAD = 0" in threshold.spread_warning(np.array([1.0, 1.0, 1.0, 5.0]))
    root = tmp_path / "same"
    root.mkdir()
    img = normal_image(np.random.default_rng(0))
    # 8 = the extractor's batch_size: one batch. Identical images then usually get bitwise
    # identical features and all held-out scores are 0 ("no margin"); a CPU whose vectorisation
    # rounds batch rows differently leaves some at ~1e-14 and the warning is the MAD = 0 one.
    # Either way the degenerate set is warned about and the warning is saved.
    for i in range(8):
        Image.fromarray(img).save(root / f"s{i}.png")
    m = commands.fit_and_save(tiny_config(), str(root), str(tmp_path / "m"), extractor=ex)
    saved = io_utils.read_json(str(tmp_path / "m" / "model.json"))["threshold"]
    assert saved["value"] == pytest.approx(0.0, abs=1e-6)
    assert saved["warning"]
    assert "no margin" in saved["warning"] or "(MAD = 0)" in saved["warning"]
    assert m.meta["threshold"]["warning"] == saved["warning"]


# 8. a.jpg and a.jpg.png get their own maps.
def test_every_input_gets_its_own_map_names(fitted, ex, tmp_path):
    names = ["a.jpg", "a.jpg.png", "a.png", "sub/a.png"]
    assert len({predicting._png_name(n) for n in names}) == len(names)
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for n in names:
        Image.fromarray(normal_image(rng)).save(src / n, format="JPEG" if n == "a.jpg" else "PNG")
    rows = predicting.predict(fitted[0], str(src), str(tmp_path / "p"), extractor=ex)
    assert len({r["heatmap"] for r in rows}) == len({r["overlay"] for r in rows}) == 4
    for r in rows:
        assert os.path.isfile(tmp_path / "p" / r["heatmap"])
        assert r["heatmap"] == os.path.join("heatmaps", r["image"] + ".png")


# 9. Truth labels parsed or refused; unknown rows refused; --top < 0 refused.
def test_truth_labels_unknown_rows_and_negative_top(fitted, tmp_path):
    m, path, train = fitted
    names = list(m.meta["training"]["images"])

    def truth(rows, name="t.csv"):
        p = tmp_path / name
        p.write_text("image,defective\n" + "".join(f"{a},{b}\n" for a, b in rows))
        return str(p)

    want = np.arange(len(names)) % 3 == 0
    for yes, no in (("1.0", "0.0"), ("yes", "no"), ("True", "false"), ("1", "0")):
        csv_path = truth([(n, yes if w else no) for n, w in zip(names, want)])
        np.testing.assert_array_equal(commands.read_truth(csv_path, names, train), want)
    with pytest.raises(ValueError, match=r"line 2: defective='maybe' not understood"):
        commands.read_truth(truth([(n, "maybe") for n in names], "maybe.csv"), names, train)
    extra = truth([(n, "0") for n in names] + [("not_there.png", "1")], "extra.csv")
    with pytest.raises(ValueError, match=r"not in the training folder.*not_there\.png"):
        commands.read_truth(extra, names, train)
    with pytest.raises(ValueError, match=r"--top=-1"):
        commands.run_audit(path, str(tmp_path / "a"), top=-1)
    summary = commands.run_audit(path, str(tmp_path / "a"), truth_csv=csv_path)
    table = summary["precision_recall"]
    assert {r["k"] for r in table} == {int(want.sum())}  # the labels were read, not all "normal"
    assert all(np.isfinite(r["precision"]) for r in table)


# 10. An output inside the model folder would damage it: refused.
def test_output_inside_the_model_is_refused(fitted, ex, tmp_path):
    _, path, train = fitted
    dst = tmp_path / "m"
    shutil.copytree(path, dst)
    loaded = model.load(str(dst))
    inside = str(dst / model.ARRAYS / "x")
    with pytest.raises(outdir.OutputFolderError, match=r"inside \(or holds\) the model"):
        predicting.predict(loaded, train, inside, extractor=ex)
    with pytest.raises(outdir.OutputFolderError, match=r"inside \(or holds\) the model"):
        commands.run_audit(str(dst), inside)
    model.load(str(dst))  # still verifies


# 11. Non-finite and out-of-range config values fail at fit, before any work.
@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("scoring.blur_sigma", float("inf"), "finite"),
        ("softpatch.gaussian_eps", float("nan"), "finite"),
        ("softpatch.gaussian_eps", -1.0, r"a finite number > 0"),
        ("coreset.ratio", float("nan"), "finite"),
    ],
)
def test_bad_numbers_are_refused_before_any_work(key, value, expected, tmp_path, monkeypatch):
    c = tiny_config()
    section, name = key.split(".")
    c[section][name] = value
    monkeypatch.setattr(features, "build", lambda *_: pytest.fail("work started"))
    with pytest.raises(config_errors.ConfigError, match=rf"{key}=.* {expected}"):
        commands.fit_and_save(c, str(tmp_path), str(tmp_path / "m"))
    assert not os.path.exists(tmp_path / "m")


# 12. The same key twice: the bad value is the one reported. (A float-typed key: softpatch.tau
# also takes the words "auto" and "oracle", so any string parses there and is judged by its rule.)
def test_a_key_given_twice_reports_the_bad_value():
    for args in (("0.1", "abc"), ("abc", "0.1")):
        res = _main(
            "-m", "softpatch_jax.main", "--config=configs/demo.py", "--workdir=/nonexistent/x",
            *(f"--config.coreset.ratio={a}" for a in args),
        )  # fmt: skip
        line = _one_line(res)
        assert "coreset.ratio='abc' is invalid" in line and "given 2 times" in line


# 13. A missing truth file fails before the fit.
def test_missing_truth_fails_before_fitting(fitted, tmp_path, monkeypatch):
    monkeypatch.setattr(fitting, "fit", lambda *a, **k: pytest.fail("fit started"))
    with pytest.raises(FileNotFoundError, match=r"MISSING\.csv"):
        commands.fit_and_save(
            tiny_config(), fitted[2], str(tmp_path / "m"), truth_csv=str(tmp_path / "MISSING.csv")
        )
    bad = tmp_path / "t.csv"
    bad.write_text("image,defective\nimg_00.png,perhaps\n")
    with pytest.raises(ValueError, match="perhaps"):
        commands.fit_and_save(tiny_config(), fitted[2], str(tmp_path / "m"), truth_csv=str(bad))


# 14. A full disk while writing the lock's pid names the lock file.
def test_enospc_in_the_lock_names_the_file(tmp_path, monkeypatch):
    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outdir.os, "pwrite", full)
    with pytest.raises(OSError, match=r"No space left on device: '.*\.out\.lock'"):
        with outdir.staged(str(tmp_path / "out"), "x", "test"):
            pass
    assert os.listdir(tmp_path) == []


# 15. One line, not a traceback: a model.json of [], a config file that does not load, main's
# input errors.
def test_damaged_model_json_and_config_files_are_one_line(fitted, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(fitted[1], dst)
    (dst / "model.json").write_text("[]")
    with pytest.raises(model.DamagedModelError, match=r"model\.json holds a JSON list"):
        model.load(str(dst))
    (tmp_path / "bad.py").write_text("def get_config(:\n")
    msg = config_errors.config_file_error([f"--config={tmp_path / 'bad.py'}"])
    assert "line 1" in msg and "syntax" in msg
    assert "does not exist" in config_errors.config_file_error(["--config=/nope/x.py"])
    assert config_errors.config_file_error(["--config=configs/demo.py"]) is None
    with pytest.raises(SystemExit) as e:
        cli.one_line_errors(model.load, str(dst))
    assert e.value.code == 2


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--config.methods=softpach_lof"], "did you mean 'softpatch_lof'?"),
        (["--config.dataset.layout=foo"], "unknown dataset layout 'foo'"),
        (["--config.dataset.root=/nonexistent/root", "--config.dataset.layout=mvtec"],
         "'/nonexistent/root' does not exist"),
    ],
)  # fmt: skip
def test_main_input_errors_are_one_line(args, expected, tmp_path):
    res = _main("-m", "softpatch_jax.main", "--config=configs/demo.py",
                f"--workdir={tmp_path / 'wd'}", *args)  # fmt: skip
    assert expected in _one_line(res)
    assert not os.path.exists(tmp_path / "wd")


def test_main_with_a_missing_config_file_or_a_file_as_workdir_is_one_line(tmp_path):
    res = _main("-m", "softpatch_jax.main", "--config=/nope/x.py", f"--workdir={tmp_path}")
    assert "config file '/nope/x.py' does not exist" in _one_line(res)
    (tmp_path / "f").write_text("")
    res = _main("-m", "softpatch_jax.main", "--config=configs/demo.py",
                "--config.dataset.categories=pill", "--config.noise.ratios=0.0",
                "--config.methods=patchcore", f"--workdir={tmp_path / 'f'}")  # fmt: skip
    assert "is not writable" in _one_line(res)


# 16. Formula-like names are guarded in CSVs; --allow_upscale is bounded; a second link is not
# a loop.
def test_csv_cells_are_guarded_and_round_trip(tmp_path):
    cells = ['=HYPERLINK("http://x")', "+1+1", "-2", "@SUM(A1)", "'quoted", "plain.png", "a=b"]
    io_utils.write_csv(str(tmp_path / "x.csv"), [{"image": c, "score": -1.5} for c in cells])
    with open(tmp_path / "x.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [
        "'" + c if c[0] in "=+-@'" else c for c in cells
    ]  # what a spreadsheet shows as text
    assert [io_utils.csv_unguard(r["image"]) for r in rows] == cells
    assert {r["score"] for r in rows} == {"-1.5"}  # numbers stay numbers


def test_formula_names_in_predictions_csv(fitted, ex, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(2)
    for n in ('=HYPERLINK("x").png', "+1+1.png"):
        Image.fromarray(normal_image(rng)).save(src / n)
    predicting.predict(fitted[0], str(src), str(tmp_path / "p"), extractor=ex, write_maps=False)
    with open(tmp_path / "p" / "predictions.csv", newline="") as f:
        firsts = sorted(r["image"][0] for r in csv.DictReader(f))
    assert firsts == ["'", "'"]
    names = sorted(
        r["image"] for r in io_utils.read_json(str(tmp_path / "p/predictions.json"))["rows"]
    )
    assert names == ["+1+1.png", '=HYPERLINK("x").png']  # the JSON keeps the real names


def test_upscaling_is_bounded(tmp_path):
    strip = tmp_path / "strip.png"
    Image.fromarray(np.full((4, 10000, 3), 128, np.uint8)).save(strip)
    with pytest.raises(images.BadImageError, match=r"640000x256 \(164 megapixels\), above"):
        region.load(str(strip), 256, 224, "full", allow_upscale=True)
    v = region.load(str(strip), 32, 32, "full", allow_upscale=True)  # 80000x32: within the bound
    assert v.frame.shape == (32, 80000, 3)
    with pytest.raises(images.BadImageError, match="pass --allow_upscale"):
        region.load(str(strip), 32, 32, "full")


def test_a_second_link_to_a_folder_is_not_called_a_loop(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a" / "x.png")
    os.symlink("a", tmp_path / "b")  # a second way in
    os.symlink("..", tmp_path / "a" / "up")  # a loop
    listing = folder.list_images(str(tmp_path))
    assert [os.path.relpath(r.path, tmp_path) for r in listing.records] == ["a/x.png"]
    reasons = {os.path.relpath(p, tmp_path): why for p, why in listing.skipped}
    assert reasons["b"].startswith("second link to the folder already listed as")
    assert "loop" not in reasons["b"]
    assert reasons["a/up"].startswith("symlink loop")


def test_tile_owners_match_the_nearest_centre_by_argmin_in_linear_memory():
    rng = np.random.default_rng(4)
    for length, crop in ((32, 32), (48, 32), (80000, 32), (257, 224), (1000, 7)):
        starts = region.starts(length, crop)
        got = region._nearest_start(starts, crop, length)
        if length * len(starts) <= 2_000_000:  # the old [length, tiles] table, as the oracle
            centres = np.asarray(starts, np.float64) + crop / 2.0
            pix = np.arange(length) + 0.5
            want = np.argmin(np.abs(pix[:, None] - centres[None, :]), axis=1)
            np.testing.assert_array_equal(got, want)
        else:
            sample = rng.integers(0, length, 1000)
            centres = np.asarray(starts, np.float64) + crop / 2.0
            d = np.abs((sample + 0.5)[:, None] - centres[None, :])
            np.testing.assert_array_equal(got[sample], np.argmin(d, axis=1))
