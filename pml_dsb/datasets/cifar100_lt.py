"""CIFAR-100-LT: the long-tailed CIFAR-100 protocol on torchvision's ``CIFAR100``."""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional, Union

import numpy as np

from ._base import LabelledDataset, check_imbalance_factor, check_split, require_files

logger = logging.getLogger(__name__)

NUM_CLASSES = 100
HEAD_COUNT = 500
_FOLDER = "cifar-100-python"
_LAYOUT = (
    "<root>/cifar-100-python/ holding the files train, test and meta of the python version "
    "of CIFAR-100 (cifar-100-python.tar.gz, extracted)"
)


def cifar100_lt_counts(imbalance_factor: float) -> np.ndarray:
    """Training images kept per class by the CIFAR-100-LT protocol.

    ``n_c = int(500 * (1 / IF) ** (c / 99))`` for ``c = 0..99``: class 0 keeps
    all its 500 images, class 99 keeps ``int(500 / IF)``. ``IF`` must be in
    ``[1, 500]`` so that every class keeps at least one image.

    >>> counts = cifar100_lt_counts(100)
    >>> int(counts[0]), int(counts[99]), int(counts.sum())
    (500, 5, 10847)
    >>> [int(cifar100_lt_counts(f).sum()) for f in (10, 50, 200)]
    [19573, 12608, 9502]
    """
    factor = check_imbalance_factor(imbalance_factor)
    counts = np.array(
        [int(HEAD_COUNT * (1 / factor) ** (c / (NUM_CLASSES - 1))) for c in range(NUM_CLASSES)],
        dtype=np.int64,
    )
    if counts.min() < 1:
        raise ValueError(
            f"imbalance_factor must be <= {HEAD_COUNT} so that every class keeps at least "
            f"one training image, got {imbalance_factor!r}"
        )
    return counts


def cifar100_lt_indices(targets, imbalance_factor: float) -> np.ndarray:
    """Indices into the CIFAR-100 training set kept by the CIFAR-100-LT protocol.

    For each class ``c``, the first ``cifar100_lt_counts(IF)[c]`` images of
    class ``c`` in the training-set order; the result is sorted, so the
    long-tailed set keeps the original order.

    >>> targets = np.repeat(np.arange(100), 500)
    >>> idx = cifar100_lt_indices(targets, 10)
    >>> len(idx), idx[:3].tolist(), int(np.bincount(targets[idx])[99])
    (19573, [0, 1, 2], 50)
    """
    targets = np.asarray(targets, dtype=np.int64)
    counts = cifar100_lt_counts(imbalance_factor)
    keep = []
    for c, n_c in enumerate(counts):
        where = np.flatnonzero(targets == c)
        if len(where) < n_c:
            raise ValueError(
                f"CIFAR-100-LT needs {n_c} training images of class {c}, the training set "
                f"holds {len(where)}: it is not the CIFAR-100 training set"
            )
        keep.append(where[:n_c])
    return np.sort(np.concatenate(keep))


class CIFAR100LT(LabelledDataset):
    """Long-tailed CIFAR-100 (train) and the balanced CIFAR-100 test set.

    ``split="train"`` keeps, of each class ``c``, the first
    ``n_c = int(500 * (1 / IF) ** (c / 99))`` images in CIFAR-100's
    training order (totals: IF=10: 19,573; 50: 12,608; 100: 10,847;
    200: 9,502); ``split="test"`` is the whole balanced test set (10,000
    images) whatever ``imbalance_factor`` is. Labels are CIFAR-100's fine
    labels, ``0..99`` in both splits (every class keeps an image, so the
    per-split remapping is the identity and train and test labels agree).

    The files are read by ``torchvision.datasets.CIFAR100`` with
    ``download=False``; it checks their md5 sums. Missing files raise
    ``FileNotFoundError`` naming them.

    Args:
        root: folder that contains ``cifar-100-python/``.
        imbalance_factor: head count / tail count, in ``[1, 500]``.
        split: ``"train"`` or ``"test"``.
        transform: callable applied to the RGB 32x32 ``PIL.Image``.

    ``dataset[i]`` returns ``(image, label)``. ``source_indices`` are the
    kept rows of torchvision's dataset, ``data`` the kept images
    (``N x 32 x 32 x 3`` uint8), ``classes`` the fine class names.
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        imbalance_factor: float,
        split: str = "train",
        transform: Optional[Callable] = None,
    ) -> None:
        from torchvision.datasets import CIFAR100

        self.split = check_split(split)
        self.imbalance_factor = check_imbalance_factor(imbalance_factor)
        cifar100_lt_counts(self.imbalance_factor)  # validates the range before reading
        self.root = os.path.expanduser(os.fspath(root))
        self.transform = transform
        folder = os.path.join(self.root, _FOLDER)
        require_files(
            [os.path.join(folder, name) for name in ("train", "test", "meta")],
            "CIFAR100LT",
            _LAYOUT,
        )
        try:
            base = CIFAR100(self.root, train=self.split == "train", download=False)
        except RuntimeError as err:
            from torchvision.datasets.utils import check_integrity

            expected = CIFAR100.train_list + CIFAR100.test_list + [[CIFAR100.meta["filename"], CIFAR100.meta["md5"]]]
            bad = [name for name, md5 in expected if not check_integrity(os.path.join(folder, name), md5)]
            # torchvision's own message suggests download=True: not an option here
            raise RuntimeError(
                f"CIFAR100LT: the md5 sum of {', '.join(repr(n) for n in bad) or 'a file'} in {folder!r} differs "
                f"from the official python-version pickles' (torchvision's CIFAR100 refused them): a partial "
                f"or different copy. Required layout: {_LAYOUT}."
            ) from err
        targets = np.asarray(base.targets, dtype=np.int64)
        if self.split == "train":
            self.source_indices = cifar100_lt_indices(targets, self.imbalance_factor)
        else:
            self.source_indices = np.arange(len(targets), dtype=np.int64)
        self.data = base.data[self.source_indices]
        self.labels = targets[self.source_indices]
        self.source_classes = np.arange(NUM_CLASSES, dtype=np.int64)
        self.classes = list(base.classes)
        logger.info(
            "CIFAR100LT %s (IF=%g): %d images, %d classes",
            self.split, self.imbalance_factor, len(self.labels), self.num_classes,
        )

    def __getitem__(self, index: int):
        from PIL import Image

        image = Image.fromarray(self.data[index]).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
