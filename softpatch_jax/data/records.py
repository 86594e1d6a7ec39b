"""What a dataset reader returns: one record per image, with its label and mask, nothing decoded.

Readers (MVTec folders, VisA, BTAD, Real-IAD, plain folders, the demo generator) all produce `CategorySplits`;
the noisy-set construction (`noise.py`) and the loaders (`preprocess.py`, `prepared.py`) only see
records. A record's `path` is the identity of its image everywhere, the prepared store included.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Augment:
    """Rigid augmentation of an injected training copy (overlap mode, METHOD.md section 6)."""

    rotation_deg: float
    translate_x: float  # fraction of the width
    translate_y: float  # fraction of the height


@dataclasses.dataclass(frozen=True)
class Record:
    """One image of a split.

    Attributes:
      path: the image file.
      label: 0 normal, 1 anomalous.
      defect: "good" or the defect type (the folder name in MVTec's layout).
      mask_path: the ground-truth mask file of an anomalous test image; None where the mask is
        all-zero by definition (normal images) or unknown (unlabelled training images).
      augment: set on training copies of injected anomalies in overlap mode.
      injected: True for a test anomaly injected into the training set as noise.
    """

    path: str
    label: int
    defect: str
    mask_path: str | None = None
    augment: Augment | None = None
    injected: bool = False


@dataclasses.dataclass(frozen=True)
class CategorySplits:
    """One category's records.

    Attributes:
      train_anomalous: paths of training records that the source itself labels anomalous (Real-IAD's
        fully unsupervised lists). Their records are unlabelled like every training record; this is
        only read to report the true noise ratio, never by the method.
      train_samples, train_anomalous_samples: where images are views of physical samples (Real-IAD),
        how many samples the training list holds and how many of them are defective (what the
        FUIAD split names count); 0 where the source has no samples.
    """

    category: str
    train: tuple[Record, ...]
    test: tuple[Record, ...]
    train_anomalous: tuple[str, ...] = ()
    train_samples: int = 0
    train_anomalous_samples: int = 0

    def __post_init__(self):
        if not self.train:
            raise ValueError(f"category {self.category!r}: the training split is empty")
        if not self.test:
            raise ValueError(f"category {self.category!r}: the test split is empty")
