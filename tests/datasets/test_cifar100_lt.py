"""CIFAR-100-LT: the protocol's counts and a fixture in CIFAR-100's python-pickle format."""
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from PIL import Image

from pml_dsb.datasets import CIFAR100LT, cifar100_lt_counts, cifar100_lt_indices

# Train-set sizes of the protocol (DEFINITIONS.md, "Datasets and splits").
PROTOCOL_TOTALS = {10: 19573, 50: 12608, 100: 10847, 200: 9502}
EXTRA_PER_CLASS = 3  # images of each class beyond what IF=10 keeps
TEST_PER_CLASS = 2


@pytest.mark.parametrize("factor, total", sorted(PROTOCOL_TOTALS.items()))
def test_counts_match_protocol_totals(factor, total):
    counts = cifar100_lt_counts(factor)
    assert counts.dtype == np.int64 and counts.shape == (100,)
    assert int(counts.sum()) == total
    assert counts[0] == 500 and counts[99] == int(500 / factor)
    assert np.all(np.diff(counts) <= 0)


def test_counts_formula_and_balanced_case():
    assert cifar100_lt_counts(1).tolist() == [500] * 100
    factor = 37.5
    assert cifar100_lt_counts(factor).tolist() == [
        int(500 * (1 / factor) ** (c / 99)) for c in range(100)
    ]


@pytest.mark.parametrize("bad", [0.5, 0, -3, 501, float("nan"), float("inf")])
def test_bad_imbalance_factor(bad):
    with pytest.raises(ValueError, match="imbalance_factor"):
        cifar100_lt_counts(bad)


@pytest.mark.parametrize("bad", ["ten", "10", True, np.True_, None], ids=repr)
def test_imbalance_factor_of_wrong_type(bad):
    # float() took "10" as 10 and numpy's True as 1 (the balanced 50,000 images)
    with pytest.raises(TypeError, match="imbalance_factor must be a real number"):
        cifar100_lt_counts(bad)
    assert cifar100_lt_counts(np.int64(10)).tolist() == cifar100_lt_counts(10.0).tolist()


def test_indices_refuse_a_short_class():
    targets = np.repeat(np.arange(100), 500)
    targets[targets == 7] = 8  # class 7 vanishes
    with pytest.raises(ValueError, match="class 7"):
        cifar100_lt_indices(targets, 10)


def _row_id(image_hwc):
    """The fixture writes each row's index into its first two red pixels."""
    return int(image_hwc[0, 0, 0]) * 256 + int(image_hwc[0, 1, 0])


