import numpy as np
import pytest

from softpatch_jax import metrics


def test_auroc_matches_sklearn_with_ties():
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    rng = np.random.default_rng(0)
    labels = rng.random(5000) < 0.2
    scores = np.round(rng.normal(size=5000) + labels * 0.8, 1)  # rounding makes many ties
    np.testing.assert_allclose(
        metrics.auroc(scores, labels), roc_auc_score(labels, scores), atol=1e-6
    )


def test_pixel_auroc_on_maps_matches_sklearn():
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    rng = np.random.default_rng(1)
    masks = np.zeros((3, 32, 32), bool)
    masks[:, 10:20, 12:18] = True
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    got = metrics.evaluate(np.array([0.1, 0.9, 0.3]), np.array([0, 1, 1]), maps, masks)
    np.testing.assert_allclose(
        got["pixel_auroc"], roc_auc_score(masks.ravel(), maps.ravel()), atol=1e-6
    )
    np.testing.assert_allclose(got["image_auroc"], 1.0)


def test_single_class_is_nan():
    assert np.isnan(metrics.auroc(np.array([0.1, 0.2]), np.array([0, 0])))


def test_average_precision_and_f1_max_match_sklearn_with_ties():
    skm = pytest.importorskip("sklearn.metrics")
    average_precision_score, precision_recall_curve = (
        skm.average_precision_score,
        skm.precision_recall_curve,
    )

    rng = np.random.default_rng(2)
    labels = rng.random(4000) < 0.15
    scores = np.round(rng.normal(size=4000) + labels * 1.2, 1)  # many ties
    np.testing.assert_allclose(
        metrics.average_precision(scores, labels),
        average_precision_score(labels, scores),
        atol=1e-5,
    )
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    np.testing.assert_allclose(metrics.f1_max(scores, labels), f1.max(), atol=1e-6)
    assert np.isnan(metrics.average_precision(scores, np.zeros(4000)))


