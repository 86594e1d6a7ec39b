"""Training-set audit and threshold rules against hand-computed values, outliers planted at the
score level, and the command line's exit codes and messages."""

import csv
import os
import subprocess
import sys

import deploy_helpers
import numpy as np
import pytest

from softpatch_jax import contamination
from softpatch_jax.deploy import audit, commands, fitting, threshold

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _planted(n=20, p=16, planted=(4, 11), seed=0):
    """Raw scores of three discriminators with a few strongly outlying patches in `planted`."""
    rng = np.random.default_rng(seed)
    scores = {}
    for k, name in enumerate(("nearest", "gaussian", "lof")):
        s = rng.uniform(1.0, 2.0, (n, p)) * (k + 1)  # different scales per discriminator
        for i in planted:
            s[i, rng.choice(p, 3, replace=False)] = 10.0 * (k + 1) + rng.uniform(0, 1, 3)
        scores[name] = s.astype(np.float32)
    return scores


def test_audit_puts_planted_outliers_first_for_every_auditor():
    scores = _planted()
    names = [f"img_{i:02d}.png" for i in range(20)]
    a = audit.compute(names, scores, ("gaussian", "lof"), "all", 0.15, np.ones((20, 16), bool))
    for auditor, s in a.score_N.items():
        assert set(np.argsort(-s)[:2]) == {4, 11}, auditor
    assert set(a.order[:2]) == {4, 11}
    truth = np.zeros(20, bool)
    truth[[4, 11]] = True
    for row in audit.precision_recall(a, truth):
        assert (row["k"], row["hits"], row["precision"], row["recall"]) == (2, 2, 1.0, 1.0)
        assert row["average_precision"] == 1.0
    # The top 1% of 16 patches is one patch: the image score is the image's largest rank.
    ranks = a.ranks_NxP["lof"]
    np.testing.assert_allclose(a.score_N["lof"], ranks.max(axis=1))
    # Removed fraction: patches above the (1 - tau) rank; the planted images have 3 of 16.
    assert a.removed_N["lof"][4] >= 3 / 16


def test_precision_recall_and_average_precision_by_hand():
    a = audit.Audit(
        names=("a", "b", "c", "d"),
        ranks_NxP={},
        score_N={"fusion": np.array([0.9, 0.8, 0.7, 0.1])},
        removed_N={},
        method_removed_N=np.zeros(4),
    )
    (row,) = audit.precision_recall(a, np.array([1, 0, 1, 0]))
    # Top-2 = a, b: one hit of two. AP = (1/1 + 2/3) / 2.
    assert (row["hits"], row["precision"], row["recall"]) == (1, 0.5, 0.5)
    assert row["average_precision"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-4)


def test_audit_report_files_and_truth_file_checks(tmp_path):
    scores = _planted()
    names = [f"img_{i:02d}.png" for i in range(20)]
    a = audit.compute(names, scores, ("gaussian", "lof"), "all", 0.15, np.ones((20, 16), bool))
    truth_csv = tmp_path / "truth.csv"
    with open(truth_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "defective"])
        w.writerows([n, int(i in (4, 11))] for i, n in enumerate(names))
    truth = commands.read_truth(str(truth_csv), names, str(tmp_path))
    assert np.flatnonzero(truth).tolist() == [4, 11]
    img = np.full((32, 32, 3), 90, np.uint8)
    summary = audit.write(
        str(tmp_path / "rep"), a, load_image=lambda i: img, grid=(4, 4), top=4, truth_N=truth
    )
    assert summary["top"][:2] in (["img_04.png", "img_11.png"], ["img_11.png", "img_04.png"])
    for name in ("audit.csv", "audit.json", "contact_sheet.png", "precision_recall.md"):
        assert os.path.getsize(tmp_path / "rep" / name) > 0
    with open(tmp_path / "rep" / "audit.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in rows] == list(range(1, 21))
    with pytest.raises(ValueError, match="does not list 1 image"):
        commands.read_truth(str(truth_csv), [*names, "extra.png"], str(tmp_path))


def test_threshold_rules_by_hand():
    s = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    # median 3, absolute deviations [2, 1, 0, 1, 97] -> MAD 1.
    assert threshold.value("mad:3", s) == pytest.approx(3 + 3 * 1.4826)
    assert threshold.value("quantile:0.5", s) == 3.0
    assert threshold.value("0.25", s) == 0.25
    for bad in ("mad3", "quantile:1.5", "high", "mad:nan"):
        with pytest.raises(ValueError, match="threshold"):
            threshold.parse(bad)


def test_folds_cover_every_image_evenly_and_depend_on_the_seed():
    f = threshold.fold_of(23, 5, seed=0)
    assert sorted(np.bincount(f).tolist()) == [4, 4, 5, 5, 5]
    assert f.tolist() == threshold.fold_of(23, 5, seed=0).tolist()
    assert f.tolist() != threshold.fold_of(23, 5, seed=1).tolist()
    assert set(threshold.fold_of(3, 5, seed=0).tolist()) == {0, 1, 2}  # at most one fold per image


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-m", "softpatch_jax.deploy", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


def test_cli_reports_bad_input_in_one_line_with_status_2(tmp_path):
    res = _cli("predict", f"--model={tmp_path}", f"--images={tmp_path}", f"--out={tmp_path}/o")
    assert res.returncode == 2
    assert "error:" in res.stderr and "not a saved model" in res.stderr
    assert "Traceback" not in res.stderr
    res = _cli("train")
    assert res.returncode != 0 and "fit" in res.stderr


def test_fit_under_auto_reports_and_applies_the_policy(tmp_path):
    """deploy fit with tau=auto on a folder with a planted defect: the saved estimate finds it
    (flagged share > 0), the tau removed is the floor (the authors' 0.15) or the share if larger,
    as `contamination.policy_tau` computes it, and the audit marks that tau."""
    deploy_helpers.write_folder(str(tmp_path / "train"), 10, 1)
    c = deploy_helpers.tiny_config()
    c.softpatch.tau = c.softpatch.tau_seg = "auto"
    model = commands.fit_and_save(
        c, str(tmp_path / "train"), str(tmp_path / "m"), extractor=deploy_helpers.tiny_extractor()
    )
    est = model.meta["contamination"]
    assert est["tau"] == "auto" and est["estimator"] == contamination.DEFAULT
    assert est["image_fraction_estimated"] > 0  # the planted defect image is flagged
    assert est["tau_applied"] == pytest.approx(max(est["tau_estimated"], 0.15), abs=1e-6)
    assert fitting.audit_tau(model) == pytest.approx(est["tau_applied"])
