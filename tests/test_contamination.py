"""Contamination estimates (softpatch_jax/contamination.py) against numpy/scipy oracles and hand-built
score distributions, tau="auto" through the fitting path and a sweep end to end, and the config's
validation of "auto"."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from test_sweep import fake_backbone, sweep_config, tiny_root  # noqa: F401 (fixtures)

from configs import base
from softpatch_jax import contamination, memory_bank, methods
from softpatch_jax.experiment import config_errors, driver, jsonl, options

# ----------------------------------------------------------------------------- numpy oracles


def np_robust_z(x):
    mad = scipy.stats.median_abs_deviation(x, axis=None, scale="normal")
    return (x - np.median(x)) / mad


def np_image_gate(s, cutoff, share=0.01):
    p = s.shape[1]
    v = np.log(np.maximum(s, contamination.TINY))
    k = max(1, int(np.ceil(share * p)))
    stat = np.sort(v, axis=1)[:, -k:].mean(axis=1)
    z = np_robust_z(stat)
    flagged = z > cutoff
    theta = np.median(v.max(axis=1)[~flagged])
    tau = ((v > theta) & flagged[:, None]).mean()
    return tau, flagged.mean(), np.clip((z - cutoff + 1) / 2, 0, 1)


def clean_lof(rng, n=40, p=400, spread=0.12):
    """LOF-like scores of a clean set: log-normal around 1 (LOF's inliers), each image with its own
    spread (some textures vary more than others)."""
    per_image = spread * rng.uniform(0.8, 1.25, size=(n, 1))
    return np.exp(per_image * rng.standard_normal((n, p))).astype(np.float32)


def contaminate(rng, s, images, patches, level=(2.5, 6.0)):
    """Defect patches (LOF far above 1) in the first `images` images, `patches` each."""
    s = s.copy()
    for i in range(images):
        idx = rng.choice(s.shape[1], patches, replace=False)
        s[i, idx] = rng.uniform(*level, size=patches)
    return s


# ----------------------------------------------------------------------------- primitives


def test_robust_z_matches_scipy():
    x = np.random.default_rng(0).gamma(2.0, size=(7, 13)).astype(np.float32)
    np.testing.assert_allclose(contamination.robust_z(jnp.asarray(x)), np_robust_z(x), rtol=1e-5)


def test_null_cutoff_is_the_bonferroni_normal_quantile_plus_margin():
    for n in (10, 60, 500):
        want = scipy.stats.norm.ppf(1 - 0.05 / n) + 1.0
        assert contamination.null_cutoff(n) == pytest.approx(want, rel=1e-6)
    # Its promise: the largest of n null z-scores stays under it (margin 0) ~95% of the time.
    rng = np.random.default_rng(1)
    maxima = rng.standard_normal((4000, 50)).max(axis=1)
    assert np.mean(maxima > contamination.null_cutoff(50, margin=0.0)) == pytest.approx(
        0.05, abs=0.015
    )


def test_top_mean_matches_a_sort():
    x = np.random.default_rng(2).normal(size=(5, 31)).astype(np.float32)
    want = np.sort(x, axis=1)[:, -4:].mean(axis=1)
    np.testing.assert_allclose(contamination.top_mean(jnp.asarray(x), 4), want, rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_image_gate_matches_numpy(jit):
    rng = np.random.default_rng(3)
    s = contaminate(rng, clean_lof(rng), images=6, patches=12)
    fn = jax.jit(contamination.image_gate) if jit else contamination.image_gate
    cutoff = contamination.null_cutoff(s.shape[0])
    est = fn(jnp.asarray(s))
    tau, frac, susp = np_image_gate(s, cutoff)
    assert float(est.tau) == pytest.approx(tau, abs=1e-7)
    assert float(est.image_fraction) == pytest.approx(frac, abs=1e-7)
    np.testing.assert_allclose(est.suspicion_N, susp, atol=1e-5)


def test_tail_and_lof_scale_match_numpy():
    rng = np.random.default_rng(4)
    s = contaminate(rng, clean_lof(rng), images=5, patches=10)
    z = np_robust_z(np.log(s))
    est = contamination.tail(jnp.asarray(s), 3.5)
    assert float(est.tau) == pytest.approx((z > 3.5).mean(), abs=1e-7)
    assert float(est.image_fraction) == pytest.approx((z > 3.5).any(axis=1).mean(), abs=1e-7)
    est = contamination.lof_scale(jnp.asarray(s), 2.0)
    assert float(est.tau) == pytest.approx((s > 2.0).mean(), abs=1e-7)


# ----------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("spread", [0.05, 0.12, 0.3])
def test_clean_sets_estimate_zero(spread):
    """Clean scores, tight or highly variable (heavy-tailed): ~0. The image cutoff is a 5% test
    over all N images plus a margin, so over 5 sets at most one stray image is flagged, and an
    image that is not flagged keeps weight 1."""
    flagged = 0
    for seed in range(5):
        s = clean_lof(np.random.default_rng(seed), spread=spread)
        est = contamination.image_gate(jnp.asarray(s))
        assert float(est.tau) <= 5e-4
        flagged += round(float(est.image_fraction) * s.shape[0])
        w = np.asarray(contamination.fade_weights(jnp.asarray(s), est.suspicion_N))
        clean_rows = np.asarray(est.suspicion_N) == 0.0
        np.testing.assert_array_equal(w[clean_rows], 1.0)
    assert flagged <= 1


@pytest.mark.parametrize("images,patches", [(4, 8), (8, 20), (16, 40)])
def test_known_contamination_is_recovered(images, patches):
    """Known contaminated images and patches (10%-40% of 40 images): the image fraction exactly,
    the patch fraction within 25% (a flagged image's normal patches above a normal image's typical
    maximum count too)."""
    rng = np.random.default_rng(images)
    s = contaminate(rng, clean_lof(rng), images, patches)
    est = contamination.image_gate(jnp.asarray(s))
    n, p = s.shape
    assert float(est.image_fraction) == pytest.approx(images / n)
    assert float(est.tau) == pytest.approx(images * patches / (n * p), rel=0.25)
    assert np.all(np.asarray(est.suspicion_N)[:images] == 1.0)
    assert np.all(np.asarray(est.suspicion_N)[images:] == 0.0)


def test_fade_weights():
    w = jnp.array([[3.0, 0.5], [2.0, 1.0]])
    got = contamination.fade_weights(w, jnp.array([0.0, 0.5]))
    np.testing.assert_allclose(got, [[1.0, 1.0], [1.5, 1.0]])


def test_true_patch_fraction_matches_a_loop():
    rng = np.random.default_rng(5)
    masks = rng.random((3, 24, 24)) > 0.995
    h, w = 6, 6
    touched = 0
    for m in masks:
        for y in range(h):
            for x in range(w):
                touched += m[y * 4 : (y + 1) * 4, x * 4 : (x + 1) * 4].any()
    assert contamination.true_patch_fraction(masks, (h, w), 10) == touched / (10 * h * w)


def test_unknown_estimator_is_named():
    with pytest.raises(ValueError, match=r"unknown contamination estimator 'nope'.*image"):
        methods.BankSpec(("lof",), "auto", estimator="nope")
    with pytest.raises(ValueError, match="'auto'"):
        methods.BankSpec(("lof",), "automatic")


# ----------------------------------------------------------------------------- fitting path


def small_config(**softpatch):
    c = base.get_config()
    c.softpatch.projection_dim = 8
    c.softpatch.update(softpatch)
    return c


def test_auto_on_a_clean_set_is_patchcore_and_removes_on_a_dirty_one():
    rng = np.random.default_rng(6)
    n, p, d = 30, 16, 12
    feats = (rng.normal(size=(1, p, d)) + 0.3 * rng.normal(size=(n, p, d))).astype(np.float32)
    key = jax.random.key(0)
    cfg = small_config(tau="auto", tau_seg="auto")
    specs = [
        methods.spec(m, options.method_options(cfg))
        for m in ("patchcore", "softpatch_lof", "softpatch_plus")
    ]
    out = memory_bank.fit_many(key, jnp.asarray(feats), options.fit_options(cfg), specs)
    pc = out.banks["patchcore"].cls
    for name in ("softpatch_lof", "softpatch_plus"):
        for b in (out.banks[name].cls, out.banks[name].seg):
            np.testing.assert_array_equal(b.index_M, pc.index_M)
            np.testing.assert_array_equal(b.weights_M, np.ones_like(b.weights_M))
    dirty = feats.copy()
    dirty[:3, 5] += 8.0  # three images with a defect patch at position 5
    out = memory_bank.fit_many(key, jnp.asarray(dirty), options.fit_options(cfg), specs)
    keep = np.asarray(out.keep_NxP["softpatch_lof"])
    # The default (image_contrast, floor 0.15): the flagged share (3 of 30) raised to the floor.
    assert not keep[:3, 5].any()
    assert (~keep).sum() == pytest.approx(0.15 * n * p, abs=1)
    # Without a floor, image_share removes as many top patches as the flagged images' share.
    cfg = small_config(tau="auto", tau_seg="auto", auto_estimator="image_share", auto_floor=0.0)
    spec = methods.spec("softpatch_lof", options.method_options(cfg))
    out = memory_bank.fit_many(key, jnp.asarray(dirty), options.fit_options(cfg), [spec])
    keep = np.asarray(out.keep_NxP["softpatch_lof"])
    assert not keep[:3, 5].any()
    assert (~keep).sum() == pytest.approx(0.1 * n * p, abs=1)


def test_auto_image_denoise_drops_the_flagged_images():
    rng = np.random.default_rng(7)
    n, p, d = 30, 16, 12
    feats = (rng.normal(size=(1, p, d)) + 0.3 * rng.normal(size=(n, p, d))).astype(np.float32)
    feats[:2, 3] += 8.0
    # Without a floor exactly the flagged images go; with the default floor (0.15) the flagged
    # ones and then the next by their max patch score: those above the 0.85 quantile of 30.
    for floor, dropped in ((0.0, {2}), (0.15, {4, 5})):
        cfg = small_config(tau="auto", auto_floor=floor)
        spec = methods.spec("image_denoise", options.method_options(cfg))
        out = memory_bank.fit_many(
            jax.random.key(0), jnp.asarray(feats), options.fit_options(cfg), [spec]
        )
        keep = np.asarray(out.keep_NxP["image_denoise"])
        kept_n = keep.all(axis=1)
        assert not keep[:2].any() and (kept_n | ~keep.any(axis=1)).all()
        assert int((~kept_n).sum()) in dropped


def test_fixed_tau_is_unchanged_by_the_policy_code():
    """A fixed tau keeps the bank the quantile gives (the authors' profile is untouched)."""
    rng = np.random.default_rng(8)
    s = {"lof": jnp.asarray(rng.random((10, 9)).astype(np.float32) + 0.5)}
    bank = methods.BankSpec(("lof",), 0.2, "patch", "lof")
    keep = memory_bank.keep_mask(bank, s, (10, 9))
    want = np.asarray(s["lof"]) <= np.quantile(np.asarray(s["lof"]), 0.8)
    np.testing.assert_array_equal(keep, want)
    w = memory_bank.soft_weights(bank, s, (10, 9))
    np.testing.assert_allclose(w, np.maximum(np.asarray(s["lof"]), 0))


# ----------------------------------------------------------------------------- config and sweep


def test_config_accepts_auto_and_oracle_and_names_bad_taus():
    c = base.get_config()
    for v in ("auto", "oracle", 0.0, 0.3):
        c.softpatch.tau = v
        c.softpatch.tau_seg = v
        config_errors.validate(c)
    for bad in ("automatic", 1.0, -0.1, True):
        c.softpatch.tau = bad
        with pytest.raises(config_errors.ConfigError, match=r"softpatch\.tau="):
            config_errors.validate(c)
    c.softpatch.tau = 0.15
    c.softpatch.auto_estimator = "nope"
    with pytest.raises(config_errors.ConfigError, match="auto_estimator"):
        config_errors.validate(c)


def test_config_estimator_choices_are_the_registry():
    check, _ = config_errors.RULES["softpatch.auto_estimator"]
    assert all(check(n) for n in contamination.ESTIMATORS)
    assert not check("x")


def test_auto_and_oracle_end_to_end(tiny_root, tmp_path, fake_backbone):  # noqa: F811
    c = sweep_config(tiny_root, softpatch__tau=(0.15, "auto", "oracle"), noise__ratios=(0.0, 0.25))
    c.methods = "patchcore,softpatch_lof,softpatch_plus"
    work = str(tmp_path / "w")
    driver.sweep(c, work)
    rows = list(jsonl.read(f"{work}/{driver.RESULTS}"))
    assert len(rows) == 2 * 3 * 3
    for r in rows:
        assert 0.0 <= r["tau_estimated"] < 1.0 and 0.0 <= r["image_fraction_estimated"] <= 1.0
        if r["softpatch.tau"] == "auto" and r["method"] != "patchcore":
            # What auto removed: 0 on a set found clean, else at least the floor (0.15).
            dirty = r["image_fraction_estimated"] > 0
            want = max(r["tau_estimated"], 0.15) if dirty else 0.0
            assert r["tau_applied"] == pytest.approx(want, abs=1e-6)
        else:
            assert "tau_applied" not in r
        if r["noise_ratio"] == 0.0:
            assert r["tau_true"] == 0.0
        else:
            assert r["tau_true"] > 0.0
    # On the clean set, auto's estimate is a number, and with it 0 the bank is PatchCore's.
    clean = {(r["method"], r["softpatch.tau"]): r for r in rows if r["noise_ratio"] == 0.0}
    if clean[("softpatch_lof", "auto")]["tau_estimated"] == 0.0:
        pc = clean[("patchcore", "auto")]["image_auroc"]
        assert clean[("softpatch_lof", "auto")]["image_auroc"] == pc


def test_bank_spec_policy_keys():
    a = methods.BankSpec(("lof",), "auto", "patch", "lof")
    assert a.coreset_key() != methods.BankSpec(("lof",), 0.15).coreset_key()
    assert a.coreset_key() != dataclasses.replace(a, estimator="tail").coreset_key()
    with pytest.raises(ValueError, match="oracle"):
        memory_bank.keep_mask(
            methods.BankSpec(("lof",), "oracle"), {"lof": jnp.ones((2, 2))}, (2, 2)
        )


def test_image_share_estimators():
    """tau = the flagged images' share; the global variant gives every image the authors' weights
    once any image is flagged, none on a clean set."""
    rng = np.random.default_rng(9)
    s = contaminate(rng, clean_lof(rng), images=6, patches=10)
    gate = contamination.image_gate(jnp.asarray(s))
    share = contamination.image_share(jnp.asarray(s))
    assert float(share.tau) == pytest.approx(6 / 40) == float(gate.image_fraction)
    np.testing.assert_array_equal(share.suspicion_N, gate.suspicion_N)
    glob = contamination.image_share_global(jnp.asarray(s))
    np.testing.assert_array_equal(glob.suspicion_N, np.ones(40))
    clean = contamination.image_share_global(jnp.asarray(clean_lof(rng)))
    assert float(clean.tau) == 0.0
    np.testing.assert_array_equal(clean.suspicion_N, np.zeros(40))


# ----------------------------------------------------------------------------- image_floor


def np_gate_z(x, cutoff, rounds):
    """Iterated robust z with scipy's MAD on the images not yet flagged (the oracle of gate_z)."""
    flagged = np.zeros(x.shape, bool)
    for _ in range(rounds):
        rest = x[~flagged]
        mad = scipy.stats.median_abs_deviation(rest, scale="normal")
        z = (x - np.median(rest)) / mad
        flagged = z > cutoff
    return z


@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_gate_z_matches_an_iterated_scipy_mad(rounds):
    rng = np.random.default_rng(11)
    x = np.concatenate([rng.normal(size=30), rng.normal(8.0, 3.0, size=14)]).astype(np.float32)
    got = jax.jit(contamination.gate_z, static_argnums=(1, 2))(jnp.asarray(x), 4.0, rounds)
    np.testing.assert_allclose(got, np_gate_z(x.astype(np.float64), 4.0, rounds), rtol=2e-5)


def test_gate_rounds_find_what_an_inflated_mad_hides():
    """At 42% contamination of unequal strength the strong defects inflate a one-pass MAD so much
    that the weak ones stay below the cutoff; re-estimating on the unflagged images finds them
    (the 40% rows of README "Unknown contamination"), and a clean set is unchanged by rounds."""
    rng = np.random.default_rng(12)
    s = clean_lof(rng, n=40, spread=0.12)
    s = contaminate(rng, s, images=12, patches=12, level=(6.0, 9.0))
    s[12:17] = contaminate(rng, s[12:17], images=5, patches=12, level=(1.8, 2.2))
    one = contamination.image_gate(jnp.asarray(s), rounds=1)
    more = contamination.image_gate(jnp.asarray(s), rounds=contamination.GATE_ROUNDS)
    assert float(more.image_fraction) > float(one.image_fraction)
    assert float(one.image_fraction) == pytest.approx(12 / 40)
    assert float(more.image_fraction) == pytest.approx(17 / 40)
    clean = jnp.asarray(clean_lof(np.random.default_rng(13)))
    a = contamination.image_gate(clean, rounds=1)
    b = contamination.image_gate(clean, rounds=contamination.GATE_ROUNDS)
    assert float(a.image_fraction) == float(b.image_fraction) == 0.0


def test_image_floor_and_the_policy_floor():
    """image_floor: the flagged share, the authors' weights on every image of a set found dirty,
    none on a clean one; policy_tau raises a dirty set's tau to the floor, keeps a larger
    estimate, and leaves a clean set at 0 whatever the floor."""
    rng = np.random.default_rng(14)
    dirty = contamination.image_floor(jnp.asarray(contaminate(rng, clean_lof(rng), 4, 10)))
    assert float(dirty.image_fraction) == pytest.approx(4 / 40) == float(dirty.tau)
    np.testing.assert_array_equal(dirty.suspicion_N, np.ones(40))
    assert float(contamination.policy_tau(dirty, 0.15)) == pytest.approx(0.15)
    assert float(contamination.policy_tau(dirty, 0.05)) == pytest.approx(0.1)
    assert float(contamination.policy_tau(dirty, 0.0)) == pytest.approx(0.1)
    heavy = contamination.image_floor(jnp.asarray(contaminate(rng, clean_lof(rng), 12, 10)))
    assert float(contamination.policy_tau(heavy, 0.15)) == pytest.approx(12 / 40)
    clean = contamination.image_floor(jnp.asarray(clean_lof(rng)))
    assert float(contamination.policy_tau(clean, 0.5)) == 0.0
    np.testing.assert_array_equal(clean.suspicion_N, np.zeros(40))


def test_auto_floor_reaches_both_banks():
    """SoftPatch+ under auto with floors 0.15 / 0.5 on a dirty set removes what the fixed
    0.15 / 0.5 banks remove (the estimate is below both floors), and the authors' weights: the
    same keep masks and soft weights as the fixed taus; on a clean set, PatchCore's."""
    rng = np.random.default_rng(15)
    s = contaminate(rng, clean_lof(rng, n=30, p=64), images=2, patches=3)
    scores = {"lof": jnp.asarray(s), "gaussian": jnp.asarray(s[::-1].copy())}
    opts = dict(discriminator="lof", discriminators="gaussian,lof", soft_weight="lof")
    auto = methods.spec(
        "softpatch_plus",
        methods.Options(
            tau="auto",
            tau_seg="auto",
            rank_scope="all",
            inreach=None,
            auto_estimator="image_floor",
            auto_floor=0.15,
            auto_floor_seg=0.5,
            **opts,
        ),
    )
    fixed = methods.spec(
        "softpatch_plus",
        methods.Options(tau=0.15, tau_seg=0.5, rank_scope="all", inreach=None, **opts),
    )
    for a, f in ((auto.cls, fixed.cls), (auto.seg, fixed.seg)):
        np.testing.assert_array_equal(
            memory_bank.keep_mask(a, scores, s.shape), memory_bank.keep_mask(f, scores, s.shape)
        )
        np.testing.assert_array_equal(
            memory_bank.soft_weights(a, scores, s.shape),
            memory_bank.soft_weights(f, scores, s.shape),
        )
    clean = {"lof": jnp.asarray(clean_lof(rng, n=30, p=64))}
    clean["gaussian"] = clean["lof"]
    for b in (auto.cls, auto.seg):
        assert memory_bank.keep_mask(b, clean, (30, 64)).all()
        np.testing.assert_array_equal(memory_bank.soft_weights(b, clean, (30, 64)), 1.0)


# ----------------------------------------------------------------------------- image_contrast


def test_image_contrast_flags_a_local_defect_not_an_image_unusual_all_over():
    """The contrast statistic is each image's top-1% mean log score less its median (numpy
    oracle). An image whose every patch scores high (another colour or scale of a variable texture)
    is an outlier of the plain top-k gate but not of the contrast gate; a local defect is flagged
    by both; a clean set by neither."""
    rng = np.random.default_rng(21)
    s = clean_lof(rng)
    s[0] *= 2.2  # unusual all over
    s = np.concatenate([s, contaminate(rng, clean_lof(rng, n=1), images=1, patches=6)])
    v = np.log(s.astype(np.float64))
    k = contamination.top_k_for(s.shape[1])
    want = np.sort(v, axis=1)[:, -k:].mean(axis=1) - np.median(v, axis=1)
    got = contamination.image_statistic(jnp.asarray(v, jnp.float32), contrast=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    plain = contamination.image_gate(jnp.asarray(s), rounds=contamination.GATE_ROUNDS)
    contrast = contamination.image_contrast(jnp.asarray(s))
    assert float(plain.image_fraction) == pytest.approx(2 / 41)
    z_plain = contamination.gate_z(
        contamination.image_statistic(jnp.asarray(v, jnp.float32)), contamination.null_cutoff(41), 3
    )
    z_contrast = contamination.gate_z(got, contamination.null_cutoff(41), 3)
    cut = contamination.null_cutoff(41)
    assert float(z_plain[0]) > cut and float(z_contrast[0]) < cut
    assert float(z_plain[-1]) > cut and float(z_contrast[-1]) > cut
    assert float(contrast.image_fraction) == pytest.approx(1 / 41)
    assert float(contrast.tau) == pytest.approx(1 / 41)
    clean = contamination.image_contrast(jnp.asarray(clean_lof(np.random.default_rng(22))))
    assert float(clean.image_fraction) == 0.0 and float(contamination.policy_tau(clean, 0.5)) == 0
    np.testing.assert_array_equal(clean.suspicion_N, np.zeros(40))
