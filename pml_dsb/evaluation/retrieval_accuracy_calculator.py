"""Recall@K and NMI as a pytorch-metric-learning ``AccuracyCalculator``.

``RetrievalAccuracyCalculator`` plugs into ``testers.GlobalEmbeddingSpaceTester``
and ``logging_presets.HookContainer(record_keeper, primary_metric="recall_at_1")``
unchanged::

    from pytorch_metric_learning import testers
    from pml_dsb.evaluation import RetrievalAccuracyCalculator

    calc = RetrievalAccuracyCalculator(recall_ks=(1, 2, 4, 8))
    tester = testers.GlobalEmbeddingSpaceTester(accuracy_calculator=calc)

Metrics (the keys of ``get_accuracy``'s result):

* ``recall_at_<k>`` for every k in ``recall_ks``: Recall@k, lone queries left
  out (see :mod:`pml_dsb.evaluation.retrieval_metrics`); ``recall_at_1``
  equals PML's ``precision_at_1`` on L2-normalised embeddings (as PML's
  testers pass them by default). Neighbours here are always by cosine
  similarity; PML's own ``AccuracyCalculator`` searches raw embeddings by
  L2 distance, so on unnormalised embeddings the two can differ.
* ``NMI``: faiss k-means, ``nredo`` restarts, fixed ``nmi_seed``
  (see :mod:`pml_dsb.evaluation.clustering_metrics`).
* ``num_lone_queries``: how many queries were left out of Recall@K.
* with ``train_counts``: ``recall_at_<k>_many``, ``recall_at_<k>_medium``,
  ``recall_at_<k>_few``, Recall@k pooled over the queries of the classes
  with > 100, 20..100 and < 20 training samples (NaN for an empty group).

``include`` / ``exclude`` select among these. PML's other metrics (mean average
precision, r-precision, ...) are not offered: they need as many neighbours as
the largest class has samples (``k="max_bin_count"``), or all N with PML's
default ``k=None``, the O(N^2) cost that this class avoids; use PML's
``AccuracyCalculator`` for them. ``return_per_class=True`` turns every ``recall_at_<k>`` into a list, one
entry per class with an evaluated query in increasing label order (PML's
convention); ``avg_of_avgs=True`` averages the per-class values instead of the
queries. All Recall@K values come from one exact kNN search with
k = the largest K requested.

Unlike PML's calculator, ``device=None`` does not move anything to CUDA: the
computation follows the input (GPU faiss for CUDA tensors when faiss has GPU
support).
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from pml_dsb import _optional
from pml_dsb._device import resolve_device

from . import _checks
from .clustering_metrics import kmeans_cluster_labels, nmi_from_clusters
from .retrieval_metrics import (
    DEFAULT_QUERY_BATCH_SIZE,
    GROUP_NAMES,
    RetrievalRanks,
    knn_search,
    lone_query_mask,
    retrieval_ranks,
)

__all__ = ["RetrievalAccuracyCalculator"]

logger = logging.getLogger(__name__)


def _to_torch(x: Any, device: torch.device | None) -> Any:
    if device is None:
        return x
    return c_f.numpy_to_torch(x).to(device)


def _labels_numpy(labels: Any, name: str = "query_labels") -> np.ndarray:
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return arr.reshape(arr.shape[0], -1)[:, 0] if arr.ndim == 2 and arr.shape[1] == 1 else arr


def _pml_knn(query, k, reference=None, ref_includes_query=False, *, batch_size):
    """PML's ``knn_func`` protocol on :func:`knn_search`: (similarities, indices)."""
    device = query.device if isinstance(query, torch.Tensor) else torch.device("cpu")
    sims, idx = knn_search(query, reference, k, ref_includes_query=ref_includes_query, batch_size=batch_size)
    return torch.from_numpy(sims).to(device), torch.from_numpy(idx).to(device)


def _pml_kmeans(x, num_clusters, *, seed, nredo, niter):
    """PML's ``kmeans_func`` protocol on :func:`kmeans_cluster_labels`."""
    device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    labels = kmeans_cluster_labels(x, num_clusters, seed=seed, nredo=nredo, niter=niter)
    return torch.from_numpy(labels).to(device)


