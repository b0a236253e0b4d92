"""Cars196 (Stanford Cars) for retrieval on unseen classes, from any of its usual layouts."""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional, Union

import numpy as np
from pytorch_metric_learning.datasets import Cars196 as _PMLCars196

from ._base import (
    LabelledDataset,
    check_split,
    load_rgb,
    remap_labels,
    require_files,
    require_images,
)

logger = logging.getLogger(__name__)

LAYOUTS = ("auto", "original", "torchvision", "kaggle")

_LAYOUT_TEXT = {
    "original": (
        "'original': <root>/cars_annos.mat (struct array 'annotations' with fields "
        "relative_im_path, bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, test) and "
        "<root>/car_ims/<file>.jpg"
    ),
    "torchvision": (
        "'torchvision' (what torchvision.datasets.StanfordCars reads): "
        "<root>/stanford_cars/devkit/cars_train_annos.mat, <root>/stanford_cars/cars_train/, "
        "<root>/stanford_cars/cars_test_annos_withlabels.mat, <root>/stanford_cars/cars_test/ "
        "(annotation fields fname and class)"
    ),
    "kaggle": (
        "'kaggle' (what PML's Cars196 reads): <root>/names.csv, <root>/anno_train.csv, "
        "<root>/anno_test.csv, <root>/car_data/car_data/{train,test}/<class name>/<file>.jpg"
    ),
}


