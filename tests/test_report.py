"""Result tables against hand-computed means and standard deviations; figures written as PNGs; the
report command on a run."""

import csv
import json
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from softpatch_jax import report, results, weights
from softpatch_jax.data.records import Record
from softpatch_jax.experiment import outputs

# (category, method, seed) -> (image AUROC, pixel AUROC), at noise 10%.
VALUES = {
    ("a", "patchcore", 0): (0.90, 0.50),
    ("a", "patchcore", 1): (0.80, 0.70),
    ("b", "patchcore", 0): (0.70, 0.60),
    ("b", "patchcore", 1): (0.60, 0.60),
    ("a", "softpatch_lof", 0): (1.00, 0.90),
    ("a", "softpatch_lof", 1): (0.95, 0.80),
    ("b", "softpatch_lof", 0): (0.85, 0.75),
    # ("b", "softpatch_lof", 1) missing: an unfinished sweep
}


def make_rows(weights="random-init", ratio=0.1, **extra):
    return [
        {
            "category": cat,
            "method": m,
            "seed": s,
            "image_auroc": im,
            "pixel_auroc": px,
            "noise_ratio": ratio,
            "overlap": True,
            "weights": weights,
            **extra,
        }
        for (cat, m, s), (im, px) in VALUES.items()
    ]


