import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from softpatch_jax import coreset, memory_bank, methods, pool, progress
from softpatch_jax.experiment import options
from tests.conftest import cpu_only
from tests.test_coreset import numpy_greedy

LocalOutlierFactor = pytest.importorskip("sklearn.neighbors").LocalOutlierFactor


def small_config(**softpatch):
    c = base.get_config()
    c.softpatch.projection_dim = 8
    c.softpatch.update(softpatch)
    return c


def fit_lof(cfg, feats, proj, starts):
    """SoftPatch-LOF's banks with an explicit projection and explicit coreset start points."""
    return memory_bank.fit(
        jax.random.key(0),
        jnp.asarray(feats),
        options.fit_options(cfg),
        methods.spec("softpatch_lof", options.method_options(cfg)),
        projection=jnp.asarray(proj),
        starts=jnp.asarray(starts),
    )


def features(seed=0, n=12, p=9, d=16):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1, p, d)) + 0.3 * rng.normal(size=(n, p, d))
    x[0, 4] += 6.0  # an injected defect patch: an outlier at its position
    return x.astype(np.float32)


def test_softpatch_lof_equals_independent_composition():
    """sklearn LOF per position -> numpy quantile removal -> numpy greedy loop: same bank."""
    cfg = small_config(tau=0.15)
    feats = features()
    n, p, d = feats.shape
    rng = np.random.default_rng(5)
    proj = rng.uniform(-0.25, 0.25, (d, 8)).astype(np.float32)
    starts = rng.choice(n * p, 10, replace=False)
    banks = fit_lof(cfg, feats, proj, starts)
    z = feats.reshape(n * p, d).astype(np.float64) @ proj
    lof = np.empty((n, p))
    for pos in range(p):
        lof[:, pos] = (
            -LocalOutlierFactor(n_neighbors=6)
            .fit(z.reshape(n, p, 8)[:, pos])
            .negative_outlier_factor_
        )
    keep = (lof <= np.quantile(lof, 0.85)).reshape(-1)
    m = int(0.1 * n * p)
    want = numpy_greedy(z, keep, starts, m)
    np.testing.assert_array_equal(np.asarray(banks.cls.index_M), want)
    np.testing.assert_allclose(
        np.asarray(banks.cls.weights_M), np.maximum(lof.reshape(-1), 0)[want], rtol=1e-4
    )
    np.testing.assert_array_equal(np.asarray(banks.cls.feats_MxD), feats.reshape(n * p, d)[want])
    assert not keep[4], "the planted outlier (image 0, position 4) must be removed"
    assert 4 not in set(np.asarray(banks.cls.index_M).tolist())


def test_softpatch_plus_builds_two_banks_and_patchcore_keeps_everything():
    cfg = small_config()
    feats = jnp.asarray(features(1, n=16))
    specs = methods.specs("patchcore,softpatch_plus", options.method_options(cfg))
    out = memory_bank.fit_many(jax.random.key(1), feats, options.fit_options(cfg), specs)
    assert set(out.scores_NxP) == {"gaussian", "lof"}
    plus = out.banks["softpatch_plus"]
    keep_cls = np.asarray(out.keep_NxP["softpatch_plus"])
    assert abs(keep_cls.mean() - 0.85) < 0.02
    assert np.asarray(out.keep_NxP["patchcore"]).all()
    np.testing.assert_allclose(np.asarray(out.banks["patchcore"].cls.weights_M), 1.0)
    # The segmentation bank removes more (tau_seg = 0.5): none of its patches are above the median.
    fused = np.asarray(memory_bank.removal_score(specs[1].seg, out.scores_NxP)).reshape(-1)
    assert fused[np.asarray(plus.seg.index_M)].max() <= np.quantile(fused, 0.5) + 1e-7
    assert plus.cls.feats_MxD.shape == plus.seg.feats_MxD.shape == (int(0.1 * 16 * 9), 16)


