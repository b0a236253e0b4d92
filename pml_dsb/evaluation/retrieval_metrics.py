r"""Recall@K from one exact k-nearest-neighbour search (faiss, inner product).

Definitions (``docs/DEFINITIONS.md``, "Retrieval metrics"):

* Embeddings are L2-normalised, :math:`\hat x = x / \max(\lVert x\rVert_2, 10^{-12})`
  (a zero vector stays zero), and the similarity of a query :math:`q` and a
  reference :math:`r` is the cosine :math:`s(q, r) = \hat q^\top \hat r`.
* :math:`\mathcal N_K(q)` are the K references of largest similarity to
  :math:`q`, **the query itself excluded**. It is excluded by *index*, not by
  similarity, so an exact duplicate of the query (similarity 1, like the query
  itself) stays a neighbour.
* A query is *lone* when no reference other than itself has its label; lone
  queries are left out of every mean and counted.
* Recall@K over the set :math:`Q` of queries that are not lone:

  .. math::

      \mathrm{R@K} = \frac{1}{|Q|} \sum_{q \in Q}
          \mathbb 1\big[\exists\, r \in \mathcal N_K(q):\ y_r = y_q\big].

  Recall@1 equals pytorch-metric-learning's ``precision_at_1``.
* Per-class Recall@K: the same mean over the queries of one class.
* Groups by training count :math:`n_c` (long-tailed training sets):
  many (:math:`n_c > 100`), medium (:math:`20 \le n_c \le 100`),
  few (:math:`n_c < 20`); a group's Recall@K pools the queries of its classes.

One search with :math:`k = \max K` (plus one slot for the query itself when the
reference set contains the queries) gives every K at once; it is faiss' exact
inner-product search (``faiss.knn``, the kernel of ``IndexFlatIP``, which
reads the reference set in place). Queries are searched
in batches of ``batch_size`` and only each query's rank of the first correct
neighbour is kept, so memory is :math:`O(N k)` on top of the normalised
embeddings, never :math:`O(N^2)`. Ties in similarity are broken the way faiss
breaks them. The search runs on GPU faiss when the query is a CUDA tensor and
faiss has GPU support, on CPU faiss otherwise.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _checks, _faiss_backend

__all__ = [
    "DEFAULT_QUERY_BATCH_SIZE",
    "GROUP_NAMES",
    "RetrievalRanks",
    "knn_search",
    "lone_query_mask",
    "first_match_rank",
    "retrieval_ranks",
    "recall_at_k",
    "train_count_group",
]

logger = logging.getLogger(__name__)

#: queries per faiss search call: bounds the per-call buffers to batch x k.
DEFAULT_QUERY_BATCH_SIZE = 4096
#: the long-tail groups, in order.
GROUP_NAMES = ("many", "medium", "few")


def train_count_group(count: int) -> str:
    """The long-tail group of a class with ``count`` training samples.

    many: count > 100; medium: 20 <= count <= 100; few: count < 20.

    >>> [train_count_group(n) for n in (500, 101, 100, 20, 19, 0)]
    ['many', 'many', 'medium', 'medium', 'few', 'few']
    """
    try:
        value = float(count)  # ints, numpy and torch scalars
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(count, (bool, np.bool_)) or not value.is_integer() or value < 0:  # NaN and inf: not integers
        raise ValueError(f"count must be a whole number >= 0, got {count!r}")  # -5 and NaN read as "few"
    if count > 100:
        return "many"
    if count >= 20:
        return "medium"
    return "few"


def _prepare(
    query: Any,
    reference: Any,
    ref_includes_query: bool,
) -> tuple[np.ndarray, np.ndarray, bool, int | None]:
    """Normalised float32 query and reference, the effective flag, the faiss GPU."""
    q_raw = _checks.as_embeddings(query, "query")
    device = _faiss_backend.gpu_device(_checks.cuda_index(query))
    if reference is None:
        q = _checks.l2_normalize(q_raw)
        return q, q, True, device
    r_raw = _checks.as_embeddings(reference, "reference")
    if r_raw.shape[1] != q_raw.shape[1]:
        raise ValueError(
            f"reference has dimension {r_raw.shape[1]} but query has dimension "
            f"{q_raw.shape[1]}; expected equal dimensions"
        )
    q = _checks.l2_normalize(q_raw)
    r = _checks.l2_normalize(r_raw)
    if ref_includes_query:
        n = q_raw.shape[0]
        # compared as the unit rows that are searched (the raw arrays may have
        # been rescaled by different powers of two: see as_embeddings)
        if r_raw.shape[0] < n or not np.allclose(q, r[:n], rtol=1e-5, atol=1e-6):
            raise ValueError(
                f"ref_includes_query=True requires the first len(query)={n} rows of "
                f"reference (which has {r_raw.shape[0]} rows) to equal query"
            )
        if r_raw.shape[0] == n:  # reference is a copy of query: one normalised copy
            return q, q, True, device
    return q, r, bool(ref_includes_query), device


def _search_batches(
    q: np.ndarray,
    r: np.ndarray,
    k: int,
    ref_includes_query: bool,
    batch_size: int,
    device: int | None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (start, similarities (B, k), indices (B, k)) with the query removed."""
    search_k = k + int(ref_includes_query)
    if device is not None and search_k > _faiss_backend.GPU_MAX_K:
        logger.warning(
            "k=%d exceeds faiss' GPU limit of %d neighbours: searching on CPU",
            search_k, _faiss_backend.GPU_MAX_K,
        )
        device = None
    search = _faiss_backend.exact_ip_search(r, device)
    try:
        for start in range(0, q.shape[0], batch_size):
            sims, idx = search(q[start:start + batch_size], search_k)
            if ref_includes_query:
                rows = idx.shape[0]
                own = np.arange(start, start + rows)[:, None]
                drop = idx == own
                # Self not among the k+1 found (it can lose a tie to exact
                # duplicates): the k+1 are all others, so drop the last one.
                drop[~drop.any(axis=1), -1] = True
                keep = ~drop
                sims = sims[keep].reshape(rows, k)
                idx = idx[keep].reshape(rows, k)
            yield start, sims, idx
    finally:
        del search  # frees a GPU index's copy of the reference set


