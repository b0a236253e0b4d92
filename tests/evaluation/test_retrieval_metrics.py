"""Recall@K and the kNN search against a brute-force numpy reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation_testlib import brute_force_hits, clustered_data, normalize
from pml_dsb.evaluation import (
    first_match_rank,
    knn_search,
    lone_query_mask,
    recall_at_k,
    retrieval_ranks,
    train_count_group,
)

KS = (1, 2, 4, 8)


@pytest.fixture
def rng():
    return np.random.default_rng(20230101)


@pytest.fixture
def random_set(rng):
    # overlapping blobs: recall well inside (0, 1), no exact ties
    return clustered_data(rng, [30] * 10, dim=16, noise=1.5)


def _exact(lower, upper, k):
    assert np.array_equal(lower[k], upper[k]), "the reference data were meant to have no ties"
    return lower[k]


def test_recall_matches_brute_force_leave_one_out(random_set):
    x, y = random_set
    lower, upper, lone = brute_force_hits(x, y, ks=KS)
    ranks = retrieval_ranks(x, y, max_k=max(KS))
    assert not lone.any() and ranks.num_lone_queries == 0
    for k in KS:
        expected = _exact(lower, upper, k)
        assert np.array_equal(ranks.hits(k), expected), k
        assert ranks.recall(k) == pytest.approx(expected.mean(), abs=1e-12)
    # the data are not degenerate: recall grows with k and stays below 1
    values = [ranks.recall(k) for k in KS]
    assert 0.2 < values[0] < values[-1] < 1.0


def test_recall_matches_brute_force_separate_reference(rng):
    q, ql = clustered_data(rng, [15] * 8, dim=12, noise=1.5)
    r, rl = clustered_data(rng, [20] * 8, dim=12, noise=1.5)
    lower, upper, lone = brute_force_hits(q, ql, r, rl, ks=KS)
    got = recall_at_k(q, ql, r, rl, ks=KS)
    assert not lone.any()
    for k in KS:
        assert got[k] == pytest.approx(_exact(lower, upper, k).mean(), abs=1e-12)


def test_reference_that_starts_with_the_queries(rng):
    """PML's tester convention: reference = queries followed by other rows."""
    q, ql = clustered_data(rng, [10] * 6, dim=8, noise=1.5)
    extra, el = clustered_data(rng, [10] * 6, dim=8, noise=1.5)
    r, rl = np.concatenate([q, extra]), np.concatenate([ql, el])
    lower, upper, _ = brute_force_hits(q, ql, r, rl, ks=KS, ref_includes_query=True)
    ranks = retrieval_ranks(q, ql, r, rl, max_k=8, ref_includes_query=True)
    for k in KS:
        assert np.array_equal(ranks.hits(k), _exact(lower, upper, k))
    # without the flag the query finds itself first: recall@1 would be 1
    assert recall_at_k(q, ql, r, rl, ks=(1,))[1] == 1.0
    assert ranks.recall(1) < 1.0


def test_duplicates_and_ties_within_brute_force_bounds(rng):
    base, base_y = clustered_data(rng, [6] * 5, dim=6, noise=1.0)
    # exact duplicates of the same label, of another label, and a block of
    # six identical points with mixed labels (many ties, self among them)
    dup_same = base[:5].copy()
    dup_other = base[5:10].copy()
    block = np.tile(rng.standard_normal((1, 6)).astype(np.float32), (6, 1))
    x = np.concatenate([base, dup_same, dup_other, block])
    y = np.concatenate([base_y, base_y[:5], (base_y[5:10] + 1) % 5, [0, 0, 1, 1, 1, 2]])
    lower, upper, lone = brute_force_hits(x, y, ks=KS)
    for batch_size in (4096, 7):  # batch boundaries must not move the self index
        ranks = retrieval_ranks(x, y, max_k=8, batch_size=batch_size)
        assert np.array_equal(ranks.lone, lone)
        for k in KS:
            hits = ranks.hits(k)
            assert np.all(lower[k] <= hits) and np.all(hits <= upper[k]), k
    # the reference is not vacuous here: ties leave some queries undecided
    assert any((lower[k] != upper[k]).any() for k in KS)


