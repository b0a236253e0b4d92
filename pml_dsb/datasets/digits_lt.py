"""Digits-LT: a long-tailed split of scikit-learn's bundled 8x8 handwritten digits."""
from __future__ import annotations

import functools
import logging
import numbers
from typing import Callable, Optional

import numpy as np
import torch

from ._base import LabelledDataset, check_imbalance_factor, check_split

logger = logging.getLogger(__name__)

NUM_CLASSES = 10
HEAD_COUNT = 124
TEST_PER_CLASS = 50
#: Label ``c`` is the digit ``CLASS_ORDER[c]``: digit 0 is the head class, digit 9 the tail.
CLASS_ORDER = tuple(range(NUM_CLASSES))


def digits_lt_counts(imbalance_factor: float) -> np.ndarray:
    """Training images per class of digits-LT: ``n_c = round(124 * IF ** (-c / 9))``.

    ``c = 0..9`` is the label (see ``CLASS_ORDER``); ``round`` is Python's.
    124 is the smallest class of the bundled digits (174 images, digit 8)
    minus the 50 test images. ``IF`` must be in ``[1, 248)`` so that every
    class keeps at least one image.

    >>> digits_lt_counts(10).tolist()
    [124, 96, 74, 58, 45, 35, 27, 21, 16, 12]
    >>> digits_lt_counts(1).tolist() == [124] * 10
    True
    """
    factor = check_imbalance_factor(imbalance_factor)
    counts = np.array(
        [round(HEAD_COUNT * factor ** (-c / (NUM_CLASSES - 1))) for c in range(NUM_CLASSES)],
        dtype=np.int64,
    )
    if counts.min() < 1:
        raise ValueError(
            f"imbalance_factor must be < {2 * HEAD_COUNT} so that every class keeps at "
            f"least one training image, got {imbalance_factor!r}"
        )
    return counts


@functools.lru_cache(maxsize=1)
def _bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (shipped inside the package, no download): images
    scaled from 0..16 to [0, 1] as float32 (1797 x 8 x 8) and their digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    targets = digits.target.astype(np.int64)
    images.setflags(write=False)
    targets.setflags(write=False)
    return images, targets


def digits_lt_indices(imbalance_factor: float, split: str, seed: int = 0) -> np.ndarray:
    """Rows of scikit-learn's ``load_digits()`` that form a digits-LT split.

    For each label ``c`` in turn, the images of digit ``CLASS_ORDER[c]`` (in
    scikit-learn's order) are permuted by one
    ``numpy.random.default_rng(seed)``: the first 50 of the permutation are
    the test images, the next ``digits_lt_counts(IF)[c]`` the training
    images. The test split does not depend on ``IF``, and for one seed the
    training set of a larger IF is a subset of that of a smaller one. The
    result is sorted.

    >>> len(digits_lt_indices(10, "test")), len(digits_lt_indices(10, "train"))
    (500, 508)
    """
    split = check_split(split)
    counts = digits_lt_counts(imbalance_factor)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    _, targets = _bundled_digits()
    rng = np.random.default_rng(int(seed))
    keep = []
    for c, digit in enumerate(CLASS_ORDER):
        order = rng.permutation(np.flatnonzero(targets == digit))
        if split == "test":
            keep.append(order[:TEST_PER_CLASS])
        else:
            keep.append(order[TEST_PER_CLASS:TEST_PER_CLASS + counts[c]])
    return np.sort(np.concatenate(keep)).astype(np.int64)


class DigitsLT(LabelledDataset):
    """Long-tailed handwritten digits at their native 8x8, offline.

    scikit-learn's bundled ``load_digits`` (1,797 images of 10 digits) with
    label ``c`` = digit ``CLASS_ORDER[c]`` (digit 0 the head class, digit 9
    the tail). ``split="test"``: 50 images per class (500, balanced, the
    same for every IF); ``split="train"``: ``n_c = round(124 * IF ** (-c/9))``
    images of class ``c`` (508 at IF=10, 347 at IF=50). Which images go
    where is fixed by ``seed`` (see :func:`digits_lt_indices`); train and
    test never share an image.

    Args:
        imbalance_factor: head count / tail count, in ``[1, 248)``.
        split: ``"train"`` or ``"test"``.
        seed: seed of the per-class selection (not of any global RNG).
        transform: callable applied to the image tensor.

    ``dataset[i]`` returns ``(image, label)``: a float32 tensor of shape
    ``1 x 8 x 8`` with values in ``[0, 1]`` (pixel / 16), or
    ``transform(image)``, and an ``int`` in ``0..9``. ``source_indices``
    are the rows of ``load_digits()``.

    >>> ds = DigitsLT(imbalance_factor=50, split="train")
    >>> len(ds), ds.class_counts().tolist()
    (347, [124, 80, 52, 34, 22, 14, 9, 6, 4, 2])
    >>> image, label = ds[0]
    >>> tuple(image.shape), image.dtype, type(label)
    ((1, 8, 8), torch.float32, <class 'int'>)
    """

    def __init__(
        self,
        imbalance_factor: float = 10.0,
        split: str = "train",
        seed: int = 0,
        transform: Optional[Callable] = None,
    ) -> None:
        self.split = check_split(split)
        self.imbalance_factor = check_imbalance_factor(imbalance_factor)
        self.seed = seed
        self.transform = transform
        self.source_indices = digits_lt_indices(self.imbalance_factor, self.split, seed)
        images, targets = _bundled_digits()
        digit_to_label = np.empty(NUM_CLASSES, dtype=np.int64)
        digit_to_label[list(CLASS_ORDER)] = np.arange(NUM_CLASSES)
        self.labels = digit_to_label[targets[self.source_indices]]
        self.source_classes = np.asarray(CLASS_ORDER, dtype=np.int64)
        self.data = torch.from_numpy(images[self.source_indices].copy()).unsqueeze(1)
        logger.info(
            "DigitsLT %s (IF=%g, seed=%s): %d images", self.split, self.imbalance_factor,
            seed, len(self.labels),
        )

    def __getitem__(self, index: int):
        image = self.data[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
