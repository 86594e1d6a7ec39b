import numpy as np
from sklearn.metrics import roc_auc_score

from softpatch_jax import metrics


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.random(5000) < 0.2
    scores = np.round(rng.normal(size=5000) + labels * 0.8, 1)  # rounding makes many ties
    np.testing.assert_allclose(
        metrics.auroc(scores, labels), roc_auc_score(labels, scores), atol=1e-6
    )


def test_pixel_auroc_on_maps_matches_sklearn():
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
