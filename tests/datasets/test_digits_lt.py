"""DigitsLT: counts, the seeded selection, images and labels against scikit-learn's digits."""
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from pml_dsb.datasets import DigitsLT, digits_lt_counts, digits_lt_indices

# Hand-computed round(124 * IF ** (-c / 9)), c = 0..9.
COUNTS = {
    10: [124, 96, 74, 58, 45, 35, 27, 21, 16, 12],
    50: [124, 80, 52, 34, 22, 14, 9, 6, 4, 2],
}


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.mark.parametrize("factor", sorted(COUNTS))
def test_counts_by_hand(factor):
    assert digits_lt_counts(factor).tolist() == COUNTS[factor]


@pytest.mark.parametrize("factor", [1, 2.5, 10, 100, 247])
def test_counts_formula(factor):
    assert digits_lt_counts(factor).tolist() == [
        round(124 * factor ** (-c / 9)) for c in range(10)
    ]


@pytest.mark.parametrize("bad", [0.99, 248, 1e6, float("nan")])
def test_bad_imbalance_factor(bad):
    with pytest.raises(ValueError, match="imbalance_factor"):
        DigitsLT(imbalance_factor=bad)


def test_bad_split_and_seed():
    with pytest.raises(ValueError, match="split"):
        DigitsLT(split="val")
    with pytest.raises(ValueError, match="seed"):
        DigitsLT(seed=-1)
    with pytest.raises(ValueError, match="seed"):
        DigitsLT(seed=1.5)


@pytest.mark.parametrize("factor", sorted(COUNTS))
def test_train_and_test_sizes(factor):
    train = DigitsLT(imbalance_factor=factor, split="train")
    test = DigitsLT(imbalance_factor=factor, split="test")
    assert train.class_counts().tolist() == COUNTS[factor]
    assert len(train) == sum(COUNTS[factor])
    assert test.class_counts().tolist() == [50] * 10 and len(test) == 500
    assert train.num_classes == test.num_classes == 10
    assert train.labels.dtype == np.int64


def test_images_and_labels_match_sklearn(digits):
    ds = DigitsLT(imbalance_factor=10, split="train", seed=3)
    assert ds.data.shape == (len(ds), 1, 8, 8) and ds.data.dtype == torch.float32
    assert float(ds.data.min()) == 0.0 and float(ds.data.max()) == 1.0
    expected = torch.from_numpy(digits.images[ds.source_indices] / 16.0).float().unsqueeze(1)
    assert torch.equal(ds.data, expected)
    assert ds.labels.tolist() == digits.target[ds.source_indices].tolist()  # label c = digit c
    image, label = ds[7]
    assert image.shape == (1, 8, 8) and isinstance(label, int) and label == ds.labels[7]
    assert torch.equal(image, expected[7])


def test_selection_is_deterministic_and_seeded():
    a = DigitsLT(imbalance_factor=10, split="train", seed=5)
    b = DigitsLT(imbalance_factor=10, split="train", seed=5)
    c = DigitsLT(imbalance_factor=10, split="train", seed=6)
    assert np.array_equal(a.source_indices, b.source_indices)
    assert torch.equal(a.data, b.data)
    assert not np.array_equal(a.source_indices, c.source_indices)
    state = torch.random.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    DigitsLT(imbalance_factor=10, seed=7)
    assert torch.equal(state, torch.random.get_rng_state())  # no global RNG touched
    assert np.array_equal(np_state, np.random.get_state()[1])


@pytest.mark.parametrize("seed", [0, 1])
def test_splits_disjoint_nested_and_test_independent_of_if(seed):
    test10 = set(digits_lt_indices(10, "test", seed).tolist())
    test50 = set(digits_lt_indices(50, "test", seed).tolist())
    train10 = set(digits_lt_indices(10, "train", seed).tolist())
    train50 = set(digits_lt_indices(50, "train", seed).tolist())
    train1 = set(digits_lt_indices(1, "train", seed).tolist())
    assert test10 == test50
    assert not (train1 & test10)
    assert train50 <= train10 <= train1
    assert len(train1) == 1240 and len(test10) == 500


def test_transform_is_applied():
    ds = DigitsLT(imbalance_factor=10, split="test", transform=lambda x: x * 2)
    assert float(ds[0][0].max()) <= 2.0
    assert torch.equal(ds[0][0], ds.data[0] * 2)


@pytest.mark.parametrize("seed", [0, 4])
def test_selection_follows_one_generator_over_the_classes(digits, seed):
    """The documented selection, written out: one default_rng(seed) permutes
    the rows of digit 0, then digit 1, ...; the first 50 are the test images,
    the next n_c the training images."""
    rng = np.random.default_rng(seed)
    test, train = [], []
    for c, n_c in enumerate(COUNTS[50]):
        order = rng.permutation(np.flatnonzero(digits.target == c))
        test += order[:50].tolist()
        train += order[50:50 + n_c].tolist()
    assert digits_lt_indices(50, "test", seed).tolist() == sorted(test)
    assert digits_lt_indices(50, "train", seed).tolist() == sorted(train)
