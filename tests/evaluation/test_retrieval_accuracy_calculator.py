"""RetrievalAccuracyCalculator against PML's AccuracyCalculator and our pure functions."""
from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch
from pytorch_metric_learning import testers
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from evaluation_testlib import brute_force_hits, clustered_data
from pml_dsb.evaluation import RetrievalAccuracyCalculator, evaluate_embeddings

CPU = torch.device("cpu")


@pytest.fixture
def rng():
    return np.random.default_rng(3)


@pytest.fixture
def data(rng):
    """Normalised overlapping blobs with two singleton (lone) classes."""
    x, y = clustered_data(rng, [20, 20, 1, 20, 20, 1, 20, 20], dim=16, noise=1.5)
    x = torch.nn.functional.normalize(torch.from_numpy(x))
    return x, torch.from_numpy(y)


def pml_p_at_1(x, y, ref=None, ref_y=None, ref_includes_query=False, **kwargs):
    calc = AccuracyCalculator(include=("precision_at_1",), k=8, device=CPU, **kwargs)
    return calc.get_accuracy(x, y, ref, ref_y, ref_includes_query)["precision_at_1"]


def test_metric_keys_and_defaults(data):
    x, y = data
    calc = RetrievalAccuracyCalculator()
    out = calc.get_accuracy(x, y)
    assert set(out) == {"recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "NMI", "num_lone_queries"}
    assert out["num_lone_queries"] == 2
    assert all(isinstance(out[k], float) for k in out if k != "num_lone_queries")
    assert out["recall_at_1"] <= out["recall_at_2"] <= out["recall_at_4"] <= out["recall_at_8"]
    assert calc.get_curr_metrics() == sorted(out)
    assert calc.recall_ks == (1, 2, 4, 8)


def test_recall_at_1_equals_pml_precision_at_1_leave_one_out(data):
    x, y = data
    ours = RetrievalAccuracyCalculator(recall_ks=(1,)).get_accuracy(x, y)["recall_at_1"]
    assert 0.2 < ours < 0.95
    assert ours == pytest.approx(pml_p_at_1(x, y), abs=1e-12)


def test_recall_at_1_equals_pml_with_separate_reference(rng, data):
    x, y = data
    r, ry = clustered_data(rng, [15] * 8, dim=16, noise=1.5)
    r = torch.nn.functional.normalize(torch.from_numpy(r))
    ry = torch.from_numpy(ry)
    ours = RetrievalAccuracyCalculator(recall_ks=(1,)).get_accuracy(x, y, r, ry)["recall_at_1"]
    assert ours == pytest.approx(pml_p_at_1(x, y, r, ry), abs=1e-12)
    # the tester's convention: reference = query followed by another split
    both, both_y = torch.cat([x, r]), torch.cat([y, ry])
    ours = RetrievalAccuracyCalculator(recall_ks=(1,)).get_accuracy(x, y, both, both_y, True)["recall_at_1"]
    assert ours == pytest.approx(pml_p_at_1(x, y, both, both_y, True), abs=1e-12)


def test_per_class_and_avg_of_avgs_equal_pml(data):
    x, y = data
    ours = RetrievalAccuracyCalculator(recall_ks=(1,), return_per_class=True).get_accuracy(x, y)
    pml = pml_p_at_1(x, y, return_per_class=True)
    assert len(ours["recall_at_1"]) == len(pml) == 6  # the two lone classes are left out
    np.testing.assert_allclose(ours["recall_at_1"], pml, atol=1e-12)
    assert isinstance(ours["NMI"], float)
    ours = RetrievalAccuracyCalculator(recall_ks=(1,), avg_of_avgs=True).get_accuracy(x, y)["recall_at_1"]
    assert ours == pytest.approx(pml_p_at_1(x, y, avg_of_avgs=True), abs=1e-12)


def test_matches_brute_force_at_every_k(data):
    x, y = data
    lower, upper, lone = brute_force_hits(x.numpy(), y.numpy(), ks=(1, 2, 4, 8))
    out = RetrievalAccuracyCalculator(include=("recall_at_2", "recall_at_8")).get_accuracy(x, y)
    assert set(out) == {"recall_at_2", "recall_at_8"}
    for k in (2, 8):
        assert np.array_equal(lower[k], upper[k])
        assert out[f"recall_at_{k}"] == pytest.approx(lower[k][~lone].mean(), abs=1e-12)


def test_agrees_with_evaluate_embeddings_including_groups(data):
    x, y = data
    counts = {c: n for c, n in zip(range(8), [500, 150, 3, 60, 20, 1, 19, 100])}
    calc = RetrievalAccuracyCalculator(recall_ks=(1, 4), train_counts=counts, nmi_seed=2, nredo=3)
    out = calc.get_accuracy(x, y)
    ref = evaluate_embeddings(x, y, recall_ks=(1, 4), nmi_seed=2, nredo=3, train_counts=counts)
    for key in ("recall_at_1", "recall_at_4", "NMI", "num_lone_queries"):
        assert out[key] == ref[key], key
    for group in ("many", "medium", "few"):
        for k in (1, 4):
            assert out[f"recall_at_{k}_{group}"] == pytest.approx(ref["groups"][group][f"recall_at_{k}"], nan_ok=True)


def test_nmi_only_skips_the_search(data, monkeypatch):
    from pml_dsb.evaluation import retrieval_accuracy_calculator as module

    def no_search(*args, **kwargs):
        raise AssertionError("kNN search run although no recall metric was requested")

    monkeypatch.setattr(module, "retrieval_ranks", no_search)
    x, y = data
    out = RetrievalAccuracyCalculator(include=("NMI", "num_lone_queries")).get_accuracy(x, y)
    assert set(out) == {"NMI", "num_lone_queries"} and out["num_lone_queries"] == 2


def test_inside_pml_tester(data):
    """GlobalEmbeddingSpaceTester uses it unchanged, keys get PML's level suffix."""
    x, y = data
    dataset = torch.utils.data.TensorDataset(x * 3.0, y)  # the tester normalises
    tester = testers.GlobalEmbeddingSpaceTester(
        accuracy_calculator=RetrievalAccuracyCalculator(recall_ks=(1, 2)),
        dataloader_num_workers=0, batch_size=64, data_device=CPU,
    )
    acc = tester.test({"val": dataset}, 1, torch.nn.Identity())["val"]
    expected = evaluate_embeddings(x, y, recall_ks=(1, 2))
    assert acc["recall_at_1_level0"] == pytest.approx(expected["recall_at_1"], abs=1e-12)
    assert acc["recall_at_2_level0"] == pytest.approx(expected["recall_at_2"], abs=1e-12)
    assert acc["NMI_level0"] == pytest.approx(expected["NMI"], abs=1e-12)
    assert acc["num_lone_queries_level0"] == 2


def test_unsupported_metrics_are_refused():
    with pytest.raises(ValueError, match=r"include names unsupported metrics \['mean_average_precision'\]"):
        RetrievalAccuracyCalculator(include=("mean_average_precision",))
    with pytest.raises(ValueError, match=r"exclude names unsupported metrics \['recall_at_3'\]"):
        RetrievalAccuracyCalculator(exclude=("recall_at_3",))
    with pytest.raises(TypeError, match=r"include must be a tuple or list"):
        RetrievalAccuracyCalculator(include="NMI")
    with pytest.raises(ValueError, match=r"recall_ks must hold positive ints, got \(0,\)"):
        RetrievalAccuracyCalculator(recall_ks=(0,))
    calc = RetrievalAccuracyCalculator(include=("recall_at_1",))
    with pytest.raises(ValueError, match=r"include names unsupported metrics \['NMI'\]"):
        calc.get_accuracy(np.eye(3), [0, 1, 1], include=("NMI",))


def test_query_passed_again_as_reference_finds_itself(data):
    # ref_includes_query=False: each query is in the reference set and is its
    # own nearest neighbour, as in PML, whether or not the tensor is the same object
    x, y = data
    calc = RetrievalAccuracyCalculator(recall_ks=(1,), include=("recall_at_1",))
    same_object = calc.get_accuracy(x, y, x, y)["recall_at_1"]
    assert same_object == calc.get_accuracy(x, y, x.clone(), y.clone())["recall_at_1"] == 1.0
    assert same_object == pytest.approx(pml_p_at_1(x, y, x, y), abs=1e-12)
    assert calc.get_accuracy(x, y, x, y, True)["recall_at_1"] == calc.get_accuracy(x, y)["recall_at_1"] < 1.0


@pytest.mark.parametrize("kwargs", [{}, {"device": "cpu"}, {"include": ("num_lone_queries",)}])
def test_reference_without_labels_is_refused_first(data, kwargs):
    x, y = data
    calc = RetrievalAccuracyCalculator(recall_ks=(1,), **{k: v for k, v in kwargs.items() if k == "device"})
    with pytest.raises(ValueError, match=r"reference was given without reference_labels; expected both or neither"):
        calc.get_accuracy(x, y, x, include=kwargs.get("include", ()))


def test_bad_input_raises(data):
    x, y = data
    calc = RetrievalAccuracyCalculator(recall_ks=(1, 200))
    with pytest.raises(ValueError, match=r"recall_ks asks for k=200 neighbours .* expected k <= 121"):
        calc.get_accuracy(x, y)
    calc = RetrievalAccuracyCalculator(recall_ks=(1,))
    with pytest.raises(ValueError, match=r"query_labels has 121 labels but query has 122 rows"):
        calc.get_accuracy(x, y[:-1])
    with pytest.raises(ValueError, match=r"single class"):
        calc.get_accuracy(x, torch.zeros_like(y))
    with pytest.raises(ValueError, match=r"query contains 16 NaN or infinite values in 1 rows"):
        calc.get_accuracy(torch.cat([x, torch.full((1, 16), float("nan"))]), torch.cat([y, y[:1]]))
    with pytest.raises(ValueError, match=r"query is empty"):
        calc.get_accuracy(torch.zeros(0, 16), torch.zeros(0))
    with pytest.raises(ValueError, match=r"query_labels hold a single class .* NMI needs"):
        RetrievalAccuracyCalculator(include=("NMI",)).get_accuracy(x, torch.zeros_like(y))


def test_missing_faiss_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ModuleNotFoundError,
                       match=r"pip install faiss-cpu  \(or faiss-gpu; the extra \"pml-dsb\[cpu\]\""):
        RetrievalAccuracyCalculator()


