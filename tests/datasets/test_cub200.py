"""CUB200 on a fixture in CUB-200-2011's exact on-disk format."""
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from pytorch_metric_learning.datasets import CUB as PMLCUB

from pml_dsb.datasets import CUB200

# (class id, colour mode) per image, image ids 1.. in this order, as images.txt lists them
# (the real file is sorted by class). Classes are non-contiguous on purpose.
SPEC = [
    (1, "RGB"), (1, "RGB"), (2, "L"), (2, "RGB"), (2, "RGB"), (57, "RGB"),
    (100, "RGB"), (101, "RGB"), (101, "L"), (150, "RGB"), (200, "RGB"), (200, "RGB"),
]
TRAIN_CLASSES = [1, 2, 57, 100]  # expected labels 0, 1, 2, 3
TEST_CLASSES = [101, 150, 200]
GRAY_VALUE = 90


def _class_folder(class_id):
    return f"{class_id:03d}.Bird_{class_id}"


def make_cub(root):
    """Write CUB_200_2011/ with images.txt, image_class_labels.txt, classes.txt,
    train_test_split.txt and tiny JPEGs; returns the folder."""
    folder = root / "CUB_200_2011"
    (folder / "images").mkdir(parents=True)
    with open(folder / "classes.txt", "w") as f:
        f.writelines(f"{c} {_class_folder(c)}\n" for c in range(1, 201))
    images, labels, split = [], [], []
    for image_id, (class_id, mode) in enumerate(SPEC, 1):
        rel = f"{_class_folder(class_id)}/Bird_{class_id}_{image_id:04d}.jpg"
        (folder / "images" / _class_folder(class_id)).mkdir(exist_ok=True)
        color = GRAY_VALUE if mode == "L" else (200, 30, 60)
        Image.new(mode, (10 + image_id, 8), color).save(folder / "images" / rel, "JPEG")
        images.append(f"{image_id} {rel}\n")
        labels.append(f"{image_id} {class_id}\n")
        split.append(f"{image_id} {image_id % 2}\n")
    (folder / "images.txt").write_text("".join(images))
    (folder / "image_class_labels.txt").write_text("".join(labels))
    (folder / "train_test_split.txt").write_text("".join(split))
    return folder


@pytest.fixture
def cub_root(tmp_path):
    make_cub(tmp_path)
    return tmp_path


@pytest.mark.parametrize("split, classes", [("train", TRAIN_CLASSES), ("test", TEST_CLASSES)])
def test_split_sizes_and_contiguous_labels(cub_root, split, classes):
    ds = CUB200(cub_root, split=split)
    expected_original = [c for c, _ in SPEC if c in classes]
    assert len(ds) == len(expected_original)
    assert ds.labels.dtype == np.int64
    assert ds.num_classes == len(classes)
    assert ds.source_classes.tolist() == classes
    expected_labels = [classes.index(c) for c in expected_original]
    assert ds.labels.tolist() == expected_labels
    assert sorted(set(ds.labels.tolist())) == list(range(len(classes)))
    assert ds.class_counts().tolist() == [expected_original.count(c) for c in classes]


@pytest.mark.parametrize("split", ["train", "test"])
def test_agrees_with_pml_reader_up_to_the_label_remapping(cub_root, split):
    ours = CUB200(cub_root, split=split)
    pml = PMLCUB(str(cub_root), split=split)
    assert ours.paths == pml.paths
    assert ours.source_classes[ours.labels].tolist() == list(pml.labels)
    offset = 1 if split == "train" else 101
    assert min(pml.labels) == offset  # PML keeps the 1-based ids that we remap


def test_items_are_rgb_and_grayscale_is_converted(cub_root):
    ds = CUB200(cub_root, split="train")
    modes = []
    for i in range(len(ds)):
        image, label = ds[i]
        assert isinstance(label, int) and label == ds.labels[i]
        assert image.mode == "RGB"
        modes.append(Image.open(ds.paths[i]).mode)
    gray = modes.index("L")
    assert PMLCUB(str(cub_root), split="train")[gray][0].mode == "L"  # what PML returns
    pixels = np.asarray(ds[gray][0], dtype=np.int64)
    assert pixels.shape[2] == 3
    assert np.all(pixels[..., 0] == pixels[..., 1]) and np.all(pixels[..., 1] == pixels[..., 2])
    assert abs(pixels.mean() - GRAY_VALUE) < 3


