"""CUB-200-2011 for retrieval on unseen classes, split as PML's ``CUB`` reader splits it."""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional, Union

import numpy as np

from ._base import (
    LabelledDataset,
    check_split,
    load_rgb,
    remap_labels,
    require_files,
    require_images,
)

logger = logging.getLogger(__name__)

_FOLDER = "CUB_200_2011"
_LAYOUT = (
    "<root>/CUB_200_2011/ holding images.txt ('<image id> <relative path>' per line), "
    "image_class_labels.txt ('<image id> <class id 1..200>' per line, same order) and "
    "images/<class folder>/<file>.jpg, as extracted from CUB_200_2011.tgz"
)


class CUB200(LabelledDataset):
    """CUB-200-2011 split by class for deep metric learning.

    ``split="train"`` holds classes 1-100 (5,864 images), ``split="test"``
    classes 101-200 (5,924 images), in ``images.txt`` order, as in PML's
    ``CUB`` reader. Unlike PML's reader, labels are remapped
    to ``0..C-1`` per split (in increasing original class id; the original
    id of label ``k`` is ``source_classes[k]``), every image is converted to
    RGB (CUB holds a few grayscale images), and a missing or partial copy
    raises ``FileNotFoundError`` naming the expected file. Nothing is
    downloaded.

    Args:
        root: folder that contains ``CUB_200_2011/``.
        split: ``"train"`` or ``"test"``.
        transform: callable applied to the RGB ``PIL.Image``.

    ``dataset[i]`` returns ``(image, label)``: the RGB ``PIL.Image`` (or
    ``transform(image)``) and an ``int`` in ``0..C-1``. ``labels`` gives all
    labels (``numpy.int64``) without reading any image.
    """

    FULL_SIZES = {"train": 5864, "test": 5924}

    def __init__(
        self,
        root: Union[str, os.PathLike],
        split: str = "train",
        transform: Optional[Callable] = None,
    ) -> None:
        self.split = check_split(split)
        self.root = os.path.expanduser(os.fspath(root))
        self.transform = transform
        folder = os.path.join(self.root, _FOLDER)
        if not os.path.isdir(folder) and os.path.isfile(os.path.join(self.root, "images.txt")):
            raise FileNotFoundError(
                f"CUB200: expected folder {folder!r} was not found; {self.root!r} looks like "
                f"the CUB_200_2011 folder itself: pass its parent as root. "
                f"Required layout: {_LAYOUT}."
            )
        images_txt = os.path.join(folder, "images.txt")
        labels_txt = os.path.join(folder, "image_class_labels.txt")
        require_files([images_txt, labels_txt, os.path.join(folder, "images")], "CUB200", _LAYOUT)
        # read here rather than by PML's reader, which pairs the two files line
        # by line: a blank line shifts the pairs and drops images silently
        relative, classes = _read_index_files(images_txt, labels_txt)
        wanted = range(1, 101) if self.split == "train" else range(101, 201)
        keep = [i for i, c in enumerate(classes) if c in wanted]
        self.paths = [os.path.join(folder, "images", relative[i]) for i in keep]
        if not self.paths:
            raise ValueError(
                f"CUB200: {labels_txt!r} lists no image of the {self.split!r} classes "
                f"({'1-100' if self.split == 'train' else '101-200'})"
            )
        require_images(self.paths, "CUB200", _LAYOUT)
        self.labels, self.source_classes = remap_labels([classes[i] for i in keep])
        if len(self.paths) != self.FULL_SIZES[self.split]:
            logger.warning(
                "CUB200 %s split has %d images; the full dataset has %d",
                self.split, len(self.paths), self.FULL_SIZES[self.split],
            )
        logger.info(
            "CUB200 %s: %d images, %d classes", self.split, len(self.paths), self.num_classes
        )

    def __getitem__(self, index: int):
        image = load_rgb(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def _read_ids(path: str, integer_values: bool) -> tuple[list[int], list[str]]:
    """Image ids (first field) and values (second) of a CUB index file, checking
    each line's form; blank lines are skipped."""
    ids, values = [], []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split()
            ok = len(fields) == 2 and _is_number(fields[0])
            if ok and integer_values:
                ok = _is_number(fields[1]) and 1 <= int(fields[1]) <= 200
            if not ok:
                raise ValueError(
                    f"CUB200: line {line_number} of {path!r} is {line.strip()!r}; expected "
                    f"'<image id> <{'class id from 1 to 200' if integer_values else 'relative path'}>'"
                )
            ids.append(int(fields[0]))
            values.append(fields[1])
    return ids, values


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()  # str.isdigit alone takes digits int() refuses, e.g. '²'


def _read_index_files(images_txt: str, labels_txt: str) -> tuple[list[str], list[int]]:
    """Relative image paths and class ids, in ``images.txt`` order; files whose
    image ids differ are refused (PML's reader would drop the mismatches)."""
    image_ids, relative = _read_ids(images_txt, integer_values=False)
    label_ids, classes = _read_ids(labels_txt, integer_values=True)
    if image_ids != label_ids:
        raise ValueError(
            f"CUB200: {images_txt!r} ({len(image_ids)} lines) and {labels_txt!r} "
            f"({len(label_ids)} lines) must list the same image ids in the same order; "
            f"the copy is partial or mixed"
        )
    if len(np.unique(image_ids)) != len(image_ids):
        raise ValueError(f"CUB200: {images_txt!r} lists an image id twice")
    return relative, [int(c) for c in classes]
