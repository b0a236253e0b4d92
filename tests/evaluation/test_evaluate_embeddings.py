"""evaluate_embeddings: the runner's one-call dict."""
from __future__ import annotations

import importlib
import json
import re

import numpy as np
import pytest
import torch

from evaluation_testlib import brute_force_hits, clustered_data, numpy_nmi, spy_on_kmeans
from pml_dsb.evaluation import evaluate_embeddings, kmeans_cluster_labels


@pytest.fixture
def data():
    rng = np.random.default_rng(11)
    return clustered_data(rng, [15, 15, 15, 1, 15, 15], dim=12, noise=1.5)


def test_contents_against_brute_force_and_numpy_nmi(data):
    x, y = data
    counts = [300, 50, 5, 7, 100, 101]
    out = evaluate_embeddings(x, y, recall_ks=(1, 2, 4, 8), nmi_seed=4, nredo=2, train_counts=counts)
    lower, upper, lone = brute_force_hits(x, y, ks=(1, 2, 4, 8))
    assert out["num_queries"] == 76 and out["num_lone_queries"] == 1 == lone.sum()
    assert out["num_queries_evaluated"] == 75
    for k in (1, 2, 4, 8):
        assert np.array_equal(lower[k], upper[k])
        hits = lower[k][~lone]
        assert out[f"recall_at_{k}"] == pytest.approx(hits.mean(), abs=1e-12)
        per_class = out[f"per_class_recall_at_{k}"]
        assert list(per_class) == [0, 1, 2, 4, 5]  # class 3 is lone
        for c, v in per_class.items():
            assert v == pytest.approx(lower[k][y == c].mean(), abs=1e-12)
    clusters = kmeans_cluster_labels(x, 6, seed=4, nredo=2)
    assert out["NMI"] == pytest.approx(numpy_nmi(y, clusters), abs=1e-10)
    assert (out["nmi_seed"], out["nredo"]) == (4, 2)
    many = np.isin(y, [0, 5]) & ~lone
    assert out["groups"]["many"]["num_queries_evaluated"] == many.sum()
    assert out["groups"]["many"]["recall_at_1"] == pytest.approx(lower[1][many].mean(), abs=1e-12)
    assert out["groups"]["few"]["num_classes"] == 1  # class 2; class 3 has no evaluated query
    json.dumps(out)  # plain Python types only


def test_reference_set_and_no_nmi(data):
    x, y = data
    rng = np.random.default_rng(1)
    r, ry = clustered_data(rng, [10] * 6, dim=12)
    out = evaluate_embeddings(torch.from_numpy(x), torch.from_numpy(y), r, ry, recall_ks=(1,), nmi=False)
    lower, upper, lone = brute_force_hits(x, y, r, ry, ks=(1,))
    assert "NMI" not in out and "groups" not in out and "nredo" not in out
    assert out["num_lone_queries"] == 0
    assert out["recall_at_1"] == pytest.approx(lower[1].mean(), abs=1e-12)


def test_validation_happens_before_the_search(data, monkeypatch):
    module = importlib.import_module("pml_dsb.evaluation.evaluate_embeddings")  # the module, not the function

    def no_search(*args, **kwargs):
        raise AssertionError("searched before validating")

    monkeypatch.setattr(module, "retrieval_ranks", no_search)
    x, y = data
    with pytest.raises(ValueError, match=r"nredo must be an int >= 1, got 0"):
        evaluate_embeddings(x, y, nredo=0)
    with pytest.raises(ValueError, match=r"train_counts must hold non-negative integer counts, got -1"):
        evaluate_embeddings(x, y, train_counts=[-1, 2])