def test_transform_is_applied(cub_root):
    ds = CUB200(cub_root, split="test", transform=lambda img: img.size)
    image, _ = ds[0]
    assert image == Image.open(ds.paths[0]).size


def test_labels_do_not_read_images(cub_root, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an image was opened")

    monkeypatch.setattr(Image, "open", refuse)
    ds = CUB200(cub_root, split="train")
    assert ds.class_counts().sum() == len(ds.labels) == 7


@pytest.mark.parametrize("name", ["images.txt", "image_class_labels.txt", "images"])
def test_each_missing_file_is_named(cub_root, name):
    target = cub_root / "CUB_200_2011" / name
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    with pytest.raises(FileNotFoundError) as info:
        CUB200(cub_root, split="train")
    assert str(target) in str(info.value)
    assert "CUB_200_2011/" in str(info.value)  # the required layout is described


def test_missing_image_is_named(cub_root):
    ds = CUB200(cub_root, split="test")
    os.remove(ds.paths[1])
    with pytest.raises(FileNotFoundError, match="partial") as info:
        CUB200(cub_root, split="test")
    assert ds.paths[1] in str(info.value)
    CUB200(cub_root, split="train")  # the other split is complete


def test_empty_root_and_root_inside_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        CUB200(tmp_path)
    assert str(tmp_path / "CUB_200_2011" / "images.txt") in str(info.value)
    folder = make_cub(tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="parent"):
        CUB200(folder)


def test_truncated_index_file_is_refused(cub_root):
    labels_txt = cub_root / "CUB_200_2011" / "image_class_labels.txt"
    lines = labels_txt.read_text().splitlines(keepends=True)
    labels_txt.write_text("".join(lines[:-2]))
    with pytest.raises(ValueError, match="same image ids"):
        CUB200(cub_root, split="test")


def test_index_files_listing_the_ids_in_another_order_are_refused(cub_root):
    """Both files hold the same ids, in another order: pairing them by line
    would give images the wrong classes."""
    labels_txt = cub_root / "CUB_200_2011" / "image_class_labels.txt"
    lines = labels_txt.read_text().splitlines(keepends=True)
    lines[0], lines[1] = lines[1], lines[0]
    labels_txt.write_text("".join(lines))
    with pytest.raises(ValueError, match="same image ids in the same order"):
        CUB200(cub_root, split="train")


def test_a_folder_where_an_image_should_be_is_named_as_missing(cub_root):
    """A directory at an image's path passed the check and failed at the first
    read (IsADirectoryError, mid-epoch); it is named as missing up front."""
    ds = CUB200(cub_root, split="test")
    os.remove(ds.paths[1])
    os.mkdir(ds.paths[1])
    with pytest.raises(FileNotFoundError, match="partial") as info:
        CUB200(cub_root, split="test")
    assert ds.paths[1] in str(info.value)


@pytest.mark.parametrize("bad", ["0", "201", "\u00b2"], ids=["class-0", "class-201", "superscript-2"])
def test_a_class_id_outside_1_to_200_is_refused_naming_the_line(cub_root, bad):
    """Once dropped silently from both splits (a superscript digit passed
    str.isdigit, then int() failed naming no file)."""
    labels_txt = cub_root / "CUB_200_2011" / "image_class_labels.txt"
    lines = labels_txt.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[2] = f"3 {bad}\n"
    labels_txt.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match="line 3 of .*image_class_labels.txt.*class id from 1 to 200"):
        CUB200(cub_root, split="train")