def test_image_level_denoising_removes_whole_images():
    cfg = small_config(tau=0.1)
    feats = features(2, n=20)
    spec = methods.spec("image_denoise", options.method_options(cfg))
    scores = memory_bank.fit_many(
        jax.random.key(0), jnp.asarray(feats), options.fit_options(cfg), [spec]
    ).scores_NxP
    keep = np.asarray(memory_bank.keep_mask(spec.cls, scores, (20, 9)))
    per_image = keep.all(1)
    assert (keep.any(1) == per_image).all()  # all or nothing per image
    assert not per_image[0]  # the image with the planted outlier goes
    lof_max = np.asarray(scores["lof"]).max(1)
    np.testing.assert_array_equal(per_image, lof_max <= np.quantile(lof_max, 0.9))


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match="softpatch_plus"):
        methods.spec("softpach", options.method_options(base.get_config()))


class _Reader:
    """A host source as `fit_many` accepts one: shape, dtype and slicing over images only."""

    def __init__(self, array):
        self.array, self.shape, self.dtype = array, array.shape, array.dtype

    def __getitem__(self, index):
        assert isinstance(index, slice), "host sources are read by slices of images"
        return self.array[index]


@cpu_only(
    "the projection's rows round alike in blocks of 4 images and in one product on XLA's CPU "
    "backend, which makes the coreset's picks equal; GPU libraries choose kernels by shape"
)
def test_host_sources_stream_to_the_same_banks_as_a_device_array():
    cfg = small_config(tau=0.15)
    feats = features(3, n=14)
    spec = methods.spec("softpatch_plus", options.method_options(cfg))
    want = memory_bank.fit_many(
        jax.random.key(4), jnp.asarray(feats), options.fit_options(cfg), [spec]
    )
    proj = want.projection_DxR
    pooled = pool.project_pool(_Reader(feats), proj, block_images=4)  # blocks 0,4,8,10
    np.testing.assert_allclose(
        np.asarray(pooled),
        np.asarray(pool.project_pool(jnp.asarray(feats), proj)),
        atol=1e-6,
    )
    for source in (_Reader(feats), feats):  # a lazy reader, and a numpy array
        got = memory_bank.fit_many(jax.random.key(4), source, options.fit_options(cfg), [spec])
        for name in ("cls", "seg"):
            a = getattr(want.banks[spec.name], name)
            b = getattr(got.banks[spec.name], name)
            np.testing.assert_array_equal(np.asarray(a.index_M), np.asarray(b.index_M))
            np.testing.assert_array_equal(np.asarray(a.feats_MxD), np.asarray(b.feats_MxD))


def test_float16_storage_keeps_its_dtype_in_the_bank():
    cfg = small_config(tau=0.15)
    feats = features(4, n=14)
    spec = methods.spec("softpatch_lof", options.method_options(cfg))
    got = memory_bank.fit_many(
        jax.random.key(5), feats.astype(np.float16), options.fit_options(cfg), [spec]
    )
    bank = got.banks[spec.name].cls
    assert bank.feats_MxD.dtype == jnp.float16
    idx = np.asarray(bank.index_M)
    np.testing.assert_array_equal(
        np.asarray(bank.feats_MxD), feats.astype(np.float16).reshape(-1, 16)[idx]
    )


# ----------------------------------------------------------------------------- once per training set


