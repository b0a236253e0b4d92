"""Cars196 on fixtures in its three on-disk layouts (original .mat, torchvision, Kaggle/PML)."""
import inspect
import os
import shutil

import numpy as np
import pytest
import scipy.io as sio
from PIL import Image
from pytorch_metric_learning.datasets import Cars196 as PMLCars196
from torchvision.datasets import StanfordCars

from pml_dsb.datasets import Cars196

# (class id 1..196, the dataset's own test flag, colour mode) per image, in file order
SPEC = [
    (1, 0, "RGB"), (1, 1, "RGB"), (7, 0, "L"), (98, 1, "RGB"), (98, 0, "RGB"),
    (99, 0, "RGB"), (120, 1, "L"), (120, 0, "RGB"), (196, 1, "RGB"),
]
TRAIN_CLASSES = [1, 7, 98]
TEST_CLASSES = [99, 120, 196]
NAMES = [f"Make{c} Model{c} 20{c % 10:02d}" for c in range(1, 197)]
NAMES[119] = "Ram C/V Cargo Van Minivan 2012"  # a '/' in a name, as the real list has


def _save_image(path, index, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (9 + index, 7), 120 if mode == "L" else (10, 200, 90)).save(path, "JPEG")


def _box(i):
    return [np.array([[v]], dtype=np.uint16) for v in (1, 2, 30 + i, 40 + i)]


def _cell(strings):
    cell = np.empty((1, len(strings)), dtype=object)
    cell[0, :] = strings
    return cell


def make_original(root):
    """cars_annos.mat (struct 'annotations' with the real fields, 'class_names') + car_ims/."""
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    annotations = np.zeros((1, len(SPEC)), dtype=[(f, "O") for f in fields])
    for i, (class_id, test, mode) in enumerate(SPEC):
        rel = f"car_ims/{i + 1:06d}.jpg"
        _save_image(root / rel, i, mode)
        annotations[0, i] = (rel, *_box(i), np.array([[class_id]], dtype=np.uint8),
                             np.array([[test]], dtype=np.uint8))
    sio.savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": _cell(NAMES)})


def make_torchvision(root):
    """stanford_cars/ as torchvision.datasets.StanfordCars reads it."""
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    for test_flag, mat_path, image_dir in [
        (0, base / "devkit" / "cars_train_annos.mat", base / "cars_train"),
        (1, base / "cars_test_annos_withlabels.mat", base / "cars_test"),
    ]:
        rows = [(i, s) for i, s in enumerate(SPEC) if s[1] == test_flag]
        annotations = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
        for j, (i, (class_id, _, mode)) in enumerate(rows):
            fname = f"{j + 1:05d}.jpg"
            _save_image(image_dir / fname, i, mode)
            annotations[0, j] = (*_box(i), np.array([[class_id]], dtype=np.uint8), fname)
        sio.savemat(mat_path, {"annotations": annotations})
    sio.savemat(base / "devkit" / "cars_meta.mat", {"class_names": _cell(NAMES)})