def cell_text(values):
    v = np.asarray(values)
    if len(v) == 1:
        return f"{v[0]:.3f}"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def test_tables_match_hand_computed_means_and_stds():
    rows = make_rows() + make_rows(ratio=0.2)
    built = results.tables(rows)
    assert [(t.metric, t.setting) for t in built] == [
        ("image_auroc", {"noise_ratio": 0.1}),
        ("pixel_auroc", {"noise_ratio": 0.1}),
        ("image_auroc", {"noise_ratio": 0.2}),
        ("pixel_auroc", {"noise_ratio": 0.2}),
    ]
    image = built[0]
    assert image.columns == ["patchcore", "softpatch_lof"]
    md = image.markdown()
    assert f"| a | {cell_text([0.9, 0.8])} | {cell_text([1.0, 0.95])} |" in md
    assert f"| b | {cell_text([0.7, 0.6])} | {cell_text([0.85])} |" in md
    # Mean row: per seed the mean over categories, then mean ± std over seeds. SoftPatch has
    # seed 1 for one category only, so only seed 0 counts there.
    patchcore_means = [(0.9 + 0.7) / 2, (0.8 + 0.6) / 2]
    assert f"| mean | {cell_text(patchcore_means)} | {cell_text([(1.0 + 0.85) / 2])} |" in md
    assert "mean ± std over 2 seeds" in image.title() and "noise 10%" in image.title()
    pixel = {r["category"]: r for r in built[1].records() if r["column"] == "patchcore"}
    assert pixel["a"]["mean"] == pytest.approx(0.6) and pixel["a"]["seeds"] == 2
    assert pixel["a"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert pixel["b"]["std"] == pytest.approx(0.0)


def test_every_title_says_random_init_and_real_results_do_not():
    for t in results.tables(make_rows()):
        assert results.RANDOM_INIT_TAG in t.title()
    for t in results.tables(make_rows(weights="/w/wrn50.safetensors")):
        assert "RANDOM" not in t.title()


def test_a_swept_field_can_name_the_columns():
    rows = [{**r, "softpatch.lof_k": k} for k in (4, 6) for r in make_rows()]
    rows = [r for r in rows if r["method"] == "softpatch_lof"]
    (image, _) = results.tables(rows, columns=["softpatch.lof_k"])
    assert image.columns == ["lof_k=4", "lof_k=6"] and image.setting == {}


def test_settings_are_ordered_by_value_not_by_text():
    # As text "[0.05]" sorts before "[0.0]" and "[0.25]" before "[0.2]".
    taus = (0.5, 0.05, 0.25, 0.0, 0.2, 0.1)
    rows = [{**r, "softpatch.tau": t} for t in taus for r in make_rows()]
    image_tables = [t for t in results.tables(rows) if t.metric == "image_auroc"]
    assert [t.setting["softpatch.tau"] for t in image_tables] == sorted(taus)


def _check_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0


def _write_sweep(workdir, rows, hints):
    os.makedirs(workdir)
    with open(os.path.join(workdir, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write('{"torn')  # an interrupted write is ignored
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
        json.dump({"config": {"sweep": {"report": hints}}}, f)


def test_write_report_tables_curves_and_anomaly_maps(tmp_path):
    rows = []
    for ratio in (0.0, 0.1, 0.2):
        for tau in (0.1, 0.2):
            rows += make_rows(ratio=ratio, **{"softpatch.tau": tau})
    work = str(tmp_path / "sweep")
    _write_sweep(work, rows, {"columns": "", "curves": "noise_ratio,softpatch.tau"})
    rng = np.random.default_rng(0)
    recs = [
        Record("/d/pill/test/good/0.png", 0, "good"),
        Record("/d/pill/test/hole/0.png", 1, "hole"),
    ]
    for method in ("patchcore", "softpatch_lof", "softpatch_plus"):
        meta = {"category": "pill", "method": method, "noise_ratio": 0.1, "overlap": True,
                "seed": 0, "weights": "random-init"}  # fmt: skip
        outputs.save_maps(
            os.path.join(work, "maps", f"{method}.npz"),
            recs,
            rng.integers(0, 255, (2, 16, 16, 3)).astype(np.uint8),
            rng.random((2, 16, 16)) > 0.8,
            rng.random((2, 16, 16)),
            meta,
        )
    written = report.write_report(work)
    names = sorted(os.path.basename(p) for p in written["figures"])
    assert names == [
        "anomaly_maps_pill_noise_10_overlap_seed_0.png",
        "auroc_vs_noise_ratio_tau=0.1.png",
        "auroc_vs_noise_ratio_tau=0.2.png",
        "auroc_vs_softpatch.tau_noise_0.png",
        "auroc_vs_softpatch.tau_noise_10.png",
        "auroc_vs_softpatch.tau_noise_20.png",
    ]
    for path in written["figures"]:
        _check_png(path)
    md = open(written["tables"][0]).read()
    assert md.startswith(f"**{results.RANDOM_INIT_WARNING}**")
    assert md.count("### ") == 2 * 3 * 2  # metrics x ratios x taus
    with open(written["tables"][1]) as f:
        records = list(csv.DictReader(f))
    assert len(records) == 12 * 3 * 2  # tables x rows (a, b, mean) x columns


def test_report_command_on_a_run(tmp_path):
    work = tmp_path / "run"
    work.mkdir()
    rows = make_rows(weights="random-init")
    (work / "results.json").write_text(json.dumps({"rows": rows}))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "softpatch_jax.report", "--workdir", str(work)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert report.summary_table(rows) in out  # the run's summary, unchanged
    assert (work / "report" / "tables.md").stat().st_size > 0
    assert not list((work / "report").glob("*.png"))  # one ratio: no curve to draw


def test_tables_cover_every_metric_all_rows_carry():
    rows = make_rows()
    assert results.metrics_in(rows) == ["image_auroc", "pixel_auroc"]  # results from before AUPRO
    for i, r in enumerate(rows):
        r["pixel_aupro"] = 0.5 + 0.1 * i
        r["image_ap"] = 0.9
    assert results.metrics_in(rows) == ["image_auroc", "pixel_auroc", "pixel_aupro", "image_ap"]
    del rows[0]["image_ap"]  # a metric that some rows lack gets no table
    built = results.tables(rows, metrics=results.metrics_in(rows))
    assert [t.metric for t in built] == ["image_auroc", "pixel_auroc", "pixel_aupro"]
    aupro = built[2]
    assert aupro.title().startswith("pixel AUPRO")
    assert aupro.markdown().count("| a | 0.550 ± 0.071") == 1  # rows 0 and 1: 0.5, 0.6 over seeds


def test_results_need_neither_jax_nor_matplotlib_and_agree_with_weights_on_the_mark():
    code = "import sys, softpatch_jax.results, softpatch_jax.report; " + (
        "print(sorted(m for m in ('jax', 'matplotlib') if m in sys.modules))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert results.RANDOM_INIT == weights.RANDOM_INIT  # rows carry what weights.resolve writes


def test_view_rows_show_sample_auroc_and_the_training_sets_anomalous_fraction(tmp_path):
    rows = []
    for split, fraction in (("fuiad_0.1", 0.16), ("fuiad_0.4", 0.4)):
        for r in make_rows(ratio=0.0):
            n = 25 if split == "fuiad_0.1" else 40
            rows.append(
                {**r, "sample_auroc": r["image_auroc"] - 0.05, "sample_ap": 0.5,
                 "dataset.split": split, "num_train": n, "train_anomalous": round(fraction * n),
                 "train_anomalous_fraction": fraction}
            )  # fmt: skip
    one = [r for r in rows if r["dataset.split"] == "fuiad_0.4" and r["seed"] == 0]
    summary = report.summary_table(one)
    assert "split fuiad_0.4, noise 0%, image AUROC / sample AUROC / pixel AUROC" in summary
    assert "no-overlap" not in summary and "(overlap)" not in summary
    assert "| a | 0.900 / 0.850 / 0.500 | 1.000 / 0.950 / 0.900 |" in summary
    assert "anomalous training images: a 16/40 (40.0%), b 16/40 (40.0%)" in summary
    # Rows without views or anomalies: the summary as before.
    plain = report.summary_table(make_rows())
    assert "sample" not in plain and "anomalous" not in plain
    assert "noise 10% (overlap), image AUROC / pixel AUROC" in plain
    with open(tmp_path / "results.json", "w") as f:
        json.dump({"rows": rows}, f)
    report.write_report(str(tmp_path), curves=[])
    md = (tmp_path / "report" / "tables.md").read_text()
    # Without a sweep's column hint, each split is a table of its own.
    for split, fraction in (("fuiad_0.1", "0.160"), ("fuiad_0.4", "0.400")):
        for title in ("sample AUROC", "sample AP", "anomalous fraction of the training images"):
            assert f"### {title} | split={split} |" in md, (title, split)
        table = md.split(f"### anomalous fraction of the training images | split={split} |")[1]
        assert f"| a | {fraction} ± 0.000 | {fraction} ± 0.000 |" in table.split("###")[0]
