"""`deploy export` (issue 23): a tiny random-init model exported to ONNX scores a folder in ONNX
Runtime and in OpenVINO through the standalone runner (launch/onnx_predict.py) as `deploy predict`
does: the same rows and columns, scores to 1e-4 relative, the same decisions, the same maps; its
metadata says how to use it; bad inputs are one-line errors that write nothing. The oracle is the
runtime running the file against the package's own predict. Random-init features: plumbing only.
"""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from deploy_helpers import defective_image, normal_image, tiny_config
from PIL import Image

pytest.importorskip("onnx", reason="export tests need onnx (requirements-test.txt)")
ort = pytest.importorskip("onnxruntime", reason="export tests need onnxruntime")
pytest.importorskip("jax2onnx", reason="deploy export needs jax2onnx (README: export)")

from softpatch_jax import io_utils  # noqa: E402
from softpatch_jax.data import folder  # noqa: E402
from softpatch_jax.deploy import commands, export, model, outdir, predicting, region  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, "launch", "onnx_predict.py")
FRAME = 48  # images 48x48, resize 40, crop 32: a 40x40 frame of 2x2 overlapping tiles


def _config():
    c = tiny_config()
    c.dataset.resize = 40
    return c


def _runner():
    spec = importlib.util.spec_from_file_location("onnx_predict", RUNNER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """A fitted tiny model, a test folder in several file modes, its deploy prediction, and an
    export of the model."""
    rng = np.random.default_rng(3)
    train = tmp_path_factory.mktemp("train")
    for i in range(10):
        Image.fromarray(normal_image(rng, FRAME)).save(train / f"n{i:02d}.png")
    test = tmp_path_factory.mktemp("test")
    Image.fromarray(normal_image(rng, FRAME)).save(test / "a.png")
    Image.fromarray(defective_image(rng, FRAME)).save(test / "b_defect.png")
    Image.fromarray(normal_image(rng, FRAME)[..., 0]).save(test / "c_gray.png")
    g16 = normal_image(rng, FRAME)[..., 0].astype(np.uint16) * 257
    Image.fromarray(g16).save(test / "d_16bit.png")
    Image.fromarray(defective_image(rng, FRAME)).save(test / "e.jpg", quality=95)
    os.makedirs(test / "sub")
    Image.fromarray(normal_image(rng, FRAME)).convert("P").save(test / "sub" / "f_pal.png")
    work = tmp_path_factory.mktemp("work")
    mdir = str(work / "model")
    commands.fit_and_save(_config(), str(train), mdir)
    pred = str(work / "pred")
    commands.run_predict(mdir, str(test), pred)
    onnx_path = str(work / "m.onnx")
    meta = export.export(mdir, onnx_path)
    return {"model": mdir, "test": str(test), "pred": pred, "onnx": onnx_path, "meta": meta}


def _csv(path):
    import csv

    with open(os.path.join(path, "predictions.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _run(onnx_path, images, out, *extra):
    return _runner().main([f"--model={onnx_path}", f"--images={images}", f"--out={out}", *extra])


def _blocked_run(argv, cwd, blocked):
    """The runner as a script from `cwd`, with the modules `blocked` made unimportable."""
    block = (
        "import sys, runpy; "
        f"[sys.modules.__setitem__(n, None) for n in {tuple(blocked)!r}]; "
        f"sys.argv = ['onnx_predict.py', *{list(argv)!r}]; "
        f"runpy.run_path({RUNNER!r}, run_name='__main__')"
    )
    return subprocess.run([sys.executable, "-c", block], cwd=cwd, capture_output=True, text=True)


def _assert_matches_deploy_predict(line, out):
    """The runner's folder `out` against deploy predict's: the same columns and rows, scores to 1e-4
    relative, the same decisions, and maps within 1e-4 of their peak of the package's own maps
    (recomputed here as predict computes them)."""
    ref, got = _csv(line["pred"]), _csv(out)
    assert list(ref[0]) == list(got[0])  # the same columns, in order
    assert [r["image"] for r in ref] == [g["image"] for g in got]
    assert any(r["anomalous"] == "True" for r in ref) and any(
        r["anomalous"] == "False" for r in ref
    )
    m = model.load(line["model"])
    ex = predicting.build_extractor(m)
    run = predicting._scorer(m, ex)
    for r, g in zip(ref, got):
        assert float(g["score"]) == pytest.approx(float(r["score"]), rel=1e-4), r["image"]
        assert g["anomalous"] == r["anomalous"] and g["threshold"] == r["threshold"]
        assert g["region"] == r["region"] and g["heatmap"] == r["heatmap"]
        v = region.load(folder.unescape(r["path"]), 40, 32, "full")
        _, _, maps = predicting._score_tiles(run, ex.batch_size, v.tiles)
        want = region.stitch(maps, v.origins, v.frame.shape[:2])
        have = np.load(os.path.join(out, "maps", folder.unescape(r["image"]) + ".npy"))
        assert have.shape == want.shape == (40, 40)
        np.testing.assert_allclose(have, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))
        assert float(g["map_max"]) == pytest.approx(float(r["map_max"]), rel=1e-4)
        assert os.path.isfile(os.path.join(out, g["heatmap"]))


def test_runner_matches_deploy_predict_rows_scores_decisions_and_maps(line, tmp_path):
    out = str(tmp_path / "onnx_pred")
    assert _run(line["onnx"], line["test"], out, "--save_maps_npy") == 0
    _assert_matches_deploy_predict(line, out)


def test_metadata_says_how_to_use_the_file(line):
    import onnx

    proto = onnx.load(line["onnx"], load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props[export.META_KEY])
    with open(os.path.join(line["model"], model.MANIFEST), "rb") as f:
        assert meta["model_sha256"] == props["model_sha256"] == hashlib.sha256(f.read()).hexdigest()
    summary = io_utils.read_json(os.path.join(line["pred"], predicting.MARKER))
    assert meta["threshold"] == summary["threshold"]["value"] == float(props["threshold"])
    assert meta["frame_hw"] == [40, 40] and meta["resize"] == 40 and meta["crop"] == 32
    assert meta["input_shape"] == [1, 40, 40, 3] and meta["input_dtype"] == "uint8"
    assert meta["model_format"] == model.FORMAT_VERSION and meta["export_format"] == 1
    assert meta["region"] == "full" and meta["tiles"] == 4 and meta["random_init"] is True
    np.testing.assert_allclose(json.loads(props["normalisation_mean"]), [123.675, 116.28, 103.53])
    sess = ort.InferenceSession(line["onnx"], providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "frames" and inp.shape == [1, 40, 40, 3] and inp.type == "tensor(uint8)"
    assert [o.name for o in sess.get_outputs()] == ["score", "anomaly_map"]


def test_runner_runs_without_jax_or_the_package(line, tmp_path):
    out = str(tmp_path / "p")
    argv = [f"--model={line['onnx']}", f"--images={line['test']}", f"--out={out}"]
    blocked = ("jax", "jaxlib", "flax", "softpatch_jax", "openvino")
    res = _blocked_run(argv, str(tmp_path), blocked)
    assert res.returncode == 0, res.stderr
    assert [r["score"] for r in _csv(out)] != []


def test_openvino_runner_matches_deploy_predict(line, tmp_path):
    """--runtime=openvino: OpenVINO reads the .onnx file itself; scores, decisions and maps equal
    deploy predict's (the package recomputes the maps), with jax, the package and onnxruntime
    unimportable (only the chosen runtime is imported)."""
    pytest.importorskip("openvino", reason="the OpenVINO runner path needs openvino")
    out = str(tmp_path / "ov")
    argv = [f"--model={line['onnx']}", f"--images={line['test']}", f"--out={out}"]
    no_jax = ("jax", "jaxlib", "flax", "softpatch_jax", "onnxruntime")
    res = _blocked_run([*argv, "--runtime=openvino", "--save_maps_npy"], str(tmp_path), no_jax)
    assert res.returncode == 0, res.stderr
    summary = io_utils.read_json(os.path.join(out, predicting.MARKER))
    assert summary["runtime"].startswith("openvino ") and "f32" in summary["runtime"]
    _assert_matches_deploy_predict(line, out)
    # the chosen runtime missing: one line, exit status 2, nothing written
    res = _blocked_run(
        [*argv[:2], f"--out={tmp_path / 'none'}", "--runtime=openvino"],
        str(tmp_path),
        ("openvino",),
    )
    assert res.returncode == 2 and not os.path.exists(tmp_path / "none")
    assert res.stderr.count("\n") == 1 and "needs the openvino package" in res.stderr


def test_float16_bank_with_external_data(line, tmp_path):
    path = str(tmp_path / "f16.onnx")
    meta = export.export(line["model"], path, bank_dtype="float16", external_data=True)
    assert meta["external_data"] == "f16.onnx.data" and os.path.isfile(path + ".data")
    out = str(tmp_path / "p16")
    assert _run(path, line["test"], out, "--nowrite_maps") == 0
    for r, g in zip(_csv(line["pred"]), _csv(out)):
        assert float(g["score"]) == pytest.approx(float(r["score"]), rel=1e-2)
    # OpenVINO reads the external data beside the file too, and computes what ONNX Runtime does
    pytest.importorskip("openvino", reason="the OpenVINO runner path needs openvino")
    out_ov = str(tmp_path / "p16_ov")
    assert _run(path, line["test"], out_ov, "--nowrite_maps", "--runtime=openvino") == 0
    for r, g in zip(_csv(out), _csv(out_ov)):
        assert float(g["score"]) == pytest.approx(float(r["score"]), rel=1e-4), r["image"]
        assert g["anomalous"] == r["anomalous"]


def _no_leftovers(folder_path):
    return [n for n in os.listdir(folder_path) if ".staging-" in n or ".old-" in n]


def test_bad_inputs_are_one_line_errors_and_write_nothing(line, tmp_path):
    out = str(tmp_path / "x.onnx")
    # an unfinished model folder
    os.makedirs(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="is not a saved model") as e:
        export.export(str(tmp_path / "half"), out)
    # a model of another format
    other = str(tmp_path / "old_model")
    import shutil

    shutil.copytree(line["model"], other)
    meta = io_utils.read_json(os.path.join(other, model.META))
    meta["code"]["format"] = 2
    io_utils.write_json(os.path.join(other, model.META), meta)
    with pytest.raises(model.IncompatibleModelError, match="format 2"):
        export.export(other, out)
    # an unwritable output (its folder is a file)
    with open(tmp_path / "afile", "w") as f:
        f.write("x")
    with pytest.raises(PermissionError, match="not writable"):
        export.export(line["model"], str(tmp_path / "afile" / "m.onnx"))
    assert not os.path.exists(out) and _no_leftovers(str(tmp_path)) is not None
    assert _no_leftovers(str(tmp_path)) == []
    # an existing output without --overwrite, and a foreign file even with it
    with open(out, "w") as f:
        f.write("my notes")
    with pytest.raises(outdir.OutputFolderError, match="--overwrite"):
        export.export(line["model"], out)
    with pytest.raises(outdir.OutputFolderError, match="not a model exported by this tool"):
        export.export(line["model"], out, overwrite=True)
    with open(out) as f:
        assert f.read() == "my notes"
    for err in (e.value,):
        assert "\n" not in str(err)
    # the runner: a file that is not an export
    res = _runner().main([f"--model={out}", f"--images={line['test']}", "--out=/tmp/never"])
    assert res == 2 and not os.path.exists("/tmp/never")


def test_cli_refuses_an_existing_output_in_one_line(line, tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "softpatch_jax.deploy",
            "export",
            f"--model={line['model']}",
            f"--out={line['onnx']}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "already exists" in lines[0] and "--overwrite" in lines[0]


def test_bench_deploy_latency_times_the_exported_model(line, monkeypatch):
    """`launch.bench --stages=deploy_latency` exports the model per region and times onnxruntime
    beside `deploy predict` on the same images (a wrong runtime argument once broke only this path).
    The issue's table rows (backbone, features, the 12,544-query search) are their own function,
    stubbed here: their inputs are synthetic and sized for the bench, not for a test."""
    import types

    from launch.bench import latency

    monkeypatch.setattr(latency, "_table_rows", lambda *a, **k: {})
    args = types.SimpleNamespace(
        deploy_model=line["model"],
        deploy_images=line["test"],
        latency_images=3,
        reference_path="",
        onnx=True,
        repeats=1,
        seed=0,
    )
    report = latency.deploy_latency(args, None)
    assert report["images"] == 3
    for label in ("images_1", "images_3"):
        med = report[label]["median_s"]
        want = {"predict_center", "predict_full", "onnx_center", "onnx_full"}
        assert want <= set(med) and all(med[k] > 0 for k in want)
        assert {"predict_center / onnx_center", "predict_full / onnx_full"} <= set(
            report[label]["ratios"]
        )