def make_kaggle(root):
    """names.csv, anno_{train,test}.csv, car_data/car_data/{train,test}/<name>/ as PML reads it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "names.csv").write_text("".join(n + "\n" for n in NAMES))
    for test_flag, split in [(0, "train"), (1, "test")]:
        lines = []
        for i, (class_id, test, mode) in enumerate(SPEC):
            if test != test_flag:
                continue
            fname = f"{i + 1:05d}.jpg"
            folder = NAMES[class_id - 1].replace("/", "-")
            _save_image(root / "car_data" / "car_data" / split / folder / fname, i, mode)
            lines.append(f"{fname},1,2,{30 + i},{40 + i},{class_id}\n")
        (root / f"anno_{split}.csv").write_text("".join(lines))


MAKERS = {"original": make_original, "torchvision": make_torchvision, "kaggle": make_kaggle}


@pytest.fixture(params=sorted(MAKERS))
def cars(request, tmp_path):
    MAKERS[request.param](tmp_path)
    return request.param, tmp_path


@pytest.mark.parametrize("split, classes", [("train", TRAIN_CLASSES), ("test", TEST_CLASSES)])
def test_split_by_class_with_contiguous_labels(cars, split, classes):
    layout, root = cars
    ds = Cars196(root, split=split)
    assert ds.layout == layout
    original = sorted(c for c, _, _ in SPEC if c in classes)
    assert len(ds) == len(original)  # the dataset's own test flag is ignored
    assert ds.labels.dtype == np.int64
    assert ds.source_classes.tolist() == classes
    assert sorted(ds.source_classes[ds.labels].tolist()) == original
    assert sorted(set(ds.labels.tolist())) == list(range(ds.num_classes))
    assert ds.class_counts().tolist() == [original.count(c) for c in classes]
    assert Cars196(root, split=split, layout=layout).paths == ds.paths


def test_items_are_rgb_with_grayscale_converted(cars):
    _, root = cars
    for split in ("train", "test"):
        ds = Cars196(root, split=split)
        modes = [Image.open(p).mode for p in ds.paths]
        assert "L" in modes
        for i in range(len(ds)):
            image, label = ds[i]
            assert image.mode == "RGB" and label == ds.labels[i] and isinstance(label, int)
            assert image.size == Image.open(ds.paths[i]).size
        gray = np.asarray(ds[modes.index("L")][0], dtype=np.int64)
        assert np.all(gray[..., 0] == gray[..., 2])


@pytest.mark.parametrize("split", ["train", "test"])
def test_torchvision_layout_agrees_with_torchvision(tmp_path, split):
    make_torchvision(tmp_path)
    ours = Cars196(tmp_path, split=split)
    wanted = TRAIN_CLASSES if split == "train" else TEST_CLASSES
    reference = set()
    for tv_split in ("train", "test"):
        if "loader" in inspect.signature(StanfordCars).parameters:  # torchvision >= 0.22
            tv = StanfordCars(tmp_path, split=tv_split, loader=lambda path: path)
            samples = [tv[i] for i in range(len(tv))]
        else:  # older: the (path, target) list it loads from
            samples = StanfordCars(tmp_path, split=tv_split)._samples
        reference |= {(p, t + 1) for p, t in samples if t + 1 in wanted}
    assert set(zip(ours.paths, ours.source_classes[ours.labels].tolist())) == reference


@pytest.mark.parametrize("split", ["train", "test"])
def test_kaggle_layout_agrees_with_pml(tmp_path, split):
    make_kaggle(tmp_path)
    ours = Cars196(tmp_path, split=split)
    pml = PMLCars196(str(tmp_path), split=split)
    assert ours.paths == pml.paths
    assert ours.source_classes[ours.labels].tolist() == list(pml.labels)


MISSING = {
    "original": ["cars_annos.mat", "car_ims"],
    "torchvision": [
        "stanford_cars/devkit/cars_train_annos.mat",
        "stanford_cars/cars_train",
        "stanford_cars/cars_test_annos_withlabels.mat",
        "stanford_cars/cars_test",
    ],
    "kaggle": ["names.csv", "anno_train.csv", "anno_test.csv", "car_data/car_data"],
}


@pytest.mark.parametrize(
    "layout, name", [(layout, name) for layout, names in MISSING.items() for name in names]
)
def test_each_missing_file_is_named(tmp_path, layout, name):
    MAKERS[layout](tmp_path)
    target = tmp_path / name
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError) as info:
        Cars196(tmp_path, split="train", layout=layout)
    assert str(target) in str(info.value)
    if not (layout == "original" and name == "cars_annos.mat"):
        with pytest.raises(FileNotFoundError) as info:
            Cars196(tmp_path, split="test")  # auto-detected layout
        assert str(target) in str(info.value)


def test_nothing_there_names_every_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        Cars196(tmp_path)
    message = str(info.value)
    for marker in ("cars_annos.mat", "stanford_cars", "names.csv", "car_ims"):
        assert marker in message


def test_missing_image_is_named(cars):
    _, root = cars
    path = Cars196(root, split="test").paths[-1]
    os.remove(path)
    with pytest.raises(FileNotFoundError, match="partial") as info:
        Cars196(root, split="test")
    assert path in str(info.value)


@pytest.mark.parametrize("layout,bad_id", [("original", 0), ("original", 197), ("torchvision", 0), ("kaggle", 0)])
def test_class_ids_outside_1_to_196_are_refused(tmp_path, monkeypatch, layout, bad_id):
    # a 0-based copy of the annotations dropped class 0's images and shifted the split by one
    monkeypatch.setitem(globals(), "SPEC", [(bad_id, 0, "RGB")] + SPEC[1:])
    MAKERS[layout](tmp_path)
    for split in ("train", "test"):
        with pytest.raises(ValueError, match=f"the class {bad_id}; expected a class id from 1 to 196"):
            Cars196(tmp_path, split=split)


def test_mat_without_the_expected_fields(tmp_path):
    make_original(tmp_path)
    bad = np.zeros((1, 1), dtype=[("relative_im_path", "O"), ("label", "O")])
    bad[0, 0] = ("car_ims/000001.jpg", 1)
    sio.savemat(tmp_path / "cars_annos.mat", {"annotations": bad})
    with pytest.raises(ValueError, match="class"):
        Cars196(tmp_path)


def test_bad_arguments(tmp_path):
    make_original(tmp_path)
    with pytest.raises(ValueError, match="split"):
        Cars196(tmp_path, split="all")
    with pytest.raises(ValueError, match="layout"):
        Cars196(tmp_path, layout="zip")


def test_root_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    make_original(tmp_path / "cars")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Cars196("~/cars", split="test").paths == Cars196(tmp_path / "cars", split="test").paths


@pytest.mark.parametrize("layout", sorted(MAKERS))
def test_a_copy_without_any_image_of_the_split_is_refused(tmp_path, monkeypatch, layout):
    # an empty test split evaluated nothing, silently
    monkeypatch.setitem(globals(), "SPEC", [s for s in SPEC if s[0] in TRAIN_CLASSES])
    MAKERS[layout](tmp_path)
    assert Cars196(tmp_path, split="train").source_classes.tolist() == TRAIN_CLASSES
    with pytest.raises(ValueError, match=f"the '{layout}' annotations under .* list no image of the 'test' "
                                         f"classes 99-196"):
        Cars196(tmp_path, split="test")


@pytest.mark.parametrize("split, full", [("train", 8054), ("test", 8131)])
def test_a_partial_copy_warns_with_the_published_split_size(tmp_path, caplog, split, full):
    # Cars196: classes 1-98 hold 8,054 images, classes 99-196 8,131
    make_original(tmp_path)
    with caplog.at_level("WARNING", logger="pml_dsb.datasets.cars196"):
        ds = Cars196(tmp_path, split=split)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"Cars196 {split} split has {len(ds)} images; the full dataset has {full}"]


@pytest.mark.parametrize("layouts, expected", [
    (["original", "kaggle"], "original"),
    (["original", "torchvision", "kaggle"], "original"),
    (["torchvision", "kaggle"], "torchvision"),
])
def test_auto_layout_prefers_original_then_torchvision_then_kaggle(tmp_path, layouts, expected):
    for layout in layouts:
        MAKERS[layout](tmp_path)
    ds = Cars196(tmp_path, split="test")
    assert ds.layout == expected
    assert ds.paths == Cars196(tmp_path, split="test", layout=expected).paths


def test_kaggle_class_id_above_196_is_refused(tmp_path):
    # PML's reader keeps only its split's ids and would drop class 197 from both splits unseen
    make_kaggle(tmp_path)
    with open(tmp_path / "anno_test.csv", "a") as f:
        f.write("99999.jpg,1,2,30,40,197\n")
    for split in ("train", "test"):
        with pytest.raises(ValueError, match=r"line \d+ of .*anno_test.csv.* gives the class 197; "
                                             r"expected a class id from 1 to 196"):
            Cars196(tmp_path, split=split)


@pytest.mark.parametrize("layout", ["original", "torchvision"])
def test_mat_files_holding_a_single_annotation(tmp_path, monkeypatch, layout):
    # loadmat(squeeze_me=True) turns a 1 x 1 struct array into a 0-d record
    monkeypatch.setitem(globals(), "SPEC", [(5, 0, "RGB")] if layout == "original"
                        else [(5, 0, "RGB"), (150, 1, "L")])
    MAKERS[layout](tmp_path)
    ds = Cars196(tmp_path, split="train")
    assert len(ds) == 1 and ds.source_classes.tolist() == [5] and ds[0][0].mode == "RGB"
    if layout == "torchvision":
        assert Cars196(tmp_path, split="test").source_classes.tolist() == [150]


def test_a_bad_class_id_names_its_own_image(tmp_path, monkeypatch):
    last = str(tmp_path / f"car_ims/{len(SPEC) + 1:06d}.jpg")  # the last image, not the first
    monkeypatch.setitem(globals(), "SPEC", SPEC + [(0, 1, "RGB")])
    make_original(tmp_path)
    with pytest.raises(ValueError) as info:
        Cars196(tmp_path, split="train")
    assert f"give image {last!r} the class 0" in str(info.value)


def test_every_missing_kaggle_file_is_listed_without_an_ellipsis(tmp_path):
    # four paths missing: the first named, the three others listed in full
    with pytest.raises(FileNotFoundError) as info:
        Cars196(tmp_path, layout="kaggle")
    names = [str(tmp_path / n) for n in ("names.csv", "anno_train.csv", "anno_test.csv", "car_data/car_data")]
    assert f"expected file {names[0]!r} was not found (and 3 more: {names[1:]}). " in str(info.value)


def test_more_than_four_missing_files_are_elided():
    from pml_dsb.datasets._base import require_files

    paths = [f"/nonexistent/pml_dsb/{i}" for i in range(5)]
    with pytest.raises(FileNotFoundError, match=r"\(and 4 more: \[.*'/nonexistent/pml_dsb/3'\]\.\.\.\)"):
        require_files(paths, "X", "layout")