def test_errors_name_the_argument(data):
    x, y = data
    with pytest.raises(ValueError, match=r"recall_ks asks for k=100 neighbours .* expected k <= 75"):
        evaluate_embeddings(x, y, recall_ks=(1, 100))
    with pytest.raises(ValueError, match=r"train_counts has no count for 1 query labels \(5\)"):
        evaluate_embeddings(x, y, train_counts=[1, 2, 3, 4, 5], nmi=False)
    with pytest.raises(ValueError, match=r"reference_labels was given without reference"):
        evaluate_embeddings(x, y, reference_labels=y)
    # labels of shape (N, 2) are not (N,) or (N, 1): refused, not read from their first column
    with pytest.raises(ValueError, match=r"query_labels must have shape \(N,\) or \(N, 1\), got shape \(76, 2\)"):
        evaluate_embeddings(x, np.stack([y, y], 1), nmi=False)


def test_recall_ks_are_sorted_and_deduplicated(data):
    """recall_ks=(4, 1, 4) gives recall_at_1 and recall_at_4 once each, in order,
    equal to asking for (1, 4)."""
    x, y = data
    got = evaluate_embeddings(x, y, recall_ks=(4, 1, 4), nmi=False)
    want = evaluate_embeddings(x, y, recall_ks=(1, 4), nmi=False)
    assert [k for k in got if k.startswith("recall_at_")] == ["recall_at_1", "recall_at_4"]
    assert got == want


def test_niter_reaches_the_kmeans_and_is_checked_before_the_search(data, monkeypatch):
    seen = spy_on_kmeans(monkeypatch)
    x, y = data
    out = evaluate_embeddings(x, y, recall_ks=(1,), nmi_seed=3, nredo=2, niter=5)
    assert (seen["seed"], seen["nredo"], seen["niter"], seen["k"]) == (3, 2, 5, 6)
    assert out["NMI"] == pytest.approx(numpy_nmi(y, kmeans_cluster_labels(x, 6, seed=3, nredo=2, niter=5)),
                                       abs=1e-10)

    module = importlib.import_module("pml_dsb.evaluation.evaluate_embeddings")

    def no_search(*args, **kwargs):
        raise AssertionError("searched before validating")

    monkeypatch.setattr(module, "retrieval_ranks", no_search)
    with pytest.raises(ValueError, match=r"niter must be an int >= 1, got 0"):
        evaluate_embeddings(x, y, niter=0)


@pytest.mark.parametrize("ks", [(True,), (1, False), (1, 2.0), (-1,)])
def test_recall_ks_refuse_bools_floats_and_negatives(data, ks):
    # True would have been read as K=1
    x, y = data
    with pytest.raises(ValueError, match=r"recall_ks must hold positive ints, got " + re.escape(repr(tuple(ks)))):
        evaluate_embeddings(x, y, recall_ks=ks, nmi=False)


@pytest.mark.parametrize("counts", [np.array([150.0, 50.0, 0.0, 10.0, 200.0, 20.0]),
                                    torch.tensor([150.0, 50.0, 0.0, 10.0, 200.0, 20.0]),
                                    {0: 150, 1: 50, 2: 0, 3: 10, 4: 200, 5: 20}])
def test_train_counts_of_zero_and_whole_floats_are_counts(data, counts):
    """A class never seen in training (count 0) is a few-shot class; float
    arrays of whole numbers (np.bincount of weights, say) are counts."""
    x, y = data
    groups = evaluate_embeddings(x, y, recall_ks=(1,), nmi=False, train_counts=counts)["groups"]
    lower, upper, lone = brute_force_hits(x, y, ks=(1,))
    for group, classes in (("many", [0, 4]), ("medium", [1, 5]), ("few", [2, 3])):
        mask = np.isin(y, classes) & ~lone
        assert groups[group]["num_queries_evaluated"] == mask.sum()
        assert groups[group]["recall_at_1"] == pytest.approx(lower[1][mask].mean(), abs=1e-12)
    assert groups["few"]["num_classes"] == 1  # class 2; class 3 has no evaluated query


def test_train_counts_refuse_negative_and_fractional_counts(data):
    x, y = data
    for counts, shown in (([1, 2, -1, 4, 5, 6], "-1 for label 2"), (np.array([1.5, 2, 3, 4, 5, 6]), "1.5 for label 0")):
        with pytest.raises(ValueError, match=r"train_counts must hold non-negative integer counts, got " + shown):
            evaluate_embeddings(x, y, nmi=False, train_counts=counts)