def knn_search(
    query: Any,
    reference: Any = None,
    k: int = 1,
    *,
    ref_includes_query: bool = False,
    batch_size: int = DEFAULT_QUERY_BATCH_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of each query by cosine similarity.

    Args:
        query: (Nq, d) embeddings (numpy array or torch tensor, any float dtype).
        reference: (Nr, d) embeddings to search; None: the query set itself,
            leave-one-out (each query's own row is never its neighbour).
        k: neighbours per query, at most Nr (Nr - 1 when the reference
            contains the queries).
        ref_includes_query: the first Nq rows of ``reference`` are the queries;
            query i's own row i is removed from its neighbours, by index.
        batch_size: queries per faiss search call.

    Returns:
        ``(similarities, indices)``, (Nq, k) float32 cosine similarities in
        decreasing order and (Nq, k) int64 row indices into the reference set.

    >>> import numpy as np
    >>> x = np.array([[1, 0], [1, 0], [0.6, 0.8], [0, 1]], dtype=np.float32)
    >>> sims, idx = knn_search(x, k=1)   # row 1 duplicates row 0: still found
    >>> idx[:, 0].tolist()
    [1, 0, 3, 2]
    >>> [round(float(s), 2) for s in sims[:, 0]]
    [1.0, 1.0, 0.8, 0.8]
    """
    k = _checks.check_int(k, "k", 1)
    batch_size = _checks.check_int(batch_size, "batch_size", 1)
    q, r, ref_includes_query, device = _prepare(query, reference, ref_includes_query)
    _checks.check_k_fits(k, r.shape[0], ref_includes_query, "k")
    all_sims = np.empty((q.shape[0], k), dtype=np.float32)
    all_idx = np.empty((q.shape[0], k), dtype=np.int64)
    for start, sims, idx in _search_batches(q, r, k, ref_includes_query, batch_size, device):
        all_sims[start:start + sims.shape[0]] = sims
        all_idx[start:start + idx.shape[0]] = idx
    return all_sims, all_idx


def lone_query_mask(
    query_labels: Any,
    reference_labels: Any,
    *,
    ref_includes_query: bool,
) -> np.ndarray:
    """Which queries have no reference of their label other than themselves.

    >>> lone_query_mask([0, 0, 1], [0, 0, 1], ref_includes_query=True).tolist()
    [False, False, True]
    >>> lone_query_mask([0, 2], [0, 1, 1], ref_includes_query=False).tolist()
    [False, True]
    """
    if query_labels is None or reference_labels is None:
        raise ValueError("query_labels and reference_labels must be sequences of labels, got None")
    if not isinstance(ref_includes_query, (bool, np.bool_)):
        raise TypeError(f"ref_includes_query must be True or False, got {ref_includes_query!r}")
    ql = np.asarray(query_labels).reshape(-1)
    rl = np.asarray(reference_labels).reshape(-1)
    uniq, counts = np.unique(rl, return_counts=True)
    pos = np.clip(np.searchsorted(uniq, ql), 0, max(uniq.size - 1, 0))
    present = uniq[pos] == ql if uniq.size else np.zeros(ql.shape, dtype=bool)
    others = np.where(present, counts[pos] if uniq.size else 0, 0) - int(ref_includes_query)
    return others <= 0


def first_match_rank(query_labels: Any, neighbor_labels: Any) -> np.ndarray:
    """0-based rank of each query's first neighbour with the query's label.

    ``neighbor_labels`` is (Nq, k), nearest first; a query with no match among
    its k neighbours gets rank k. Recall@K is then the mean of ``rank < K``.

    >>> first_match_rank([0, 1, 2], [[0, 1], [0, 1], [0, 1]]).tolist()
    [0, 1, 2]
    """
    ql = np.asarray(query_labels).reshape(-1)
    nl = np.asarray(neighbor_labels)
    if nl.ndim != 2 or nl.shape[0] != ql.shape[0]:  # (1, k) would broadcast over queries silently
        raise ValueError(
            f"neighbor_labels must have shape (Nq, k) with Nq = {ql.shape[0]} queries, got shape {nl.shape}"
        )
    match = nl == ql[:, None]
    return np.where(match.any(axis=1), match.argmax(axis=1), nl.shape[1]).astype(np.int64)


@dataclass(frozen=True)
class RetrievalRanks:
    """The outcome of one kNN search, enough for Recall@K at every K <= max_k.

    Attributes:
        query_labels: (Nq,) the query labels as given.
        first_match_rank: (Nq,) int64, 0-based rank of the first neighbour
            sharing the query's label; ``max_k`` when none of the ``max_k``
            nearest does.
        lone: (Nq,) bool, queries whose label no other reference has.
        max_k: the number of neighbours searched (the query itself excluded).
    """

    query_labels: np.ndarray
    first_match_rank: np.ndarray
    lone: np.ndarray
    max_k: int

    @property
    def num_queries(self) -> int:
        return int(self.query_labels.shape[0])

    @property
    def num_lone_queries(self) -> int:
        return int(self.lone.sum())

    @property
    def num_queries_evaluated(self) -> int:
        return self.num_queries - self.num_lone_queries

    def _check_k(self, k: int) -> int:
        k = _checks.check_int(k, "k", 1)
        if k > self.max_k:
            raise ValueError(f"k={k} exceeds the {self.max_k} neighbours searched; expected k <= {self.max_k}")
        return k

    def hits(self, k: int) -> np.ndarray:
        """(Nq,) bool: a same-label reference is among the k nearest."""
        return self.first_match_rank < self._check_k(k)

    def recall(self, k: int) -> float:
        """Recall@k over the queries that are not lone (NaN if there are none)."""
        hits = self.hits(k)[~self.lone]
        return float(hits.mean()) if hits.size else float("nan")

    def per_class_recall(self, k: int) -> dict:
        """{label: Recall@k over that class's queries}, for every class with a
        query that is not lone, in increasing label order."""
        hits = self.hits(k)[~self.lone]
        labels = self.query_labels[~self.lone]
        uniq, codes = np.unique(labels, return_inverse=True)
        sums = np.bincount(codes, weights=hits, minlength=uniq.size)
        counts = np.bincount(codes, minlength=uniq.size)
        return {_checks.scalar(u): float(s / c) for u, s, c in zip(uniq, sums, counts)}

    def group_recall(self, ks: Sequence[int], train_counts: Any) -> dict:
        """Recall@k pooled over the queries of the many / medium / few classes.

        Args:
            ks: the K values.
            train_counts: training samples per class: a mapping label -> count
                or a sequence indexed by label. Every query label must have one.

        Returns:
            ``{"many": {"recall_at_<k>": float, ..., "num_classes": int,
            "num_queries_evaluated": int}, "medium": ..., "few": ...}``; a group
            without evaluated queries has NaN recalls and zero counts.
        """
        ks = _checks.check_ks(ks, "ks")
        counts = _checks.as_count_mapping(train_counts)
        uniq, codes = np.unique(self.query_labels, return_inverse=True)
        missing = [_checks.scalar(u) for u in uniq if _checks.scalar(u) not in counts]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise ValueError(
                f"train_counts has no count for {len(missing)} query labels ({shown}); "
                "expected a training count for every query label"
            )
        class_group = np.array([train_count_group(counts[_checks.scalar(u)]) for u in uniq])
        query_group = class_group[codes]
        out = {}
        for g in GROUP_NAMES:
            sel = (query_group == g) & ~self.lone
            entry = {}
            for k in ks:
                h = self.hits(k)[sel]
                entry[f"recall_at_{k}"] = float(h.mean()) if h.size else float("nan")
            entry["num_classes"] = int(np.unique(codes[sel]).size)
            entry["num_queries_evaluated"] = int(sel.sum())
            out[g] = entry
        return out


def retrieval_ranks(
    query: Any,
    query_labels: Any,
    reference: Any = None,
    reference_labels: Any = None,
    max_k: int = 8,
    *,
    ref_includes_query: bool = False,
    batch_size: int = DEFAULT_QUERY_BATCH_SIZE,
    k_name: str = "max_k",
) -> RetrievalRanks:
    """Search the ``max_k`` nearest references of every query, keep the ranks.

    Args:
        query, query_labels: (Nq, d) embeddings and (Nq,) labels.
        reference, reference_labels: (Nr, d) and (Nr,); None for both: the
            query set is its own reference, leave-one-out.
        max_k: neighbours to search (the query itself excluded).
        ref_includes_query: the first Nq references are the queries (PML's
            tester convention); each query's own row is excluded by index.
        batch_size: queries per faiss search call.
        k_name: the argument name that error messages give for ``max_k``.

    Raises:
        ValueError: empty input, mismatched lengths or dimensions, NaN or
            infinite embeddings, a single class overall, or ``max_k`` larger
            than the reference set.

    >>> import numpy as np
    >>> x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.7, 0.7]])
    >>> ranks = retrieval_ranks(x, [0, 0, 1, 1, 2], max_k=2)
    >>> ranks.first_match_rank.tolist(), ranks.lone.tolist()
    ([0, 0, 0, 0, 2], [False, False, False, False, True])
    >>> ranks.recall(1), ranks.num_lone_queries
    (1.0, 1)
    """
    max_k = _checks.check_int(max_k, k_name, 1)
    batch_size = _checks.check_int(batch_size, "batch_size", 1)
    if reference is None and reference_labels is not None:
        raise ValueError("reference_labels was given without reference; expected both or neither")
    if reference is not None and reference_labels is None:
        raise ValueError("reference was given without reference_labels; expected both or neither")
    q, r, ref_includes_query, device = _prepare(query, reference, ref_includes_query)
    ql = _checks.as_labels(query_labels, "query_labels", q.shape[0], "query")
    if reference is None:
        rl = ql
    else:
        rl = _checks.as_labels(reference_labels, "reference_labels", r.shape[0], "reference")
        if ref_includes_query and not np.array_equal(ql, rl[: ql.shape[0]]):
            raise ValueError(
                "ref_includes_query=True requires the first len(query_labels) entries of "
                "reference_labels to equal query_labels"
            )
    classes = np.unique(np.concatenate([np.unique(ql), np.unique(rl)]))
    if classes.size < 2:
        raise ValueError(
            f"query_labels and reference_labels hold a single class ({_checks.scalar(classes[0])!r}); "
            "expected at least 2 classes (with one class every neighbour matches)"
        )
    _checks.check_k_fits(max_k, r.shape[0], ref_includes_query, k_name)

    lone = lone_query_mask(ql, rl, ref_includes_query=ref_includes_query)
    ranks = np.empty(q.shape[0], dtype=np.int64)
    for start, _, idx in _search_batches(q, r, max_k, ref_includes_query, batch_size, device):
        stop = start + idx.shape[0]
        ranks[start:stop] = first_match_rank(ql[start:stop], rl[idx])
    result = RetrievalRanks(query_labels=ql, first_match_rank=ranks, lone=lone, max_k=max_k)
    if result.num_queries_evaluated == 0:
        logger.warning("every query is lone (no other reference has its label): recall is NaN")
    elif result.num_lone_queries:
        logger.info("%d lone queries left out of Recall@K", result.num_lone_queries)
    return result


def recall_at_k(
    query: Any,
    query_labels: Any,
    reference: Any = None,
    reference_labels: Any = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    ref_includes_query: bool = False,
    batch_size: int = DEFAULT_QUERY_BATCH_SIZE,
) -> dict[int, float]:
    """Recall@K for every K in ``ks`` from one search; {K: recall}.

    Lone queries are left out (:func:`retrieval_ranks` counts them). See the
    module docstring for the definition.

    >>> import numpy as np
    >>> angles = np.deg2rad([0, 20, 30, 90])   # points on the unit circle
    >>> x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    >>> recall_at_k(x, [0, 0, 1, 1], ks=(1, 2, 3))
    {1: 0.5, 2: 0.75, 3: 1.0}
    """
    ks = _checks.check_ks(ks, "ks")
    ranks = retrieval_ranks(
        query, query_labels, reference, reference_labels, max(ks),
        ref_includes_query=ref_includes_query, batch_size=batch_size, k_name="ks",
    )
    return {k: ranks.recall(k) for k in ks}