def test_exact_duplicate_is_a_neighbour_not_the_query():
    """Removing the query by distance would also drop its duplicate."""
    x = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0.9, 0.1], [0.5, 0.5, 0.7]], np.float32)
    y = np.array([7, 7, 3, 3, 3])
    ranks = retrieval_ranks(x, y, max_k=1)
    assert ranks.first_match_rank[:2].tolist() == [0, 0]
    sims, idx = knn_search(x, k=2)
    assert idx[0, 0] == 1 and idx[1, 0] == 0
    assert sims[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_self_never_returned_among_identical_points():
    """With many identical points faiss may not return the query itself among
    the k + 1 found; then the last one is dropped, never the query kept."""
    x = np.ones((12, 4), dtype=np.float32)
    for batch_size in (4096, 5):
        sims, idx = knn_search(x, k=3, batch_size=batch_size)
        own = np.arange(12)[:, None]
        assert not (idx == own).any()
        assert np.all((idx >= 0) & (idx < 12))
        assert np.all([len(set(row)) == 3 for row in idx.tolist()])
        np.testing.assert_allclose(sims, 1.0, atol=1e-6)


def test_when_self_is_not_among_the_hits_the_farthest_is_dropped(rng, monkeypatch):
    """Self can lose its place among the k + 1 hits (its own similarity rounds
    below near-duplicates'); the k nearest others must then be kept, in the
    search's order. A search that never returns the query stands in for faiss."""
    from pml_dsb.evaluation import _faiss_backend

    x, _ = clustered_data(rng, [10] * 4, dim=6, noise=1.0)
    full = normalize(x) @ normalize(x).T
    np.fill_diagonal(full, -np.inf)  # the stand-in's hits: the k + 1 best others
    order = np.argsort(-full, axis=1, kind="stable")

    def search_without_self(reference, device):
        def search(queries, k):
            rows = np.argmax(queries @ normalize(x).T, axis=1)  # each query's own row
            idx = order[rows, :k]
            return np.take_along_axis(full[rows], idx, 1).astype(np.float32), idx

        return search

    monkeypatch.setattr(_faiss_backend, "exact_ip_search", search_without_self)
    for batch_size in (4096, 7):
        sims, idx = knn_search(x, k=3, batch_size=batch_size)
        np.testing.assert_array_equal(idx, order[:, :3])
        np.testing.assert_allclose(sims, np.take_along_axis(full, order[:, :3], 1), atol=1e-6)


def test_knn_search_matches_brute_force_order(rng):
    x, _ = clustered_data(rng, [20] * 5, dim=10, noise=2.0)
    r, _ = clustered_data(rng, [25] * 5, dim=10, noise=2.0)
    sims, idx = knn_search(x, r, k=5, batch_size=13)
    full = normalize(x) @ normalize(r).T
    expected_idx = np.argsort(-full, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(idx, expected_idx)
    np.testing.assert_allclose(sims, np.take_along_axis(full, expected_idx, 1), atol=1e-5)


def test_lone_queries_excluded_and_counted(rng):
    x, y = clustered_data(rng, [12, 12, 1, 12, 1, 12], dim=8, noise=1.5)
    lower, upper, lone = brute_force_hits(x, y, ks=KS)
    assert lone.sum() == 2
    ranks = retrieval_ranks(x, y, max_k=8)
    assert np.array_equal(ranks.lone, lone)
    assert ranks.num_lone_queries == 2 and ranks.num_queries_evaluated == x.shape[0] - 2
    for k in KS:
        assert ranks.recall(k) == pytest.approx(_exact(lower, upper, k)[~lone].mean(), abs=1e-12)
    per_class = ranks.per_class_recall(1)
    assert set(per_class) == {0, 1, 3, 5}  # the singleton classes 2 and 4 are left out


def test_all_queries_lone_gives_nan():
    x = np.eye(4, dtype=np.float32)
    ranks = retrieval_ranks(x, [0, 1, 2, 3], max_k=1)
    assert ranks.num_lone_queries == 4 and np.isnan(ranks.recall(1))
    assert ranks.per_class_recall(1) == {}


def test_per_class_recall_matches_brute_force(random_set):
    x, y = random_set
    lower, upper, _ = brute_force_hits(x, y, ks=(2,))
    hits = _exact(lower, upper, 2)
    per_class = retrieval_ranks(x, y, max_k=2).per_class_recall(2)
    assert list(per_class) == sorted(per_class)
    for label in np.unique(y):
        assert per_class[int(label)] == pytest.approx(hits[y == label].mean(), abs=1e-12)
        assert isinstance(next(iter(per_class)), int)


def test_group_recall_matches_brute_force(rng):
    x, y = clustered_data(rng, [10] * 6, dim=8, noise=1.5)
    counts = {0: 500, 1: 101, 2: 100, 3: 20, 4: 19, 5: 1}
    lower, upper, _ = brute_force_hits(x, y, ks=(1, 4))
    ranks = retrieval_ranks(x, y, max_k=4)
    groups = ranks.group_recall((1, 4), counts)
    members = {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    for name, classes in members.items():
        sel = np.isin(y, classes)
        assert groups[name]["num_classes"] == 2
        assert groups[name]["num_queries_evaluated"] == sel.sum()
        for k in (1, 4):
            expected = _exact(lower, upper, k)[sel].mean()
            assert groups[name][f"recall_at_{k}"] == pytest.approx(expected, abs=1e-12)
    as_list = ranks.group_recall((1, 4), [counts[c] for c in range(6)])
    assert as_list == groups
    with pytest.raises(ValueError, match=r"train_counts has no count for 1 query labels \(5\)"):
        ranks.group_recall((1,), {c: 50 for c in range(5)})


def test_group_recall_leaves_lone_queries_out(rng):
    """A class whose single sample is a lone query counts neither among its
    group's classes nor its queries, and its miss does not lower the group's
    recall (brute force over the other queries)."""
    x, y = clustered_data(rng, [8, 1, 8, 1], dim=6, noise=1.5)
    lower, upper, lone = brute_force_hits(x, y, ks=(1, 2))
    assert np.array_equal(lone, np.isin(y, [1, 3]))  # precondition: the two singletons are lone
    groups = retrieval_ranks(x, y, max_k=2).group_recall((1, 2), {0: 500, 1: 300, 2: 10, 3: 5})
    for name, kept in (("many", 0), ("few", 2)):
        assert groups[name]["num_classes"] == 1
        assert groups[name]["num_queries_evaluated"] == 8
        for k in (1, 2):
            expected = _exact(lower, upper, k)[y == kept].mean()
            assert groups[name][f"recall_at_{k}"] == pytest.approx(expected, abs=1e-12)
    assert groups["medium"]["num_classes"] == 0 and np.isnan(groups["medium"]["recall_at_1"])


def test_group_without_queries_is_nan(rng):
    x, y = clustered_data(rng, [5, 5], dim=4)
    groups = retrieval_ranks(x, y, max_k=1).group_recall((1,), [500, 500])
    assert groups["many"]["num_queries_evaluated"] == 10
    assert np.isnan(groups["few"]["recall_at_1"]) and groups["few"]["num_classes"] == 0


def test_train_count_group_boundaries():
    assert [train_count_group(n) for n in (101, 100, 20, 19)] == ["many", "medium", "medium", "few"]


def test_helpers_on_hand_computed_cases():
    assert first_match_rank([1, 2], [[0, 1, 1], [0, 0, 0]]).tolist() == [1, 3]
    assert lone_query_mask([5, 6, 7], [5, 5, 6], ref_includes_query=False).tolist() == [False, False, True]
    assert lone_query_mask([5, 6], [5, 6, 5], ref_includes_query=True).tolist() == [False, True]


def test_torch_and_numpy_inputs_agree(random_set):
    x, y = random_set
    from_numpy = recall_at_k(x, y, ks=KS)
    from_torch = recall_at_k(torch.from_numpy(x).double(), torch.from_numpy(y), ks=KS)
    from_column = recall_at_k(torch.from_numpy(x), torch.from_numpy(y)[:, None], ks=KS)
    assert from_numpy == from_torch == from_column


def test_bfloat16_input_equals_its_float32_values(random_set):
    x, y = random_set
    bf16 = torch.from_numpy(x).bfloat16()
    assert recall_at_k(bf16, y, ks=KS) == recall_at_k(bf16.float(), y, ks=KS)


@pytest.mark.parametrize(
    "factor, dtype",
    # float64 beyond float32's range; float32 (and float64) whose squares
    # overflow or underflow float32 in the row norms
    [(1e39, np.float64), (1e-46, np.float64), (1e300, np.float64), (1.8e19, np.float64),
     (1e25, np.float32), (1e-25, np.float32)],
)
def test_large_or_small_magnitudes_give_the_same_recall(random_set, factor, dtype):
    # cosine retrieval is invariant to scale: values float32 cannot hold are
    # neither refused as infinite nor flushed to zero
    x, y = random_set
    scaled = (x.astype(np.float64) * factor).astype(dtype)
    assert np.isfinite(scaled).all()
    assert recall_at_k(scaled, y, ks=KS) == recall_at_k(x, y, ks=KS)
    ref = np.concatenate([scaled, scaled[:20] * 4.0])  # a larger maximum than the query's
    labels = np.concatenate([y, y[:20]])
    ranks = retrieval_ranks(scaled, y, ref, labels, max_k=1, ref_includes_query=True)
    assert ranks.recall(1) == retrieval_ranks(x, y, np.concatenate([x, x[:20] * 4.0]), labels, max_k=1,
                                              ref_includes_query=True).recall(1)


def test_inputs_are_not_modified(random_set):
    x, y = random_set
    t = torch.from_numpy(x.copy())
    recall_at_k(t, y, ks=(1,))
    assert torch.equal(t, torch.from_numpy(x))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(query_labels=np.arange(9) % 2), r"query_labels has 9 labels but query has 10 rows"),
        (dict(reference=np.ones((4, 3)), reference_labels=[0, 1, 0]),
         r"reference_labels has 3 labels but reference has 4 rows"),
        (dict(reference=np.ones((4, 5)), reference_labels=[0, 1, 0, 1]),
         r"reference has dimension 5 but query has dimension 3"),
        (dict(query=np.full((10, 3), np.nan)), r"query contains 30 NaN or infinite values in 10 rows"),
        (dict(reference=np.array([[np.inf, 0, 0]] * 4), reference_labels=[0, 1, 0, 1]),
         r"reference contains 4 NaN or infinite"),
        (dict(ks=(1, 10)), r"ks asks for k=10 neighbours but the reference set offers only 9 "
                           r"\(the query itself excluded\); expected k <= 9"),
        (dict(query_labels=np.zeros(10, int)), r"hold a single class \(0\); expected at least 2 classes"),
        (dict(query=np.zeros((0, 3)), query_labels=[]), r"query is empty \(shape \(0, 3\)\)"),
        (dict(query=np.zeros(10)), r"query must have shape \(N, d\), got shape \(10,\)"),
        (dict(ks=()), r"ks is empty"),
        (dict(ks=(0, 1)), r"ks must hold positive ints, got \(0, 1\)"),
        (dict(reference=np.ones((4, 3))), r"reference was given without reference_labels"),
        (dict(query_labels=np.r_[0.0, np.nan, np.zeros(8)]), r"query_labels contains NaN"),
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
    rng = np.random.default_rng(0)
    args = dict(query=rng.standard_normal((10, 3)), query_labels=np.arange(10) % 2,
                reference=None, reference_labels=None, ks=(1,))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        recall_at_k(**args)


def test_k_larger_than_separate_reference():
    with pytest.raises(ValueError, match=r"k=5 neighbours but the reference set offers only 4; expected k <= 4"):
        knn_search(np.ones((2, 3)), np.eye(4, 3), k=5)


def test_ranks_refuse_k_beyond_the_neighbours_searched(random_set):
    """A query with no match among the max_k searched has rank max_k: Recall@(max_k + 1)
    is unknown (it would count every such miss as a hit), so it is refused."""
    x, y = random_set
    ranks = retrieval_ranks(x, y, max_k=2)
    lower, upper, _ = brute_force_hits(x, y, ks=(2,))
    assert ranks.recall(2) == pytest.approx(_exact(lower, upper, 2).mean(), abs=1e-12)
    assert ranks.recall(2) < 1.0  # precondition: some queries miss within 2
    for read in (ranks.hits, ranks.recall, ranks.per_class_recall, lambda k: ranks.group_recall((k,), [50] * 10)):
        with pytest.raises(ValueError, match=r"k=3 exceeds the 2 neighbours searched; expected k <= 2"):
            read(3)


def test_ref_includes_query_requires_the_prefix(rng):
    q = rng.standard_normal((5, 3))
    with pytest.raises(ValueError, match=r"first len\(query\)=5 rows of reference"):
        retrieval_ranks(q, np.arange(5) % 2, q[::-1].copy(), np.arange(5) % 2, max_k=1, ref_includes_query=True)
    # the rows match but the labels do not: refused too (the query's own row would carry another label)
    reference, reference_labels = np.concatenate([q, q[:2]]), np.array([1, 0, 1, 0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"first len\(query_labels\) entries of reference_labels"):
        retrieval_ranks(q, np.arange(5) % 2, reference, reference_labels, max_k=1, ref_includes_query=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_input_matches_cpu(random_set):
    x, y = random_set
    cpu = recall_at_k(x, y, ks=KS)
    gpu = recall_at_k(torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda(), ks=KS)
    assert cpu == gpu


def test_helpers_refuse_inputs_they_would_misread():
    cases = [
        # a (1, k) neighbour block broadcast over the 3 queries; 1-D raised IndexError
        (lambda: first_match_rank([0, 1, 2], [[0, 1]]), "neighbor_labels must have shape (Nq, k) with Nq = 3"),
        (lambda: first_match_rank([0], [0, 1]), "neighbor_labels must have shape (Nq, k)"),
        (lambda: lone_query_mask(None, [0, 1], ref_includes_query=False), "got None"),
        (lambda: lone_query_mask([0], [0, 1], ref_includes_query="no"), "ref_includes_query must be True or False"),
        # -5 and NaN were "few"
        (lambda: train_count_group(-5), "count must be a whole number >= 0, got -5"),
        (lambda: train_count_group(float("nan")), "count must be a whole number >= 0, got nan"),
    ]
    for call, words in cases:
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        assert words in str(info.value)
    assert train_count_group(np.int64(101)) == "many" and train_count_group(20.0) == "medium"
