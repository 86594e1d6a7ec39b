"""Noisy training sets (METHOD.md section 6): add int(ratio * N_train) test anomalies to the training
set, chosen at random from a seeded generator. No-overlap mode removes them from the test set;
overlap mode keeps them there and augments their training copies with a small rotation and shift.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from softpatch_jax.data.records import Augment, CategorySplits


@dataclasses.dataclass(frozen=True)
class NoiseSpec:
    ratio: float
    overlap: bool
    rotation_deg: float = 3.0
    translate: float = 0.03


def num_injected(ratio: float, num_train: int) -> int:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"noise ratio must be in [0, 1], got {ratio}")
    return int(ratio * num_train + 1e-9)


def inject(splits: CategorySplits, spec: NoiseSpec, rng: np.random.Generator) -> CategorySplits:
    """Returns new splits with injected anomalies appended to `train` (records flagged `injected`).

    Raises ValueError when the test set has fewer anomalies than the ratio asks for, stating the
    largest ratio that fits.
    """
    anomalies = [r for r in splits.test if r.label == 1]
    n = num_injected(spec.ratio, len(splits.train))
    if n == 0:
        return splits
    if n > len(anomalies) or (not spec.overlap and n >= len(anomalies)):
        # No-overlap mode must leave at least one anomaly to test on.
        available = len(anomalies) - (0 if spec.overlap else 1)
        max_ratio = available / len(splits.train)
        raise ValueError(
            f"category {splits.category!r}: noise ratio {spec.ratio} asks for {n} injected anomalies "
            f"but the test set has {len(anomalies)} ({'overlap' if spec.overlap else 'no-overlap'} "
            f"mode allows at most {available}, i.e. ratio <= {max_ratio:.4f})"
        )
    chosen = sorted(rng.choice(len(anomalies), size=n, replace=False).tolist())
    injected = []
    for i in chosen:
        rec = anomalies[i]
        aug = None
        if spec.overlap:
            rot, tx, ty = rng.uniform(-1.0, 1.0, size=3)
            aug = Augment(
                float(rot * spec.rotation_deg),
                float(tx * spec.translate),
                float(ty * spec.translate),
            )
        # The mask travels with the copy for auditing; the method never reads training masks.
        injected.append(dataclasses.replace(rec, augment=aug, injected=True))
    test = splits.test
    if not spec.overlap:
        removed = {anomalies[i].path for i in chosen}
        test = tuple(r for r in splits.test if r.path not in removed)
    return CategorySplits(splits.category, splits.train + tuple(injected), test)