def test_device_and_lone_query_inputs_are_checked_up_front():
    # a device this machine lacks failed at the first get_accuracy, inside torch
    with pytest.raises(ValueError, match="device 'cuda:99'"):
        RetrievalAccuracyCalculator(device="cuda:99")
    with pytest.raises(ValueError, match="device 'gpu' is not a torch device"):
        RetrievalAccuracyCalculator(device="gpu")
    # num_lone_queries alone skipped the checks the other metrics make
    calc = RetrievalAccuracyCalculator(include=("num_lone_queries",))
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="query_labels has 2 labels but query has 5 rows"):
        calc.get_accuracy(x, np.array([0, 1]))
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        calc.get_accuracy(x, np.arange(5))


def test_the_search_asks_only_for_the_k_of_the_selected_metrics():
    """With recall_at_8 excluded, a set of 4 samples (3 others per query) is
    searched for 1 neighbour: asking for 8 raised "k=8 neighbours"."""
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    y = np.array([0, 0, 1, 1])
    calc = RetrievalAccuracyCalculator(recall_ks=(1, 8), exclude=("recall_at_8",))
    assert calc.get_accuracy(x, y) == {"NMI": 1.0, "num_lone_queries": 0, "recall_at_1": 1.0}
    calc = RetrievalAccuracyCalculator(recall_ks=(1, 8))
    assert calc.get_accuracy(x, y, include=("recall_at_1",)) == {"recall_at_1": 1.0}
    with pytest.raises(ValueError, match=r"recall_ks asks for k=8 neighbours"):
        calc.get_accuracy(x, y)