def test_a_truncated_image_names_its_file(cub_root):
    ds = CUB200(cub_root, split="train")
    data = open(ds.paths[1], "rb").read()
    with open(ds.paths[1], "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(OSError, match=f"^{re.escape(ds.paths[1])}: .*[Tt]runcated"):
        ds[1]
    assert ds[0][1] == 0  # the others still load


def test_bad_split(cub_root):
    with pytest.raises(ValueError, match="split"):
        CUB200(cub_root, split="val")


@pytest.mark.parametrize("edit", ["trailing blank lines", "crlf and a blank last line", "blank line inside"])
def test_blank_lines_in_the_index_files_change_nothing(cub_root, edit):
    # PML's reader pairs the two files line by line: a blank line crashed it or
    # silently dropped every image after it
    clean = {split: CUB200(cub_root, split=split) for split in ("train", "test")}
    folder = cub_root / "CUB_200_2011"
    for name in ("images.txt", "image_class_labels.txt"):
        lines = (folder / name).read_text().splitlines(keepends=True)
        if edit == "trailing blank lines":
            lines += ["\n", "  \n"]
        elif edit == "crlf and a blank last line":
            lines = [line.replace("\n", "\r\n") for line in lines] + ["\r\n"]
        elif name == "images.txt":
            lines.insert(4, "\n")
        (folder / name).write_bytes("".join(lines).encode())
    for split, expected in clean.items():
        ds = CUB200(cub_root, split=split)
        assert ds.paths == expected.paths and ds.labels.tolist() == expected.labels.tolist()


def test_root_with_a_tilde_is_the_home_folder(cub_root, monkeypatch):
    monkeypatch.setenv("HOME", str(cub_root.parent))
    ds = CUB200(f"~/{cub_root.name}", split="test")
    assert ds.paths == CUB200(cub_root, split="test").paths


@pytest.mark.parametrize("split, full", [("train", 5864), ("test", 5924)])
def test_a_partial_copy_warns_with_the_published_split_size(cub_root, caplog, split, full):
    # CUB-200-2011: classes 1-100 hold 5,864 images, classes 101-200 5,924
    with caplog.at_level("WARNING", logger="pml_dsb.datasets.cub200"):
        ds = CUB200(cub_root, split=split)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"CUB200 {split} split has {len(ds)} images; the full dataset has {full}"]


def test_an_image_id_listed_twice_is_refused(cub_root):
    folder = cub_root / "CUB_200_2011"
    for name in ("images.txt", "image_class_labels.txt"):
        lines = (folder / name).read_text().splitlines(keepends=True)
        (folder / name).write_text("".join(lines + lines[:1]))  # same order in both files
    with pytest.raises(ValueError, match="lists an image id twice"):
        CUB200(cub_root, split="train")


def test_a_line_with_more_than_two_fields_is_refused_naming_the_line(cub_root):
    images_txt = cub_root / "CUB_200_2011" / "images.txt"
    lines = images_txt.read_text().splitlines(keepends=True)
    lines[1] = lines[1].rstrip("\n") + " extra\n"
    images_txt.write_text("".join(lines))
    with pytest.raises(ValueError, match=r"line 2 of .*images.txt.*relative path"):
        CUB200(cub_root, split="train")


@pytest.mark.parametrize("split, kept", [("train", 101), ("test", 100)])
def test_a_copy_without_any_image_of_the_split_names_its_classes(cub_root, split, kept):
    folder = cub_root / "CUB_200_2011"
    # keep only the images of one class of the other split (class `kept`)
    pairs = zip((folder / "images.txt").read_text().splitlines(keepends=True),
                (folder / "image_class_labels.txt").read_text().splitlines(keepends=True))
    kept_pairs = [(i, c) for i, c in pairs if int(c.split()[1]) == kept]
    (folder / "images.txt").write_text("".join(i for i, _ in kept_pairs))
    (folder / "image_class_labels.txt").write_text("".join(c for _, c in kept_pairs))
    wanted = "1-100" if split == "train" else "101-200"
    with pytest.raises(ValueError, match=f"lists no image of the '{split}' classes \\({wanted}\\)"):
        CUB200(cub_root, split=split)


def test_partial_copy_counts_the_missing_images(cub_root):
    ds = CUB200(cub_root, split="test")
    for path in ds.paths[1:3]:
        os.remove(path)
    with pytest.raises(FileNotFoundError) as info:
        CUB200(cub_root, split="test")
    assert f"2 of the {len(ds)} images listed for this split are missing" in str(info.value)
    assert f"the first one is {ds.paths[1]!r}" in str(info.value)
