"""One call for a training runner: Recall@K, per-class and grouped Recall@K, NMI.

:func:`evaluate_embeddings` returns a plain ``dict`` (JSON-serialisable: keys
are ``str``, except the labels of the per-class dicts, which are the labels'
Python scalars):

============================== ==================================================
key                            value
============================== ==================================================
``recall_at_<k>``              float, Recall@k for every k in ``recall_ks``
``NMI``                        float (only when ``nmi=True``)
``nmi_seed``, ``nredo``        int, the k-means seed and restarts (with NMI)
``num_queries``                int, all queries
``num_queries_evaluated``      int, queries in the Recall@K means
``num_lone_queries``           int, queries left out: no other reference has
                               their label
``per_class_recall_at_<k>``    {label: float}, for every class with an
                               evaluated query, in increasing label order
``groups``                     only with ``train_counts``:
                               ``{"many" | "medium" | "few": {"recall_at_<k>":
                               float, "num_classes": int,
                               "num_queries_evaluated": int}}``
============================== ==================================================

Definitions: :mod:`pml_dsb.evaluation.retrieval_metrics` and
:mod:`pml_dsb.evaluation.clustering_metrics`. NMI clusters every query, lone
ones included (as pytorch-metric-learning does).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import _checks
from .clustering_metrics import nmi as _nmi
from .retrieval_metrics import DEFAULT_QUERY_BATCH_SIZE, retrieval_ranks

__all__ = ["evaluate_embeddings"]


def evaluate_embeddings(
    query: Any,
    query_labels: Any,
    reference: Any = None,
    reference_labels: Any = None,
    recall_ks: Sequence[int] = (1, 2, 4, 8),
    nmi: bool = True,
    nmi_seed: int = 0,
    nredo: int = 10,
    train_counts: Any = None,
    *,
    ref_includes_query: bool = False,
    niter: int = 20,
    batch_size: int = DEFAULT_QUERY_BATCH_SIZE,
) -> dict:
    """Recall@K (one exact kNN search), per-class and grouped Recall@K, and NMI.

    Args:
        query, query_labels: (Nq, d) embeddings (numpy or torch, any device)
            and (Nq,) labels.
        reference, reference_labels: (Nr, d) and (Nr,); None for both (the
            default, the paper's protocol): the query set is its own
            reference, each query's own row excluded.
        recall_ks: the K of Recall@K; max K must not exceed the reference set
            (minus the query itself).
        nmi: also cluster the queries and report NMI.
        nmi_seed, nredo, niter: faiss k-means seed, restarts, iterations.
        train_counts: training samples per class (mapping label -> count or a
            sequence indexed by label); adds the many/medium/few ``groups``.
        ref_includes_query: the first Nq references are the queries.
        batch_size: queries per faiss search call.

    Returns:
        The dict described in the module docstring.

    Raises:
        ValueError: empty input, mismatched lengths or dimensions, NaN or
            infinite embeddings, a single class, max K larger than the
            reference set, a query label missing from ``train_counts``.

    >>> import numpy as np
    >>> x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.7, 0.7]])
    >>> out = evaluate_embeddings(x, [0, 0, 1, 1, 2], recall_ks=(1, 2))
    >>> out["recall_at_1"], out["NMI"] > 0.5, out["num_lone_queries"]
    (1.0, True, 1)
    >>> out["per_class_recall_at_1"]
    {0: 1.0, 1: 1.0}
    """
    ks = _checks.check_ks(recall_ks, "recall_ks")
    if nmi:  # fail before the search, not after it
        _checks.check_int(nmi_seed, "nmi_seed", 0, _checks.MAX_FAISS_SEED)
        _checks.check_int(nredo, "nredo", 1)
        _checks.check_int(niter, "niter", 1)
    if train_counts is not None:
        train_counts = _checks.as_count_mapping(train_counts)
    ranks = retrieval_ranks(
        query, query_labels, reference, reference_labels, max(ks),
        ref_includes_query=ref_includes_query, batch_size=batch_size, k_name="recall_ks",
    )
    out: dict = {f"recall_at_{k}": ranks.recall(k) for k in ks}
    if nmi:
        out["NMI"] = _nmi(query, query_labels, seed=nmi_seed, nredo=nredo, niter=niter)
        out["nmi_seed"] = int(nmi_seed)
        out["nredo"] = int(nredo)
    out["num_queries"] = ranks.num_queries
    out["num_queries_evaluated"] = ranks.num_queries_evaluated
    out["num_lone_queries"] = ranks.num_lone_queries
    for k in ks:
        out[f"per_class_recall_at_{k}"] = ranks.per_class_recall(k)
    if train_counts is not None:
        out["groups"] = ranks.group_recall(ks, train_counts)
    return out