def test_label_regions_are_8_connected_and_numbered_over_the_set():
    masks = np.zeros((2, 6, 6), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region
    masks[0, 4:6, 4:6] = True  # a second region
    masks[1, 2, 1:4] = True  # the third, in the next image
    ids, sizes = metrics.label_regions(masks)
    assert sizes.tolist() == [2, 4, 3]
    assert ids[0, 0, 0] == ids[0, 1, 1] == 1 and (ids[0, 4:, 4:] == 2).all()
    assert (ids[1, 2, 1:4] == 3).all() and (ids[~masks] == 0).all()


def test_aupro_hand_computed():
    """Ten normal pixels scored 0.1 .. 1.0 and one 2-pixel region scored 0.95 and 0.05: the curve
    runs (0, 0) -> (0.1, 0) -> (0.1, 0.5) -> (0.3, 0.5) -> ..., so the area up to FPR 0.3 is
    0.2 * 0.5 = 0.1, and 0.1 / 0.3 = 1/3 normalised."""
    maps = np.array([[[*(np.arange(1, 11) / 10), 0.95, 0.05]]])
    masks = np.array([[[False] * 10 + [True, True]]])
    np.testing.assert_allclose(metrics.aupro(maps, masks), 1 / 3, rtol=1e-6)


def _aupro_oracle(maps, masks, limit=0.3):
    """Threshold by threshold in float64: per-region overlap and FPR, then the trapezoid up to
    `limit` with the last segment interpolated."""
    ids, sizes = metrics.label_regions(masks)
    normal = ids == 0
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        flagged = maps >= t
        xs.append(flagged[normal].mean())
        ys.append(np.mean([flagged[ids == r].mean() for r in range(1, len(sizes) + 1)]))
    xs, ys = np.array(xs), np.array(ys)
    inside = xs <= limit
    x_end = xs[inside][-1]
    area = np.trapezoid(ys[inside], xs[inside])
    if x_end < limit:
        nxt = np.argmax(xs > limit)
        y_lim = np.interp(limit, xs[nxt - 1 : nxt + 1], ys[nxt - 1 : nxt + 1])
        area += (limit - x_end) * (ys[inside][-1] + y_lim) / 2
    return area / limit


def test_aupro_matches_a_threshold_loop_with_ties_and_several_regions():
    rng = np.random.default_rng(3)
    masks = np.zeros((3, 24, 24), bool)
    masks[0, 3:8, 3:9] = True
    masks[0, 15:22, 14:16] = True  # a thin region: its overlap counts as much as the big one's
    masks[2, 10:14, 2:20] = True  # image 1 is all normal
    maps = np.round(rng.normal(size=masks.shape) + 1.5 * masks, 1)  # ties across the classes
    np.testing.assert_allclose(metrics.aupro(maps, masks), _aupro_oracle(maps, masks), atol=2e-6)
    # Perfect maps cover every region before any false positive.
    np.testing.assert_allclose(
        metrics.aupro(masks * 1.0 + 0.01 * rng.random(masks.shape), masks), 1.0
    )
    assert np.isnan(metrics.aupro(maps, np.zeros_like(masks)))


def test_evaluate_computes_the_metrics_asked_for():
    rng = np.random.default_rng(4)
    masks = np.zeros((4, 16, 16), bool)
    masks[1:, 4:9, 5:10] = True
    maps = rng.normal(size=masks.shape) + 2 * masks
    labels = np.array([0, 1, 1, 1])
    scores = np.array([0.2, 0.9, 0.1, 0.8])
    every = metrics.evaluate(scores, labels, maps, masks)
    # Without file names there are no samples: every metric but the sample ones.
    assert tuple(every) == tuple(m for m in metrics.ALL if m not in metrics.SAMPLE)
    np.testing.assert_allclose(every["image_ap"], metrics.average_precision(scores, labels))
    np.testing.assert_allclose(every["pixel_aupro"], _aupro_oracle(maps, masks), atol=2e-6)
    some = metrics.evaluate(scores, labels, maps, masks, "pixel_ap, image_auroc")
    assert list(some) == ["image_auroc", "pixel_ap"]
    with pytest.raises(ValueError, match=r"eval.metrics: unknown metric\(s\) \['pro'\]"):
        metrics.check_names("pro,pixel_ap")


def _view_names(rng, num_samples, views=5):
    """Real-IAD-style file names: samples of two categories and classes, numbers restarting per
    class, views C1..C5 in shuffled order (a sample's views need not be adjacent)."""
    names, sample_of = [], []
    for s in range(num_samples):
        cat = ("audio_jack2", "mint")[s % 2]
        cls = ("OK", "NG_QS", "NG_AK")[s % 3]
        for c in range(1, views + 1):
            names.append(
                f"{cat}/NG/S{s:04d}/{cat}_{s // 6:04d}_{cls}_C{c}_2023{rng.integers(1e6)}.jpg"
            )
            sample_of.append((cat, s // 6, cls))
    order = rng.permutation(len(names))
    return [names[i] for i in order], [sample_of[i] for i in order]


def _sample_oracle(scores, labels, sample_of):
    """A plain loop over groups: each sample's max score and max label, then scikit-learn."""
    skm = pytest.importorskip("sklearn.metrics")
    roc_auc_score, average_precision_score = skm.roc_auc_score, skm.average_precision_score

    groups = {}
    for score, label, key in zip(scores, labels, sample_of):
        best = groups.get(key, (-np.inf, 0))
        groups[key] = (max(best[0], float(score)), max(best[1], int(label)))
    s = np.array([v[0] for v in groups.values()])
    y = np.array([v[1] for v in groups.values()])
    return roc_auc_score(y, s), average_precision_score(y, s), len(groups)


@pytest.mark.parametrize("seed,decimals", [(0, 1), (1, 0), (2, 3)])
def test_sample_metrics_match_a_loop_over_groups_with_ties(seed, decimals):
    rng = np.random.default_rng(seed)
    names, sample_of = _view_names(rng, 60)
    labels = (rng.random(len(names)) < 0.3).astype(int)
    # Rounding makes many ties between samples; decimals=0 leaves a handful of distinct scores.
    scores = np.round(rng.normal(size=len(names)) + labels, decimals)
    got = metrics.evaluate(scores, labels, np.zeros((len(names), 2, 2)), np.zeros((len(names), 2, 2)),
                           "sample_auroc,sample_ap", names)  # fmt: skip
    auroc, ap, num = _sample_oracle(scores, labels, sample_of)
    assert num == 60 and len(set(metrics.sample_keys(names))) == 60
    np.testing.assert_allclose(got["sample_auroc"], auroc, atol=1e-6)
    np.testing.assert_allclose(got["sample_ap"], ap, atol=1e-6)


def test_sample_keys_follow_adeval_and_are_absent_without_views():
    keys = metrics.sample_keys(
        ["r/realiad_256/mint/NG/QS/S0027/mint_0027_NG_QS_C2_20230512.jpg",
         "audiojack_0001_OK_C5_1.jpg", "x/usb_adaptor_0013_NG_ZW_C1_9.png"]
    )  # fmt: skip
    assert keys == ["mint_0027_NG_QS", "audiojack_0001_OK", "usb_adaptor_0013_NG_ZW"]
    # Names without a view (MVTec's), or only some with one: no sample metrics at all.
    assert metrics.sample_keys(["bottle/test/good/000.png"]) is None
    assert metrics.sample_keys(["mint_0027_NG_QS_C2_1.jpg", "000.png"]) is None
    # The view digit must be followed by "_", and the class must end in a capital letter.
    assert metrics.sample_keys(["mint_0027_NG_QS_C2.jpg"]) is None
    assert metrics.sample_keys(["mint_0027_NG__C2_1.jpg"]) is None
    scores, labels = np.array([0.3, 0.9, 0.5]), np.array([0, 1, 0])
    z = np.zeros((3, 2, 2))
    out = metrics.evaluate(scores, labels, z, z.astype(bool), "all", ["a.png", "b.png", "c.png"])
    assert not set(metrics.SAMPLE) & set(out) and "image_auroc" in out
    # Two views of one defective sample and one normal sample: max score, max label.
    names = ["mint_0001_NG_QS_C1_1.jpg", "mint_0001_NG_QS_C2_1.jpg", "mint_0001_OK_C1_1.jpg"]
    s, y = metrics.by_sample(scores, labels, metrics.sample_keys(names))
    assert s.tolist() == pytest.approx([0.9, 0.5]) and y.tolist() == [1, 0]


# ADEval's binned AUPR (Real-IAD's official s_aupr / i_aupr / p_aupr), against hand-computed cases
# and against the restatement of its definition in numpy (tests/adeval_oracle.py).
@pytest.mark.parametrize(
    "scores,labels,want",
    [
        # The top threshold t_1000 = max flags the top score: with 4 positives on top the curve
        # starts at recall 1/4, precision 1, and stays there: 0.75 where the step AP is 1.
        ([0, 1, 2, 3, 4, 5], [0, 0, 1, 1, 1, 1], 0.75),
        ([0, 1, 2, 3], [0, 0, 1, 1], 0.5),
        # Thresholds in (1, 2] flag {2, 3}: recall 1/2, precision 1/2; in (0, 1]: {1, 2, 3},
        # recall 1, precision 2/3: one trapezoid from (1/2, 1/2) to (1, 2/3).
        ([0, 1, 2, 3], [0, 1, 0, 1], 0.5 * (0.5 + 2 / 3) / 2),
        # Ties: the 3 tied scores are flagged together, precision 2/3 at recall 1 from the top.
        ([0, 1, 1, 1], [0, 1, 1, 0], 0.0),
    ],
)
def test_binned_aupr_hand_computed(scores, labels, want):
    from adeval_oracle import binned_aupr

    got = metrics.curves(np.array(scores, np.float32), np.array(labels))["aupr"]
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(binned_aupr(scores, labels), want, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binned_aupr_matches_the_numpy_restatement(seed):
    from adeval_oracle import binned_aupr

    rng = np.random.default_rng(seed)
    labels = rng.random(3000) < 0.1
    scores = rng.normal(size=3000) + labels * 1.5
    scores[:500] = np.round(scores[:500], 1)  # ties, some on strip thresholds
    scores = scores.astype(np.float32)
    got = metrics.evaluate(scores, labels, scores[:, None, None], labels[:, None, None])
    want = binned_aupr(scores, labels)
    np.testing.assert_allclose(got["image_aupr"], want, atol=1e-6)
    np.testing.assert_allclose(got["pixel_aupr"], want, atol=1e-6)
    assert abs(got["image_aupr"] - got["image_ap"]) > 1e-4  # a different quantity from the AP
    assert np.isnan(metrics.curves(np.ones(4), np.array([0, 1, 0, 1]))["aupr"])  # no strips