def test_gpu_faiss_only_when_it_has_a_gpu(monkeypatch, caplog):
    """The CUDA input's device is used when faiss has GPU support and at least
    one GPU; else CPU faiss, said once (a stand-in for faiss)."""
    import logging
    import types

    from pml_dsb.evaluation import _faiss_backend

    def fake(num_gpus, gpu_build=True):
        module = types.SimpleNamespace(get_num_gpus=lambda: num_gpus)
        if gpu_build:
            module.StandardGpuResources = object
        return module

    monkeypatch.setattr(_faiss_backend, "_warned_no_gpu", False)
    monkeypatch.setattr(_faiss_backend, "faiss", lambda: fake(1))
    assert _faiss_backend.gpu_device(None) is None
    assert _faiss_backend.gpu_device(0) == 0 and _faiss_backend.gpu_device(3) == 3
    assert not caplog.records
    for module in (fake(0), fake(2, gpu_build=False)):
        monkeypatch.setattr(_faiss_backend, "faiss", lambda: module)
        with caplog.at_level(logging.INFO, logger=_faiss_backend.__name__):
            assert _faiss_backend.gpu_device(0) is None and _faiss_backend.gpu_device(1) is None
    assert [r.getMessage() for r in caplog.records if "no GPU support" in r.getMessage()] == [
        "input is on CUDA but the installed faiss has no GPU support; using CPU faiss "
        "(install faiss-gpu for GPU search)"]


@pytest.mark.parametrize("device", [3.5, [0]])
def test_a_device_of_the_wrong_type_is_a_value_error_naming_it(device):
    with pytest.raises(ValueError, match=rf"device {re.escape(repr(device))} is not a torch device"):
        RetrievalAccuracyCalculator(device=device)