class Cars196(LabelledDataset):
    """Cars196 split by class for deep metric learning.

    ``split="train"`` holds classes 1-98 (8,054 images), ``split="test"``
    classes 99-196 (8,131 images), whatever the dataset's own train/test
    flag says; labels are remapped to ``0..C-1`` per split in increasing
    original class id (``source_classes[k]`` is the original id of label
    ``k``), and images are converted to RGB. Nothing is downloaded.

    Three layouts on disk are read (``layout="auto"`` picks the first whose
    marker exists: ``cars_annos.mat``, then ``stanford_cars/``, then
    ``names.csv``):

    - ``"original"``: ``cars_annos.mat`` + ``car_ims/`` as distributed by
      Stanford, read with ``scipy.io.loadmat``;
    - ``"torchvision"``: the ``stanford_cars/`` folder that
      ``torchvision.datasets.StanfordCars`` expects (its two annotation
      files, both splits, are merged before the class split);
    - ``"kaggle"``: the class-folder copy that PML's ``Cars196`` reads
      (PML's reader lists the files).

    A missing or partial copy raises ``FileNotFoundError`` naming the
    expected file and the layout.

    Args:
        root: folder holding one of the layouts above.
        split: ``"train"`` or ``"test"``.
        transform: callable applied to the RGB ``PIL.Image``.
        layout: one of ``"auto"``, ``"original"``, ``"torchvision"``, ``"kaggle"``.

    ``dataset[i]`` returns ``(image, label)``: the RGB ``PIL.Image`` (or
    ``transform(image)``) and an ``int`` in ``0..C-1``.
    """

    FULL_SIZES = {"train": 8054, "test": 8131}
    TRAIN_CLASSES = range(1, 99)
    TEST_CLASSES = range(99, 197)

    def __init__(
        self,
        root: Union[str, os.PathLike],
        split: str = "train",
        transform: Optional[Callable] = None,
        layout: str = "auto",
    ) -> None:
        self.split = check_split(split)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.root = os.path.expanduser(os.fspath(root))
        self.transform = transform
        self.layout = _detect_layout(self.root) if layout == "auto" else layout
        reader = {"original": _read_original, "torchvision": _read_torchvision,
                  "kaggle": _read_kaggle}[self.layout]
        paths, classes = reader(self.root, self.split)
        # an id outside 1..196 (a 0-based copy, say) would silently drop or shift images
        bad = next((i for i, c in enumerate(classes) if not 1 <= c <= 196), None)
        if bad is not None:
            raise ValueError(
                f"Cars196: the {self.layout!r} annotations under {self.root!r} give image "
                f"{paths[bad]!r} the class {classes[bad]}; expected a class id from 1 to 196"
            )
        wanted = self.TRAIN_CLASSES if self.split == "train" else self.TEST_CLASSES
        keep = [i for i, c in enumerate(classes) if c in wanted]
        if not keep:
            raise ValueError(
                f"Cars196: the {self.layout!r} annotations under {self.root!r} list no image "
                f"of the {self.split!r} classes {wanted.start}-{wanted.stop - 1}"
            )
        self.paths = [paths[i] for i in keep]
        require_images(self.paths, "Cars196", _LAYOUT_TEXT[self.layout])
        self.labels, self.source_classes = remap_labels([classes[i] for i in keep])
        if len(self.paths) != self.FULL_SIZES[self.split]:
            logger.warning(
                "Cars196 %s split has %d images; the full dataset has %d",
                self.split, len(self.paths), self.FULL_SIZES[self.split],
            )
        logger.info(
            "Cars196 %s (%s layout): %d images, %d classes",
            self.split, self.layout, len(self.paths), self.num_classes,
        )

    def __getitem__(self, index: int):
        image = load_rgb(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def _detect_layout(root: str) -> str:
    if os.path.exists(os.path.join(root, "cars_annos.mat")):
        return "original"
    if os.path.isdir(os.path.join(root, "stanford_cars")):
        return "torchvision"
    if os.path.exists(os.path.join(root, "names.csv")):
        return "kaggle"
    raise FileNotFoundError(
        f"Cars196: expected file {os.path.join(root, 'cars_annos.mat')!r} (or the folder "
        f"{os.path.join(root, 'stanford_cars')!r}, or {os.path.join(root, 'names.csv')!r}) "
        f"was not found. Accepted layouts: " + "; ".join(_LAYOUT_TEXT.values()) + "."
    )


def _load_annotations(path: str, fields: tuple[str, ...]) -> np.ndarray:
    """The ``annotations`` struct array of a Cars .mat file, as a 1-d record array."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path, squeeze_me=True)
    except Exception as err:  # scipy raises several types for a damaged file
        raise ValueError(f"Cars196: could not read {path!r} as a MATLAB file: {err}") from err
    if "annotations" not in mat:
        raise ValueError(f"Cars196: {path!r} has no 'annotations' variable")
    annotations = np.atleast_1d(mat["annotations"])
    present = annotations.dtype.names or ()
    missing = [f for f in fields if f not in present]
    if missing:
        raise ValueError(
            f"Cars196: the 'annotations' struct of {path!r} lacks the fields {missing} "
            f"(it has {list(present)})"
        )
    return annotations


def _read_original(root: str, split: str) -> tuple[list[str], list[int]]:
    mat_path = os.path.join(root, "cars_annos.mat")
    require_files([mat_path, os.path.join(root, "car_ims")], "Cars196",
                  _LAYOUT_TEXT["original"])
    annotations = _load_annotations(mat_path, ("relative_im_path", "class"))
    paths = [os.path.join(root, str(p)) for p in annotations["relative_im_path"]]
    classes = [int(c) for c in annotations["class"]]
    return paths, classes


def _read_torchvision(root: str, split: str) -> tuple[list[str], list[int]]:
    base = os.path.join(root, "stanford_cars")
    parts = [
        (os.path.join(base, "devkit", "cars_train_annos.mat"), os.path.join(base, "cars_train")),
        (os.path.join(base, "cars_test_annos_withlabels.mat"), os.path.join(base, "cars_test")),
    ]
    require_files([p for part in parts for p in part], "Cars196", _LAYOUT_TEXT["torchvision"])
    paths, classes = [], []
    for mat_path, image_dir in parts:
        annotations = _load_annotations(mat_path, ("fname", "class"))
        paths += [os.path.join(image_dir, str(name)) for name in annotations["fname"]]
        classes += [int(c) for c in annotations["class"]]
    return paths, classes


def _read_kaggle(root: str, split: str) -> tuple[list[str], list[int]]:
    require_files(
        [os.path.join(root, name) for name in ("names.csv", "anno_train.csv", "anno_test.csv")]
        + [os.path.join(root, "car_data", "car_data")],
        "Cars196",
        _LAYOUT_TEXT["kaggle"],
    )
    # PML's reader keeps the ids in its split's range and drops the rest unseen
    for name in ("anno_train.csv", "anno_test.csv"):
        path = os.path.join(root, name)
        with open(path) as f:
            for line_number, line in enumerate(f, 1):
                value = line.strip().split(",")[-1]
                if not (value.isascii() and value.isdigit() and 1 <= int(value) <= 196):
                    raise ValueError(
                        f"Cars196: line {line_number} of {path!r} gives the class {value}; "
                        f"expected a class id from 1 to 196"
                    )
    pml = _PMLCars196(root, split=split, download=False)
    return list(pml.paths), [int(c) for c in pml.labels]