@pytest.fixture
def expensive_steps(monkeypatch):
    """Counts the steps the fitting path must run once per training set: streaming the features into
    the projected pool, the discriminator kernel, and the coreset's preparation."""
    from softpatch_jax import coreset, discriminators

    counts = {"project_pool": 0, "score_pool": 0, "coreset_prepare": 0}

    def counting(module, name, label):
        inner = getattr(module, name)

        def wrapped(*args, **kwargs):
            counts[label] += 1
            return inner(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    counting(pool, "project_pool", "project_pool")
    counting(discriminators, "score_pool", "score_pool")
    counting(coreset, "prepare", "coreset_prepare")
    return counts


def test_pipeline_style_fit_prepares_once_for_every_method(expensive_steps):
    cfg = small_config(tau=0.2, discriminators="nearest,lof,gaussian")
    names = ("patchcore", "softpatch_nearest", "softpatch_lof", "softpatch_gaussian")
    specs = [
        methods.spec(m, options.method_options(cfg))
        for m in (*names, "softpatch_plus", "image_denoise")
    ]
    memory_bank.fit_many(jax.random.key(0), features(), options.fit_options(cfg), specs)
    assert expensive_steps == {"project_pool": 1, "score_pool": 1, "coreset_prepare": 1}


def test_sweep_style_fit_prepares_once_and_caches_the_scores(expensive_steps, tmp_path):
    import dataclasses

    from softpatch_jax.experiment import cache, stages

    cfg = small_config(discriminators="nearest,lof")
    specs = []
    for tau in (0.05, 0.1, 0.3):
        cfg.softpatch.tau = tau
        for m in ("patchcore", "softpatch_lof", "softpatch_plus", "image_denoise"):
            specs.append(
                dataclasses.replace(methods.spec(m, options.method_options(cfg)), name=f"{m}@{tau}")
            )
    store = cache.Cache(str(tmp_path), cache.Stats())
    feats = features()
    for _ in range(2):  # computed and cached, then loaded: the kernel runs the first time only
        prepared = stages.prepare(store, jax.random.key(0), feats, "f", cfg, ("nearest", "lof"))
        stages.fit(prepared, feats, cfg, specs)
    assert expensive_steps == {"project_pool": 2, "score_pool": 1, "coreset_prepare": 2}
    runs = store.stats.counts
    assert runs["discriminator_runs_lof"] == runs["discriminator_runs_nearest"] == 1


@pytest.mark.slow
def test_deploy_style_fit_prepares_once_for_banks_and_heldout_folds(expensive_steps, tmp_path):
    from softpatch_jax.deploy import fitting
    from tests import deploy_helpers
    from tests.test_sweep import fake_build

    cfg = deploy_helpers.tiny_config()
    deploy_helpers.write_folder(str(tmp_path))
    fitting.fit(cfg, str(tmp_path), extractor=fake_build(options.extractor_options(cfg)))
    assert expensive_steps == {"project_pool": 1, "score_pool": 1, "coreset_prepare": 1}


def test_coreset_log_line_is_written_after_the_loop_finishes(monkeypatch):
    """Without a terminal the loop is one asynchronous device call: its log line must time the
    loop (the picks ready when it is written), not the dispatch ("1568 picks in 0.0 s")."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(60000, 32)).astype(np.float32))
    keep = jnp.asarray(rng.random((2, 60000)) > 0.1)
    prepared = memory_bank.Prepared(
        (600, 100), None, {}, (), jnp.arange(5), coreset.prepare(x, jnp.arange(5)), False
    )
    returned, lines = [], []
    select_sizes = coreset.select_sizes
    monkeypatch.setattr(
        coreset, "select_sizes", lambda *a: returned.append(select_sizes(*a)) or returned[-1]
    )
    monkeypatch.setattr(progress, "mode", lambda: "log")
    log = lambda fmt, *args: lines.append((args, all(a.is_ready() for a in returned[-1])))
    monkeypatch.setattr(progress.logging, "info", log)
    memory_bank.select_coresets(prepared, keep, [400, 300])  # compiles
    lines.clear()
    picked = memory_bank.select_coresets(prepared, keep, [400, 300])
    [((desc, total, _unit, seconds, _rate, _), ready)] = lines
    assert desc == "coreset (2 masks)" and total == 400 and seconds > 0
    assert ready  # the loop had finished when its time was taken
    np.testing.assert_array_equal(picked[1], coreset.select(prepared.coreset, keep[1], 300))