class RetrievalAccuracyCalculator(AccuracyCalculator):
    """PML ``AccuracyCalculator`` computing Recall@K (faiss exact kNN) and NMI.

    Args:
        recall_ks: the K of the ``recall_at_<k>`` metrics.
        include, exclude: metric names to compute / to skip (default: all of
            this class's metrics).
        avg_of_avgs: average Recall@K over classes instead of queries.
        return_per_class: return every ``recall_at_<k>`` as a per-class list.
        train_counts: training samples per class (mapping label -> count or a
            sequence indexed by label); adds the many / medium / few metrics.
        nmi_seed, nredo, niter: faiss k-means seed, restarts and iterations.
        batch_size: queries per faiss search call (memory O(batch_size * k)).
        device: move inputs to this device first; None: leave them where they are.

    >>> import numpy as np
    >>> x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    >>> calc = RetrievalAccuracyCalculator(recall_ks=(1, 2))
    >>> calc.get_accuracy(x, np.array([0, 0, 1, 1]))
    {'NMI': 1.0, 'num_lone_queries': 0, 'recall_at_1': 1.0, 'recall_at_2': 1.0}
    """

    def __init__(
        self,
        recall_ks: Sequence[int] = (1, 2, 4, 8),
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        avg_of_avgs: bool = False,
        return_per_class: bool = False,
        train_counts: Any = None,
        nmi_seed: int = 0,
        nredo: int = 10,
        niter: int = 20,
        batch_size: int = DEFAULT_QUERY_BATCH_SIZE,
        device: torch.device | str | None = None,
    ):
        _optional.faiss()  # a missing faiss fails here, with the pip command
        self.recall_ks = _checks.check_ks(recall_ks, "recall_ks")
        self.train_counts = None if train_counts is None else _checks.as_count_mapping(train_counts)
        self.nmi_seed = _checks.check_int(nmi_seed, "nmi_seed", 0, _checks.MAX_FAISS_SEED)
        self.nredo = _checks.check_int(nredo, "nredo", 1)
        self.niter = _checks.check_int(niter, "niter", 1)
        self.batch_size = _checks.check_int(batch_size, "batch_size", 1)

        # metric name -> the K its kNN search needs; PML discovers metrics as
        # the attributes named calculate_<metric>, so add one per K (and group).
        self._metric_k: dict[str, int] = {}
        for k in self.recall_ks:
            self._add_metric(f"recall_at_{k}", functools.partial(self._recall, k=k), k)
            if self.train_counts is not None:
                for group in GROUP_NAMES:
                    self._add_metric(
                        f"recall_at_{k}_{group}", functools.partial(self._group_recall, k=k, group=group), k
                    )
        self._supported = sorted([*self._metric_k, "NMI", "num_lone_queries"])
        self._check_metric_names(include, exclude, self._supported)

        super().__init__(
            include=tuple(include),
            exclude=tuple(exclude),
            avg_of_avgs=avg_of_avgs,
            return_per_class=return_per_class,
            k=None,
            device=torch.device("cpu"),
            knn_func=functools.partial(_pml_knn, batch_size=self.batch_size),
            kmeans_func=functools.partial(_pml_kmeans, seed=self.nmi_seed, nredo=self.nredo, niter=self.niter),
        )
        # PML also found its own calculate_* methods: keep only ours.
        self.original_function_dict = {
            name: fn for name, fn in self.original_function_dict.items() if name in self._supported
        }
        self.curr_function_dict = self.get_function_dict()
        self.device = None if device is None else resolve_device(device)  # here, not at the first batch

    # ---------------------------------------------------------------- metrics
    def _add_metric(self, name: str, fn, k: int) -> None:
        setattr(self, f"calculate_{name}", fn)
        self._metric_k[name] = k

    def requires_knn(self) -> list[str]:
        """The metrics PML must run a k-NN search for (every Recall@K)."""
        return list(self._metric_k)

    def requires_clustering(self) -> list[str]:
        """The metrics PML must cluster the queries for."""
        return ["NMI"]

    def _recall(self, ranks: RetrievalRanks, k: int, **kwargs):
        if self.return_per_class:
            if ranks.num_queries_evaluated == 0:  # PML: one NaN per class
                return [float("nan")] * int(np.unique(ranks.query_labels).size)
            return list(ranks.per_class_recall(k).values())
        if self.avg_of_avgs:
            per_class = list(ranks.per_class_recall(k).values())
            return float(np.mean(per_class)) if per_class else float("nan")
        return ranks.recall(k)

    def _group_recall(self, ranks: RetrievalRanks, k: int, group: str, **kwargs) -> float:
        return ranks.group_recall((k,), self.train_counts)[group][f"recall_at_{k}"]

    def calculate_NMI(self, query_labels, cluster_labels, **kwargs) -> float:
        """sklearn's NMI of the labels against the k-means clusters (DEFINITIONS)."""
        return nmi_from_clusters(_labels_numpy(query_labels), _labels_numpy(cluster_labels))

    def calculate_num_lone_queries(self, lone_query_mask, **kwargs) -> int:
        """Queries left out of Recall@K: no other sample of their label in the reference set."""
        return int(np.asarray(lone_query_mask).sum())

    def get_cluster_labels(self, query, query_labels, **kwargs):
        """Seeded faiss k-means on the L2-normalised queries, k = number of distinct labels."""
        labels = _labels_numpy(query_labels)
        num_classes = int(np.unique(labels).size)
        if num_classes < 2:
            found = f"a single class ({_checks.scalar(labels[0])!r})" if labels.size else "no labels"
            raise ValueError(f"query_labels hold {found}; NMI needs at least 2 classes to cluster into")
        return kmeans_cluster_labels(query, num_classes, seed=self.nmi_seed, nredo=self.nredo, niter=self.niter)

    # -------------------------------------------------------------- interface
    @staticmethod
    def _check_metric_names(include, exclude, supported) -> None:
        for arg_name, names in (("include", include), ("exclude", exclude)):
            if not isinstance(names, (tuple, list)):
                raise TypeError(f"{arg_name} must be a tuple or list of metric names, got {names!r}")
            unknown = [m for m in names if m not in supported]
            if unknown:
                raise ValueError(
                    f"{arg_name} names unsupported metrics {unknown}; expected a subset of {supported}"
                )

    def get_accuracy(
        self,
        query,
        query_labels,
        reference=None,
        reference_labels=None,
        ref_includes_query=False,
        include=(),
        exclude=(),
    ) -> dict:
        """The selected metrics for ``query`` against ``reference``.

        Same signature and conventions as PML: ``reference=None`` evaluates the
        query set against itself (leave-one-out); ``ref_includes_query=True``
        says that the first ``len(query)`` references are the queries.
        """
        self._check_metric_names(include, exclude, list(self.original_function_dict))
        if reference is None:
            if reference_labels is not None:
                raise ValueError("reference_labels was given without reference; expected both or neither")
            reference, reference_labels, ref_includes_query = query, query_labels, True
        elif reference_labels is None:
            raise ValueError("reference was given without reference_labels; expected both or neither")
        query, query_labels, reference, reference_labels = (
            _to_torch(x, self.device) for x in (query, query_labels, reference, reference_labels)
        )
        self.curr_function_dict = self.get_function_dict(include, exclude)
        metrics = self.get_curr_metrics()
        kwargs = {
            "query": query,
            "reference": reference,
            "query_labels": query_labels,
            "reference_labels": reference_labels,
            "ref_includes_query": ref_includes_query,
            "label_comparison_fn": self.label_comparison_fn,
        }
        knn_metrics = [m for m in metrics if m in self._metric_k]
        if knn_metrics:
            # the leave-one-out shortcut; with ref_includes_query=False a query
            # passed again as reference must find itself, as in PML
            same = reference is query and reference_labels is query_labels and ref_includes_query
            ranks = retrieval_ranks(
                query,
                query_labels,
                None if same else reference,
                None if same else reference_labels,
                max(self._metric_k[m] for m in knn_metrics),
                ref_includes_query=ref_includes_query,
                batch_size=self.batch_size,
                k_name="recall_ks",
            )
            kwargs["ranks"] = ranks
            kwargs["lone_query_mask"] = ranks.lone
        elif "num_lone_queries" in metrics:
            # the checks that retrieval_ranks makes for the other metrics
            for emb, lab, name in ((query, query_labels, "query"), (reference, reference_labels, "reference")):
                rows = _checks.as_embeddings(emb, name)
                _checks.as_labels(lab, f"{name}_labels", len(rows), name)
            kwargs["lone_query_mask"] = lone_query_mask(
                _labels_numpy(query_labels), _labels_numpy(reference_labels), ref_includes_query=ref_includes_query
            )
        if any(m in self.requires_clustering() for m in metrics):
            kwargs["cluster_labels"] = self.get_cluster_labels(**kwargs)
        return self._get_accuracy(self.curr_function_dict, **kwargs)
