"""Semantic scale imbalance of a dataset or a run, beside its count imbalance.

The count imbalance factor is ``max n_c / min n_c``; the scale imbalance
ratio is ``max S_c / min S_c`` over the classes that have a scale
(``S_c > 0``; S = 0 means "no scale yet", as in docs/DEFINITIONS.md: fewer
than two samples, or samples with no spread). The classes with a scale are ranked by scale, rank 1 the
smallest (the class the paper expects the model to be weakest on), beside
their rank by count among them, with the Spearman correlation of the two
rankings. Classes without a scale are listed last, unranked: a 0 ranked or
correlated as a value would pass for the smallest scale.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from .correlation import spearman

__all__ = ["imbalance_summary"]


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, smallest first, ties broken by position (stable)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[order] = np.arange(1, len(values) + 1)
    return ranks


def imbalance_summary(
    scales,
    counts,
    classes: Optional[Sequence] = None,
) -> dict:
    """Per-class scales and counts, the two imbalance ratios, and the ranking.

    Args:
        scales: (C,) semantic scale of each class (bits); 0 means no scale.
        counts: (C,) samples per class behind each scale.
        classes: (C,) class names or labels; default ``0..C-1``.

    Returns a dict: ``scale_ratio`` (max/min over classes with ``S > 0``),
    ``count_imbalance_factor`` (max/min over classes with samples),
    ``scale_count_spearman`` (over the classes with a scale), ``num_classes``,
    ``num_without_scale`` and ``classes``: one row per class, those with a
    scale sorted by it (smallest first), then those without, with ``class``,
    ``count``, ``scale``, ``scale_rank`` and ``count_rank`` (both among the
    classes with a scale; None for a class without one).

    >>> out = imbalance_summary([2.0, 1.0, 4.0], [10, 50, 100], classes=["a", "b", "c"])
    >>> out["scale_ratio"], out["count_imbalance_factor"]
    (4.0, 10.0)
    >>> [(r["class"], r["scale_rank"], r["count_rank"]) for r in out["classes"]]
    [('b', 1, 2), ('a', 2, 1), ('c', 3, 3)]
    """
    s = np.asarray(scales, dtype=np.float64).reshape(-1)
    n = np.asarray(counts, dtype=np.float64).reshape(-1)
    if s.shape != n.shape or len(s) == 0:
        raise ValueError(f"scales and counts must both have shape (C,) with C >= 1, got {s.shape} and {n.shape}")
    if not (np.isfinite(s).all() and np.isfinite(n).all()) or (s < 0).any() or (n < 0).any():
        raise ValueError("scales and counts must be finite and non-negative")
    names = list(range(len(s))) if classes is None else list(classes)
    if len(names) != len(s):
        raise ValueError(f"classes has {len(names)} entries, scales {len(s)}")
    has = s > 0
    pos = n > 0
    ranked = np.flatnonzero(has)
    scale_rank = dict(zip(ranked.tolist(), _ranks(s[ranked]).tolist()))
    count_rank = dict(zip(ranked.tolist(), _ranks(n[ranked]).tolist()))
    order = ranked[np.argsort(s[ranked], kind="stable")].tolist() + np.flatnonzero(~has).tolist()
    rows = [
        {
            "class": names[i],
            "count": int(n[i]) if float(n[i]).is_integer() else float(n[i]),
            "scale": float(s[i]),
            "scale_rank": scale_rank.get(i),
            "count_rank": count_rank.get(i),
        }
        for i in order
    ]
    rho = float(spearman(s[has], n[has])) if has.sum() >= 2 else math.nan
    return {
        "num_classes": int(len(s)),
        "num_without_scale": int((~has).sum()),
        "scale_ratio": float(s[has].max() / s[has].min()) if has.any() else math.nan,
        "count_imbalance_factor": float(n[pos].max() / n[pos].min()) if pos.any() else math.nan,
        "scale_count_spearman": rho,
        "classes": rows,
    }