def _write_batch(path, labels, offset=0):
    n = len(labels)
    data = np.zeros((n, 3072), dtype=np.uint8)
    ids = np.arange(n) + offset
    data[:, 0], data[:, 1] = ids // 256, ids % 256  # red channel, first row: (0,0), (0,1)
    data[:, 1024] = np.asarray(labels) % 256  # green (0,0): the label, for a visual check
    entry = {
        "filenames": [f"img_{i}.png" for i in range(n)],
        "batch_label": "fixture",
        "fine_labels": [int(v) for v in labels],
        "coarse_labels": [int(v) // 5 for v in labels],
        "data": data,
    }
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """cifar-100-python/{train,test,meta}: train holds n_c(IF=10) + 3 images of every
    class in a shuffled order, test 2 per class. Returns (root, train labels, test labels)."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-100-python"
    folder.mkdir()
    per_class = cifar100_lt_counts(10) + EXTRA_PER_CLASS
    train = np.repeat(np.arange(100), per_class)
    np.random.default_rng(0).shuffle(train)
    test = np.repeat(np.arange(100), TEST_PER_CLASS)[::-1].copy()
    _write_batch(folder / "train", train)
    _write_batch(folder / "test", test)
    with open(folder / "meta", "wb") as f:
        pickle.dump(
            {"fine_label_names": [f"fine{c}" for c in range(100)],
             "coarse_label_names": [f"coarse{c}" for c in range(20)]},
            f, protocol=2,
        )
    return root, train, test


@pytest.fixture
def no_md5(monkeypatch):
    """The fixture's md5 sums differ from the real files': in tests only, accept any
    existing file (torchvision checks the train, test and meta pickles)."""
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.mark.parametrize("factor", sorted(PROTOCOL_TOTALS))
def test_train_split_keeps_first_images_of_each_class(cifar, no_md5, factor):
    root, train, _ = cifar
    ds = CIFAR100LT(root, imbalance_factor=factor, split="train")
    assert len(ds) == PROTOCOL_TOTALS[factor]
    assert ds.class_counts().tolist() == cifar100_lt_counts(factor).tolist()
    assert ds.num_classes == 100 and ds.labels.dtype == np.int64
    # reference: walk the training file in order, keep the first n_c of each class
    budget = [int(500 * (1 / factor) ** (c / 99)) for c in range(100)]
    expected = []
    for row, label in enumerate(train):
        if budget[label] > 0:
            budget[label] -= 1
            expected.append(row)
    assert [_row_id(img) for img in ds.data] == expected
    assert ds.source_indices.tolist() == expected
    assert ds.labels.tolist() == train[expected].tolist()


def test_test_split_is_the_whole_balanced_set(cifar, no_md5):
    root, _, test = cifar
    for factor in (10, 200):
        ds = CIFAR100LT(root, factor, split="test")
        assert ds.labels.tolist() == test.tolist()
        assert ds.class_counts().tolist() == [TEST_PER_CLASS] * 100
        assert ds.classes[3] == "fine3"


def test_items_are_rgb_images_and_labels(cifar, no_md5):
    root, train, _ = cifar
    ds = CIFAR100LT(root, 50, split="train")
    image, label = ds[5]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    assert isinstance(label, int) and label == ds.labels[5]
    assert _row_id(np.asarray(image)) == ds.source_indices[5]
    assert np.asarray(image)[0, 0, 1] == label
    to_tensor = CIFAR100LT(root, 50, transform=lambda im: torch.from_numpy(np.array(im)))
    assert to_tensor[5][0].shape == (32, 32, 3)


def test_real_path_still_checks_md5(cifar):
    root, _, _ = cifar
    with pytest.raises(RuntimeError, match=r"md5 sum of 'train', 'test', 'meta' in .*cifar-100-python") as err:
        CIFAR100LT(root, 10)
    assert "download" not in str(err.value)  # torchvision's hint: nothing is downloaded here


@pytest.mark.parametrize("name", ["train", "test", "meta"])
def test_each_missing_file_is_named(cifar, tmp_path, name):
    root, _, _ = cifar
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for other in ("train", "test", "meta"):
        if other != name:
            os.symlink(root / "cifar-100-python" / other, folder / other)
    with pytest.raises(FileNotFoundError) as info:
        CIFAR100LT(tmp_path, 10, split="test")
    assert str(folder / name) in str(info.value)
    assert "cifar-100-python" in str(info.value)


def test_bad_split(cifar):
    with pytest.raises(ValueError, match="split"):
        CIFAR100LT(cifar[0], 10, split="val")


def test_root_with_a_tilde_is_the_home_folder(cifar, no_md5, monkeypatch):
    root, _, _ = cifar
    monkeypatch.setenv("HOME", str(root.parent))
    ds = CIFAR100LT(f"~/{root.name}", imbalance_factor=50, split="train")
    assert ds.source_indices.tolist() == CIFAR100LT(root, imbalance_factor=50, split="train").source_indices.tolist()


def test_indices_refuse_a_class_one_image_short():
    counts = cifar100_lt_counts(10)
    targets = np.repeat(np.arange(100), counts)
    targets[np.flatnonzero(targets == 42)[0]] = 0  # class 42 holds n_42 - 1 images
    with pytest.raises(ValueError, match=f"needs {counts[42]} training images of class 42, "
                                         f"the training set holds {counts[42] - 1}"):
        cifar100_lt_indices(targets, 10)
    targets[np.flatnonzero(targets == 0)[-1]] = 42  # exactly n_42 again: accepted
    assert len(cifar100_lt_indices(targets, 10)) == PROTOCOL_TOTALS[10]


@pytest.mark.parametrize("bad", [0.5, 501])
def test_bad_imbalance_factor_is_named_before_any_file_is_read(tmp_path, bad):
    # tmp_path holds no CIFAR-100: the factor's range is checked first
    with pytest.raises(ValueError, match="imbalance_factor"):
        CIFAR100LT(tmp_path, imbalance_factor=bad)
