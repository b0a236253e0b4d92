r"""NMI of a k-means clustering of the embeddings against the labels.

Definition (``docs/DEFINITIONS.md``, "Retrieval metrics"): the embeddings are
L2-normalised, clustered by faiss k-means (Euclidean, seeded) into
:math:`C` = number of distinct labels clusters, and

.. math::

    \mathrm{NMI}(Y, \Omega) = \frac{I(Y; \Omega)}{\tfrac12\,[H(Y) + H(\Omega)]}

with :math:`Y` the labels, :math:`\Omega` the cluster assignment, :math:`I`
their mutual information and :math:`H` the entropy; this is
``sklearn.metrics.normalized_mutual_info_score`` with its default arithmetic
mean.

k-means keeps the best of ``nredo`` restarts (lowest within-cluster sum of
squares), each of ``niter`` Lloyd iterations (20, as in pytorch-metric-learning;
its NMI uses one restart). More restarts reach better optima and vary less,
but still vary: on the training embeddings of the seed-0 NSM and DSB-ST models
of ``pml-dsb bench`` (digits), NMI over 12 seeds had a standard deviation of
0.042 / 0.043 with one restart and 0.024 / 0.032 with 10 (means 0.82 -> 0.87,
0.77 -> 0.81), hence ``nredo=10`` by default; differences of a few hundredths
between two NMIs can be the clustering's seed alone.
Every point is used (faiss' subsampling above 256 points per centroid is
turned off). A fixed ``seed`` gives the same clustering within one process on
one thread; faiss has reached different optima for identical inputs in two
processes, so report NMI with its ``seed`` and ``nredo``. The clustering runs
on GPU faiss when the embeddings are a CUDA tensor and faiss has GPU support.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from . import _checks, _faiss_backend

__all__ = ["kmeans_cluster_labels", "nmi", "nmi_from_clusters"]

logger = logging.getLogger(__name__)


def kmeans_cluster_labels(
    embeddings: Any,
    num_clusters: int,
    *,
    seed: int = 0,
    nredo: int = 10,
    niter: int = 20,
    normalize: bool = True,
) -> np.ndarray:
    """Cluster index (0..num_clusters-1) of each embedding by faiss k-means.

    Args:
        embeddings: (N, d) array or tensor; L2-normalised first unless
            ``normalize=False``.
        num_clusters: k, at most N.
        seed: faiss' k-means seed (restart j uses a seed derived from it).
        nredo: restarts; the one of lowest objective is kept.
        niter: Lloyd iterations per restart.

    Returns:
        (N,) int64 cluster indices.

    >>> import numpy as np
    >>> x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    >>> c = kmeans_cluster_labels(x, 2, seed=0)
    >>> bool(c[0] == c[1] and c[2] == c[3] and c[0] != c[2])
    True
    """
    x = _checks.as_embeddings(embeddings, "embeddings")
    num_clusters = _checks.check_int(num_clusters, "num_clusters", 1)
    seed = _checks.check_int(seed, "seed", 0, _checks.MAX_FAISS_SEED)
    nredo = _checks.check_int(nredo, "nredo", 1)
    niter = _checks.check_int(niter, "niter", 1)
    n, d = x.shape
    if num_clusters > n:
        raise ValueError(
            f"num_clusters={num_clusters} exceeds the {n} embeddings; expected num_clusters <= {n}"
        )
    if normalize:
        x = _checks.l2_normalize(x)
    device = _faiss_backend.gpu_device(_checks.cuda_index(embeddings))
    fa = _faiss_backend.faiss()
    kwargs = dict(
        niter=niter,
        nredo=nredo,
        seed=seed,
        verbose=False,
        # use every point: no subsampling, no "too few points" warning on stderr
        max_points_per_centroid=max(256, math.ceil(n / num_clusters) + 1),
        min_points_per_centroid=1,
    )
    if device is not None:
        kwargs["gpu"] = 1
    km = fa.Kmeans(d, num_clusters, **kwargs)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign.reshape(-1).astype(np.int64)


def nmi_from_clusters(labels: Any, cluster_labels: Any) -> float:
    """NMI (arithmetic normalisation) of a given clustering against the labels.

    >>> nmi_from_clusters([0, 0, 1, 1], [5, 5, 7, 7])
    1.0
    >>> round(nmi_from_clusters([0, 0, 1, 1], [0, 1, 0, 1]), 6)
    0.0
    """
    from sklearn.metrics import normalized_mutual_info_score

    if labels is None or cluster_labels is None:  # np.asarray(None) is one "label": NMI 1.0
        raise ValueError("labels and cluster_labels must be sequences of labels, got None")
    y = np.asarray(labels).reshape(-1)
    c = np.asarray(cluster_labels).reshape(-1)
    if y.size == 0:
        raise ValueError("labels is empty; expected at least one label")
    for name, values in (("labels", y), ("cluster_labels", c)):
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    if y.shape != c.shape:
        raise ValueError(
            f"labels has {y.size} entries but cluster_labels has {c.size}; expected equal lengths"
        )
    return float(normalized_mutual_info_score(y, c))


def nmi(
    embeddings: Any,
    labels: Any,
    *,
    seed: int = 0,
    nredo: int = 10,
    niter: int = 20,
) -> float:
    """NMI of faiss k-means (k = number of distinct labels) against the labels.

    Raises:
        ValueError: empty input, NaN or infinite embeddings, mismatched
            lengths, or fewer than two distinct labels.

    >>> import numpy as np
    >>> x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    >>> nmi(x, [3, 3, 8, 8])
    1.0
    """
    x = _checks.as_embeddings(embeddings, "embeddings")
    y = _checks.as_labels(labels, "labels", x.shape[0], "embeddings")
    num_classes = int(np.unique(y).size)
    if num_classes < 2:
        raise ValueError(
            f"labels hold a single class ({_checks.scalar(y[0])!r}); NMI needs at "
            "least 2 classes to cluster into"
        )
    if isinstance(embeddings, np.ndarray) or _checks.cuda_index(embeddings) is None:
        source = x
    else:
        source = embeddings  # keep the CUDA tensor so k-means can run on GPU faiss
    clusters = kmeans_cluster_labels(source, num_classes, seed=seed, nredo=nredo, niter=niter)
    return nmi_from_clusters(y, clusters)
