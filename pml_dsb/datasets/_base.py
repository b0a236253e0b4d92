"""Shared pieces of the dataset classes: label bookkeeping and file checks.

Private module: the public classes live one per module beside it.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Sequence

import numpy as np
from torch.utils.data import Dataset

SPLITS = ("train", "test")


class LabelledDataset(Dataset):
    """Base of every pml-dsb dataset: contiguous labels and class counts.

    Subclasses set ``self.labels`` (``numpy.int64``, values ``0..C-1``) and
    ``self.source_classes`` (the dataset's own class id of each new label,
    so that ``source_classes[labels[i]]`` is sample ``i``'s original class),
    and implement ``__getitem__``.
    """

    labels: np.ndarray
    source_classes: np.ndarray
    split: str

    @property
    def num_classes(self) -> int:
        """Number of classes C of this split (labels run over ``0..C-1``)."""
        return int(len(self.source_classes))

    def class_counts(self) -> np.ndarray:
        """Number of samples of each class, an ``int64`` array of length C."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    def __len__(self) -> int:
        return int(len(self.labels))


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def check_imbalance_factor(imbalance_factor: float) -> float:
    """Return ``imbalance_factor`` as a float after checking it is finite and >= 1."""
    # numbers.Real: float() would also take "10" and numpy's bools (np.True_ -> 1.0)
    if isinstance(imbalance_factor, (bool, np.bool_)) or not isinstance(imbalance_factor, numbers.Real):
        raise TypeError(f"imbalance_factor must be a real number >= 1, got {imbalance_factor!r}")
    value = float(imbalance_factor)
    if not math.isfinite(value) or value < 1:
        raise ValueError(
            f"imbalance_factor must be a finite number >= 1 (head count / tail count), "
            f"got {imbalance_factor!r}"
        )
    return value


def remap_labels(original: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Map arbitrary integer class ids to ``0..C-1`` in increasing id order.

    Returns ``(labels, source_classes)`` with ``source_classes[labels] == original``.

    >>> labels, classes = remap_labels([101, 105, 101, 103])
    >>> labels.tolist(), classes.tolist()
    ([0, 2, 0, 1], [101, 103, 105])
    """
    original = np.asarray(original, dtype=np.int64)
    source_classes, labels = np.unique(original, return_inverse=True)
    return labels.astype(np.int64).reshape(-1), source_classes.astype(np.int64)


def require_files(paths: Sequence[str], dataset: str, layout: str) -> None:
    """Raise ``FileNotFoundError`` naming every missing path and the expected layout."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"{dataset}: expected file {missing[0]!r} was not found"
            + (f" (and {len(missing) - 1} more: {missing[1:4]}{'...' if len(missing) > 4 else ''})"
               if len(missing) > 1 else "")
            + f". Required layout: {layout}. Nothing is downloaded; place the dataset there."
        )


def require_images(paths: Sequence[str], dataset: str, layout: str) -> None:
    """Like :func:`require_files` for the image files a split lists (a partial copy)."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{dataset}: {len(missing)} of the {len(paths)} images listed for this split are "
            f"missing, the first one is {missing[0]!r}. The dataset copy is partial. "
            f"Required layout: {layout}."
        )


def load_rgb(path: str):
    """Open an image file and return it as an RGB ``PIL.Image`` (grayscale and
    palette images converted, file handle closed)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as err:
        if path in str(err):
            raise
        # PIL names no file for a truncated one ("image file is truncated"): in a
        # DataLoader worker nothing else would say which
        raise OSError(f"{path}: {err}") from err
