"""Retrieval evaluation: Recall@K and NMI with faiss, inside PML's testers and hooks.

* :mod:`~pml_dsb.evaluation.retrieval_metrics`: exact kNN (faiss
  ``IndexFlatIP`` on L2-normalised embeddings, batched queries, the query
  itself removed by index) and Recall@K, per class and by long-tail group.
* :mod:`~pml_dsb.evaluation.clustering_metrics`: NMI of seeded faiss k-means
  with ``nredo`` restarts.
* :func:`evaluate_embeddings`: all of the above in one plain ``dict``.
* :class:`RetrievalAccuracyCalculator`: the same as a PML ``AccuracyCalculator``
  (metric keys ``recall_at_<k>``, ``NMI``).
* :func:`make_retrieval_hooks`: PML tester + record-keeper + ``HookContainer``
  with ``recall_at_1`` as the primary metric.

faiss, record-keeper and tensorboard are imported when first needed, through
:mod:`pml_dsb._optional`.
"""
from .clustering_metrics import kmeans_cluster_labels, nmi, nmi_from_clusters
from .evaluate_embeddings import evaluate_embeddings
from .hooks import RetrievalHooks, make_retrieval_hooks
from .retrieval_accuracy_calculator import RetrievalAccuracyCalculator
from .retrieval_metrics import (
    DEFAULT_QUERY_BATCH_SIZE,
    GROUP_NAMES,
    RetrievalRanks,
    first_match_rank,
    knn_search,
    lone_query_mask,
    recall_at_k,
    retrieval_ranks,
    train_count_group,
)

__all__ = [
    "RetrievalAccuracyCalculator",
    "evaluate_embeddings",
    "make_retrieval_hooks",
    "RetrievalHooks",
    "knn_search",
    "retrieval_ranks",
    "RetrievalRanks",
    "recall_at_k",
    "lone_query_mask",
    "first_match_rank",
    "train_count_group",
    "GROUP_NAMES",
    "DEFAULT_QUERY_BATCH_SIZE",
    "kmeans_cluster_labels",
    "nmi",
    "nmi_from_clusters",
]