def test_a_broken_faiss_install_is_named_with_the_pip_command(tmp_path, monkeypatch):
    """An install whose import fails with a plain ImportError (a missing shared
    library, say) gets the same message as a missing one, with the cause."""
    (tmp_path / "faiss.py").write_text('raise ImportError("libfaiss.so: cannot open shared object file")\n')
    monkeypatch.delitem(sys.modules, "faiss", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match=r"'faiss' is required for nearest-neighbour search and k-means "
                                                  r"but could not be imported \(libfaiss.so: cannot open.*"
                                                  r"Install it with: pip install faiss-cpu"):
        RetrievalAccuracyCalculator()


def test_a_missing_module_without_an_extra_names_its_top_level_package():
    from pml_dsb import _optional

    with pytest.raises(ModuleNotFoundError, match=r"'no_such_pkg_q7\.sub\.mod' is required for testing .*"
                                                  r"Install it with: pip install no_such_pkg_q7$"):
        _optional.require("no_such_pkg_q7.sub.mod", "testing")


def test_reference_labels_without_reference_are_refused(data):
    x, y = data
    calc = RetrievalAccuracyCalculator(recall_ks=(1,))
    with pytest.raises(ValueError, match=r"reference_labels was given without reference; expected both or neither"):
        calc.get_accuracy(x, y, None, y)


@pytest.mark.parametrize("kwargs", [{}, {"return_per_class": True}, {"avg_of_avgs": True}])
def test_every_query_lone_gives_nan_like_pml(kwargs):
    """Three singleton classes: no query has a same-label neighbour. PML
    gives NaN, one NaN per class with return_per_class."""
    x, y = torch.eye(3), torch.tensor([0, 1, 2])
    calc = RetrievalAccuracyCalculator(recall_ks=(1,), include=("recall_at_1",), **kwargs)
    ours = calc.get_accuracy(x, y)["recall_at_1"]
    pml = AccuracyCalculator(include=("precision_at_1",), k=2, device=CPU, **kwargs).get_accuracy(x, y)
    np.testing.assert_array_equal(ours, pml["precision_at_1"])  # NaN equals NaN here
    assert np.shape(ours) == ((3,) if kwargs.get("return_per_class") else ())


def test_no_clustering_without_nmi(data, monkeypatch):
    from pml_dsb.evaluation import retrieval_accuracy_calculator as module

    def no_kmeans(*args, **kwargs):
        raise AssertionError("k-means run although NMI was not requested")

    monkeypatch.setattr(module, "kmeans_cluster_labels", no_kmeans)
    x, y = data
    out = RetrievalAccuracyCalculator(recall_ks=(1,), exclude=("NMI",)).get_accuracy(x, y)
    assert set(out) == {"recall_at_1", "num_lone_queries"}
    assert out["recall_at_1"] == pytest.approx(pml_p_at_1(x, y), abs=1e-12)


def test_knn_func_follows_pmls_protocol(data):
    """calc.knn_func(query, k, reference, ref_includes_query) -> (similarities,
    indices), as PML's FaissKNN: the query's own row skipped only with
    ref_includes_query=True; checked against a brute-force sort."""
    x, _ = data
    calc = RetrievalAccuracyCalculator(recall_ks=(1,))
    q = x[:10]
    sims = q.double().numpy() @ x.double().numpy().T
    for ref_includes_query in (False, True):
        s = sims.copy()
        if ref_includes_query:
            s[np.arange(10), np.arange(10)] = -np.inf
        want = np.argsort(-s, axis=1, kind="stable")[:, :3]
        got_sims, got_idx = calc.knn_func(q, 3, x, ref_includes_query)
        assert isinstance(got_idx, torch.Tensor) and got_idx.shape == (10, 3)
        np.testing.assert_array_equal(got_idx.numpy(), want)
        np.testing.assert_allclose(got_sims.numpy(), np.take_along_axis(s, want, axis=1), atol=1e-5)
    assert (calc.knn_func(q, 1, x, False)[1][:, 0].numpy() == np.arange(10)).all()


def test_kmeans_func_gets_the_seed_restarts_and_iterations(data, monkeypatch):
    from pml_dsb.evaluation import retrieval_accuracy_calculator as module

    seen = []

    def record(x, k, **kwargs):
        seen.append((k, kwargs))
        return np.zeros(len(x), dtype=np.int64)

    monkeypatch.setattr(module, "kmeans_cluster_labels", record)
    x, _ = data
    calc = RetrievalAccuracyCalculator(nmi_seed=5, nredo=2, niter=7)
    assert calc.kmeans_func(x, 8).tolist() == [0] * len(x)
    assert seen == [(8, {"seed": 5, "nredo": 2, "niter": 7})]
