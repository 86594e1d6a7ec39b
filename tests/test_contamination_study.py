"""launch/contamination_study.py: the image statistics against numpy/scipy oracles, the gate and
AUROC against a numpy gate and scikit-learn, on every training set of a tiny generated run."""

import json
import statistics as stats_lib

import numpy as np
import pytest
from scipy.ndimage import uniform_filter
from scipy.spatial.distance import cdist
from sklearn.metrics import roc_auc_score

from launch import contamination_study as study
from softpatch_jax import memory_bank
from softpatch_jax.data import demo
from softpatch_jax.experiment import driver, options, plan
from tests.test_pipeline import tiny_config

TINY = demo.DemoSpec(size=64, num_train=10, num_test_good=4, num_per_defect=2, categories=("pill",))


def _topmean(v, share=0.01):
    k = max(1, int(np.ceil(share * v.shape[1])))
    return np.sort(v, axis=1)[:, -k:].mean(axis=1)


def _gate(x, rounds=3):
    """The 3-round robust-z gate, written out: median and 1.4826 MAD of the unflagged images."""
    n = len(x)
    cutoff = stats_lib.NormalDist().inv_cdf(1 - 0.05 / n) + 1.0
    flagged = np.zeros(n, bool)
    for _ in range(rounds):
        rest = x[~flagged]
        med = np.median(rest)
        mad = 1.4826 * np.median(np.abs(rest - med))
        z = (x - med) / max(mad, 1e-12)
        flagged = z > cutoff
    return z, flagged


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = demo.write(str(tmp_path_factory.mktemp("data") / "tiny"), TINY)
    cfg = tiny_config(root, noise__ratios="0.0,0.3", noise__overlap=True)
    cfg.methods = "softpatch_lof"
    seen = []
    workdir = str(tmp_path_factory.mktemp("work"))
    driver.execute(cfg, plan.plan(cfg), workdir, on_training_set=lambda s, c: seen.append((s, c)))
    assert driver.jsonl.read(f"{workdir}/{driver.RESULTS}") == []  # a study fits nothing
    return cfg, seen


@pytest.mark.slow
def test_statistics_gate_and_auroc_match_the_oracles(sets):
    _, seen = sets
    assert [len(s.injected) for s, _ in seen] == [0, 3]  # 30% of 10 injected
    for nset, cfg in seen:
        feats = np.asarray(nset.feats, np.float64)
        n, p, _ = feats.shape
        key = plan.category_key(cfg.seed, nset.category)
        lof = memory_bank.prepare(key, nset.feats, options.fit_options(cfg), ("lof",))
        lof = np.asarray(lof.scores_NxP["lof"], np.float64)
        got = {
            k: np.asarray(v, np.float64)
            for k, v in study.statistics(lof, nset.feats, tuple(nset.ex.grid), True).items()
        }
        v = np.log(np.maximum(lof, 1e-12))
        want = {"top1": _topmean(v), "contrast": _topmean(v) - np.median(v, axis=1)}
        grid = tuple(nset.ex.grid)
        smooth = uniform_filter(v.reshape(n, *grid), size=(1, 3, 3), mode="nearest")
        want["smooth3"] = _topmean(smooth.reshape(n, p))
        # The k-th nearest other image, per position and anywhere (scipy's distances).
        pos = np.stack([cdist(feats[:, i], feats[:, i], "sqeuclidean") for i in range(p)])
        pos[:, np.arange(n), np.arange(n)] = np.inf
        pos = np.sort(pos, axis=2).transpose(1, 0, 2)[:, :, : n - 1]  # [N, P, N-1]
        free = np.stack(
            [
                np.stack([cdist(feats[i], feats[j], "sqeuclidean").min(1) for j in range(n)], 1)
                for i in range(n)
            ]
        )
        free[np.arange(n), :, np.arange(n)] = np.inf
        free = np.sort(free, axis=2)[:, :, : n - 1]
        for prefix, d2, ks in (("pos", pos, {"1": 1, "3": 3}), ("free", free, {"1": 1})):
            eps = 1e-2 * np.median(d2[:, :, 0])
            for tag, k in ks.items():
                w = np.log(d2[:, :, k - 1] + eps) / 2
                want[f"{prefix}_k{tag}_top"] = _topmean(w)
                want[f"{prefix}_k{tag}_contrast"] = _topmean(w) - np.median(w, axis=1)
        for name, x in want.items():
            np.testing.assert_allclose(got[name], x, rtol=2e-3, atol=2e-3, err_msg=name)
        line = study.study_set(nset, cfg)
        assert line["num_train"] == n and line["random_init"]
        injected = np.arange(n) >= n - len(nset.injected)
        for name in ("top1", "contrast", "pos_k1_top", "free_k1_contrast"):
            z, flagged = _gate(got[name])
            entry = line["statistics"][name]
            assert entry["flagged"] == int(flagged.sum()), name
            assert entry["max_z"] == pytest.approx(z.max(), rel=1e-4, abs=1e-4), name
            if injected.any():
                assert entry["auroc"] == pytest.approx(roc_auc_score(injected, got[name]), abs=1e-6)
            else:
                assert entry["auroc"] is None


@pytest.mark.slow
def test_table_counts_and_the_out_file_is_never_replaced(sets, tmp_path):
    cfg, seen = sets
    lines = [study.study_set(s, c, position_free=False) for s, c in seen]
    assert not any(k.startswith("free_") for k in lines[0]["statistics"])
    text = study.table({"tiny": lines})
    flagged = [ln["statistics"]["contrast"]["flagged"] > 0 for ln in lines]
    row = next(r for r in text.splitlines() if r.startswith("| contrast |"))
    assert f"{int(flagged[0])}/1, {int(flagged[1])}/1," in row
    assert "random-initialised" in text
    out = tmp_path / "mine.jsonl"
    out.write_text("not the tool's\n")
    with pytest.raises(FileExistsError, match=r"mine\.jsonl"):
        study._run(cfg, str(out), False)
    assert out.read_text() == "not the tool's\n"
    fresh = tmp_path / "study.jsonl"
    study._run(cfg, str(fresh), False)
    written = study.read(str(fresh))
    assert [ln["num_injected"] for ln in written] == [0, 3]
    assert json.dumps(written[0]["statistics"]["top1"]) == json.dumps(
        lines[0]["statistics"]["top1"]
    )
