"""Independent references for the evaluation tests (plain numpy, no faiss).

Everything here is written from the definitions, not from the code under
test: a brute-force kNN over the full similarity matrix (small N only) that
handles ties by giving the best and the worst case, and NMI from a
contingency table.
"""
from __future__ import annotations

import numpy as np


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def brute_force_hits(query, query_labels, reference=None, reference_labels=None,
                     ks=(1,), ref_includes_query=False, tie_tol=1e-5):
    """Per-query hit@K bounds and lone mask by brute force.

    Returns ``(lower, upper, lone)``: ``lower[k]`` / ``upper[k]`` are (Nq,)
    bools, whether a same-label reference is among the K nearest (the query's
    own row excluded by index) under the least / most favourable ordering of
    references whose similarity is within ``tie_tol`` of the K-th largest.
    Without ties, lower == upper.
    """
    q = normalize(query)
    ql = np.asarray(query_labels).reshape(-1)
    if reference is None:
        r, rl, ref_includes_query = q, ql, True
    else:
        r, rl = normalize(reference), np.asarray(reference_labels).reshape(-1)
    sims = q @ r.T
    n = q.shape[0]
    valid = np.ones_like(sims, dtype=bool)
    if ref_includes_query:
        valid[np.arange(n), np.arange(n)] = False
    lower = {k: np.zeros(n, dtype=bool) for k in ks}
    upper = {k: np.zeros(n, dtype=bool) for k in ks}
    lone = np.zeros(n, dtype=bool)
    for i in range(n):
        s = sims[i][valid[i]]
        lab = rl[valid[i]]
        match = lab == ql[i]
        lone[i] = not match.any()
        order = np.sort(s)[::-1]
        for k in ks:
            t = order[k - 1]
            above = s > t + tie_tol
            tied = np.abs(s - t) <= tie_tol
            need = k - above.sum()  # picks still to make among the tied
            hit_above = (above & match).any()
            tied_match = (tied & match).sum()
            tied_other = (tied & ~match).sum()
            upper[k][i] = hit_above or tied_match > 0
            lower[k][i] = hit_above or tied_other < need
    return lower, upper, lone


def clustered_data(rng, n_per_class, dim, noise=0.6, dtype=np.float32):
    """Gaussian blobs around random unit centres; labels 0..C-1, shuffled."""
    n_per_class = np.asarray(n_per_class)
    centers = normalize(rng.standard_normal((n_per_class.size, dim)))
    labels = np.repeat(np.arange(n_per_class.size), n_per_class)
    x = centers[labels] + noise * rng.standard_normal((labels.size, dim)) / np.sqrt(dim)
    perm = rng.permutation(labels.size)
    return x[perm].astype(dtype), labels[perm]


def numpy_nmi(labels, clusters):
    """NMI with the arithmetic-mean normalisation, from the contingency table."""
    _, y = np.unique(labels, return_inverse=True)
    _, c = np.unique(clusters, return_inverse=True)
    n = y.size
    table = np.zeros((y.max() + 1, c.max() + 1))
    np.add.at(table, (y, c), 1.0)
    p = table / n
    py, pc = p.sum(1), p.sum(0)
    nz = p > 0
    mi = (p[nz] * np.log(p[nz] / np.outer(py, pc)[nz])).sum()
    hy = -(py[py > 0] * np.log(py[py > 0])).sum()
    hc = -(pc[pc > 0] * np.log(pc[pc > 0])).sum()
    if hy == 0 and hc == 0:
        return 1.0
    return float(mi / (0.5 * (hy + hc)))


def spy_on_kmeans(monkeypatch) -> dict:
    """Replace faiss.Kmeans by a subclass that records its arguments (and k)
    into the returned dict, for the test's duration."""
    from pml_dsb.evaluation import _faiss_backend

    faiss = _faiss_backend.faiss()
    seen = {}
    original = faiss.Kmeans

    class SpyKmeans(original):
        def __init__(self, d, k, **kwargs):
            seen.update(kwargs, k=k)
            super().__init__(d, k, **kwargs)

    monkeypatch.setattr(faiss, "Kmeans", SpyKmeans)
    return seen
