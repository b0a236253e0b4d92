"""Datasets of the benchmarks: contiguous labels per split, RGB images (DigitsLT: 1x8x8 greyscale), no downloads.

- :class:`CUB200`, :class:`Cars196`: retrieval on unseen classes (first half
  of the classes to train, second half to test).
- :class:`CIFAR100LT`: long-tailed CIFAR-100 train set, balanced test set.
- :class:`DigitsLT`: long-tailed 8x8 digits bundled with scikit-learn (offline).

Every dataset has ``labels`` (``numpy.int64``, ``0..C-1``), ``num_classes``,
``class_counts()`` and ``source_classes``; ``dataset[i]`` is ``(image, label)``.
:class:`IndexedDataset` appends each item's index (for index-addressed DSB memories).
"""
from .cars196 import Cars196
from .cifar100_lt import CIFAR100LT, cifar100_lt_counts, cifar100_lt_indices
from .cub200 import CUB200
from .digits_lt import DigitsLT, digits_lt_counts, digits_lt_indices
from .indexed import IndexedDataset
from .transforms import default_transform

__all__ = [
    "CUB200",
    "Cars196",
    "CIFAR100LT",
    "DigitsLT",
    "cifar100_lt_counts",
    "cifar100_lt_indices",
    "digits_lt_counts",
    "digits_lt_indices",
    "default_transform",
    "IndexedDataset",
]
