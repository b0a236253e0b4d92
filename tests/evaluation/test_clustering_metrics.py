"""NMI: sklearn-backed score against a numpy contingency-table reference, and
the seeded faiss k-means path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from evaluation_testlib import clustered_data, numpy_nmi, spy_on_kmeans
from pml_dsb.evaluation import kmeans_cluster_labels, nmi, nmi_from_clusters


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.mark.parametrize("n_labels, n_clusters", [(3, 3), (5, 8), (10, 2)])
def test_nmi_from_clusters_matches_contingency_formula(rng, n_labels, n_clusters):
    labels = rng.integers(0, n_labels, 400)
    clusters = np.where(rng.random(400) < 0.6, labels % n_clusters, rng.integers(0, n_clusters, 400))
    expected = numpy_nmi(labels, clusters)
    assert 0.05 < expected < 0.95
    assert nmi_from_clusters(labels, clusters) == pytest.approx(expected, abs=1e-10)
    # renaming clusters or labels changes nothing
    assert nmi_from_clusters(labels * 7 + 3, (clusters + 5) * 2) == pytest.approx(expected, abs=1e-10)


def test_kmeans_is_deterministic_for_a_fixed_seed(rng):
    # overlapping blobs: k-means has several local optima to choose from
    x, y = clustered_data(rng, [40] * 12, dim=16, noise=2.0)
    first = kmeans_cluster_labels(x, 12, seed=3, nredo=3)
    again = kmeans_cluster_labels(x, 12, seed=3, nredo=3)
    np.testing.assert_array_equal(first, again)
    assert first.dtype == np.int64 and first.shape == (480,)
    assert set(first.tolist()) <= set(range(12))
    assert nmi(x, y, seed=3, nredo=3) == nmi(x, y, seed=3, nredo=3)


def test_nmi_is_the_nmi_of_the_kmeans_clusters(rng):
    x, y = clustered_data(rng, [30] * 6, dim=8, noise=1.5)
    clusters = kmeans_cluster_labels(x, 6, seed=11, nredo=2)
    assert nmi(x, y, seed=11, nredo=2) == pytest.approx(numpy_nmi(y, clusters), abs=1e-10)


def test_separated_clusters_give_nmi_one_like_pml(rng):
    x, y = clustered_data(rng, [25] * 5, dim=32, noise=0.05)
    ours = nmi(x, y)
    pml = AccuracyCalculator(include=("NMI",), device=torch.device("cpu")).get_accuracy(
        torch.nn.functional.normalize(torch.from_numpy(x)), torch.from_numpy(y)
    )["NMI"]
    assert ours == pytest.approx(1.0, abs=1e-12)
    assert pml == pytest.approx(ours, abs=1e-12)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("factor, dtype", [(2.0**80, np.float32), (2.0**-80, np.float32), (2.0**60, np.float64)])
def test_kmeans_sees_through_a_power_of_two_scale(rng, normalize, factor, dtype):
    # squares of these entries overflow or underflow float32 (norms, k-means
    # distances); scaled back by one power of two the rows are the same
    x, y = clustered_data(rng, [30] * 6, dim=8, noise=1.5)
    x = x.astype(np.float32)
    expected = kmeans_cluster_labels(x, 6, seed=5, nredo=2, normalize=normalize)
    assert len(set(expected.tolist())) == 6
    scaled = x.astype(dtype) * dtype(factor)
    np.testing.assert_array_equal(kmeans_cluster_labels(scaled, 6, seed=5, nredo=2, normalize=normalize), expected)
    assert nmi(scaled, y, seed=5, nredo=2) == nmi(x, y, seed=5, nredo=2)


def test_kmeans_clusters_unit_vectors(rng):
    """Scaling an embedding does not move it: k-means sees L2-normalised rows."""
    x = np.array([[1, 0], [100, 1], [0, 1], [1, 200]], dtype=np.float32)
    c = kmeans_cluster_labels(x, 2, seed=0)
    assert c[0] == c[1] and c[2] == c[3] and c[0] != c[2]


def test_seed_nredo_niter_reach_faiss_and_every_point_is_used(rng, monkeypatch):
    seen = spy_on_kmeans(monkeypatch)
    x, _ = clustered_data(rng, [300] * 3, dim=4)
    kmeans_cluster_labels(x, 3, seed=5, nredo=4, niter=7)
    assert (seen["seed"], seen["nredo"], seen["niter"], seen["k"]) == (5, 4, 7, 3)
    assert seen["max_points_per_centroid"] * 3 >= 900  # no subsampling


@pytest.mark.parametrize(
    "embeddings, labels, match",
    [
        (np.ones((6, 2)), np.zeros(6), r"labels hold a single class \(0\.0\); NMI needs at least 2 classes"),
        (np.ones((6, 2)), np.arange(5) % 2, r"labels has 5 labels but embeddings has 6 rows"),
        (np.zeros((0, 2)), np.zeros(0), r"embeddings is empty"),
        (np.r_[np.ones((5, 2)), [[np.nan, 1]]], np.arange(6) % 2, r"embeddings contains 1 NaN or infinite"),
    ],
)
def test_nmi_bad_input(embeddings, labels, match):
    with pytest.raises(ValueError, match=match):
        nmi(embeddings, labels)


def test_kmeans_bad_arguments():
    with pytest.raises(ValueError, match=r"num_clusters=5 exceeds the 4 embeddings; expected num_clusters <= 4"):
        kmeans_cluster_labels(np.eye(4), 5)
    # as many clusters as points: allowed, each point its own cluster (NMI 1 against distinct labels)
    assert sorted(kmeans_cluster_labels(np.eye(4), 4).tolist()) == [0, 1, 2, 3]
    assert nmi(np.eye(4), [0, 1, 2, 3]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"nredo must be an int >= 1, got 0"):
        kmeans_cluster_labels(np.eye(4), 2, nredo=0)
    # faiss takes the seed as a C int: 2**31 raised an OverflowError from inside SWIG
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2147483647\], got 2147483648"):
        kmeans_cluster_labels(np.eye(4), 2, seed=2**31)
    assert len(kmeans_cluster_labels(np.eye(4), 2, seed=2**31 - 1)) == 4
    with pytest.raises(ValueError, match=r"labels has 3 entries but cluster_labels has 4"):
        nmi_from_clusters([0, 1, 0], [0, 1, 0, 1])


def test_nmi_from_clusters_refuses_none_and_nan_labels():
    with pytest.raises(ValueError, match="got None"):  # np.asarray(None) was one label: NMI 1.0
        nmi_from_clusters(None, [1])
    with pytest.raises(ValueError, match="labels contains NaN"):
        nmi_from_clusters([float("nan"), 0.0, 1.0], [0, 0, 1])
