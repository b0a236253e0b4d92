r"""Marginal effect of semantic scale: how a class's scale grows with its sample count.

For one class with ``n`` samples and each subset size ``m`` of a grid
(``2 .. n`` by default), the curve holds the mean and standard deviation of
:math:`S` (``pml_dsb.semantic_scale``, in bits) over ``r`` random subsets of
size ``m`` (docs/DEFINITIONS.md, "Marginal effect curve"). The subsets are
*nested*: repeat ``i`` draws one random permutation of the class and takes
its first ``m`` samples for every ``m``, so each repeat is one random order in
which the class could have been collected, and the increments of a repeat are
true marginal gains. Every prefix of a uniformly random permutation is a
uniformly random subset, so the mean and std per ``m`` are those of random
subsets of size ``m``.

Randomness comes from ``numpy.random.default_rng([seed, label])`` (``[seed,
-label, 1]`` for a negative label, which numpy's seeds cannot hold): one
class's curve does not depend on which other classes are analysed.

All subsets of a class are computed in a few batched calls of
:func:`pml_dsb.functional.padded_class_scales`. When a class has fewer
samples than dimensions (raw images), its vectors are first expressed in an
orthonormal basis of their span and rescaled so that :math:`S` is unchanged
(exactly: only the Gram matrix enters the formula), which makes the cost
independent of the ambient dimension ``d``.
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from pml_dsb.functional import padded_class_scales
from pml_dsb.functional.semantic_scale import unit_rows

logger = logging.getLogger(__name__)

__all__ = [
    "MarginalCurve",
    "marginal_sizes",
    "marginal_effect_curve",
    "class_marginal_curves",
    "saturation_summary",
    "SATURATION_POINTS",
]

#: Subset sizes at which :func:`saturation_summary` reports S / S(full count).
SATURATION_POINTS = (50, 100)

# Elements (rows x padded size x dimension) of one batched call: bounds memory
# at a few hundred MB of float64 intermediates.
_ELEMENT_BUDGET = 1 << 22


@dataclass(frozen=True)
class MarginalCurve:
    """Marginal effect curve of one class.

    Attributes:
        label: the class label.
        count: its number of samples ``n``.
        sizes: (k,) int64 subset sizes ``m`` (increasing, the last one ``n``).
        mean: (k,) float64 mean of :math:`S` over the repeats, in bits.
        std: (k,) float64 standard deviation (``ddof=0``) over the repeats;
            0 at ``m = n``, where every subset is the whole class.
        repeats: number of random subsets per size.
        normalize: whether vectors were L2-normalised before centring.
    """

    label: int
    count: int
    sizes: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    repeats: int
    normalize: bool

    @property
    def full_scale(self) -> float:
        """:math:`S` of the whole class (the curve at ``m = n``); 0 if ``n < 2``."""
        return float(self.mean[-1]) if len(self.sizes) else 0.0

    def at(self, m: int) -> float:
        """Mean :math:`S` at subset size ``m``; NaN if ``m`` is not on the grid."""
        hit = np.flatnonzero(self.sizes == m)
        return float(self.mean[hit[0]]) if len(hit) else math.nan


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def marginal_sizes(
    count: int,
    max_points: Optional[int] = None,
    include: Iterable[int] = SATURATION_POINTS,
) -> np.ndarray:
    """Subset sizes of a marginal effect curve for a class of ``count`` samples.

    Every size ``2 .. count`` when ``max_points`` is None or the class is small
    enough; otherwise about ``max_points`` sizes spaced geometrically from 2
    to ``count`` (dense where the curve rises fastest), plus each size of
    ``include`` that is ``<= count``. ``count`` itself is always last.
    Empty for ``count < 2``.

    >>> marginal_sizes(6).tolist()
    [2, 3, 4, 5, 6]
    >>> marginal_sizes(1000, max_points=8).tolist()
    [2, 5, 12, 29, 50, 70, 100, 169, 412, 1000]
    """
    count = _check_int("count", count, 0)
    if count < 2:
        return np.zeros(0, dtype=np.int64)
    if max_points is None or count - 1 <= max_points:
        return np.arange(2, count + 1, dtype=np.int64)
    max_points = _check_int("max_points", max_points, 2)
    grid = np.rint(np.geomspace(2, count, max_points)).astype(np.int64)
    extra = [m for m in include if 2 <= m <= count]
    return np.unique(np.concatenate([grid, np.asarray(extra, dtype=np.int64), [count]]))


def _class_seed(seed: int, label: int) -> list[int]:
    # numpy seeds are non-negative; [seed, label, 0] would equal [seed, label]
    return [seed, label] if label >= 0 else [seed, -label, 1]


def _span_coordinates(z: torch.Tensor) -> torch.Tensor:
    """(n, d) vectors -> (n, k) vectors with the same semantic scale of every
    subset under ``normalize=False``, with ``k = min(n, d)``.

    ``S`` depends on the vectors only through ``(d/m) * Gram(centred)``; the
    coordinates in an orthonormal basis of the span keep every Gram matrix,
    and the factor ``sqrt(d/k)`` restores ``d`` in ``d/m``.
    """
    n, d = z.shape
    if n >= d:
        return z
    q, _ = torch.linalg.qr(z.T)  # (d, n), orthonormal columns spanning the rows of z
    return (z @ q) * math.sqrt(d / n)


def _chunks(sizes: np.ndarray, repeats: int, dim: int, budget: int) -> list[list[int]]:
    """Split positions of increasing ``sizes`` into groups evaluated in one call:
    the padded size at most 1.5x the smallest, about ``budget`` elements."""
    groups: list[list[int]] = []
    current: list[int] = []
    for i, m in enumerate(sizes):
        if current:
            lo = sizes[current[0]]
            if m > 1.5 * lo or (len(current) + 1) * repeats * m * dim > budget:
                groups.append(current)
                current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def marginal_effect_curve(
    features,
    sizes: Optional[Sequence[int]] = None,
    repeats: int = 10,
    seed: int = 0,
    normalize: bool = True,
    label: int = 0,
    max_points: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
) -> MarginalCurve:
    r"""Marginal effect curve of one class: :math:`S` over random subsets of size m.

    Args:
        features: (n, d) samples of the class (tensor or array), one per row.
        sizes: subset sizes to evaluate, each in ``2 .. n``; default
            :func:`marginal_sizes` ``(n, max_points)``. ``n`` is always added.
        repeats: random subsets (nested prefixes of random permutations) per size.
        seed: with ``label``, seeds ``numpy.random.default_rng([seed, label])``
            (``[seed, -label, 1]`` for a negative label).
        normalize: L2-normalise each vector first (docs/DEFINITIONS.md default).
        label: the class label (recorded, and part of the seed).
        max_points: see :func:`marginal_sizes`.
        dtype: precision of the statistics (float64 by default).

    Returns:
        A :class:`MarginalCurve` (mean and std over the repeats, in bits).

    >>> import torch
    >>> z = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    >>> curve = marginal_effect_curve(z, repeats=5, seed=1)
    >>> curve.sizes[[0, -1]].tolist(), float(curve.std[-1])
    ([2, 40], 0.0)
    >>> import pml_dsb
    >>> bool(abs(curve.full_scale - float(pml_dsb.semantic_scale(z))) < 1e-12)
    True
    """
    z = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    if z.dim() != 2 or not z.is_floating_point():
        raise ValueError(
            f"features must be a floating (n, d) array, got shape {tuple(z.shape)} dtype {z.dtype}"
        )
    if not bool(torch.isfinite(z).all()):
        raise ValueError("features contains NaN or Inf values")
    repeats = _check_int("repeats", repeats, 1)
    seed = _check_int("seed", seed, 0)
    n = int(z.shape[0])
    if sizes is None:
        grid = marginal_sizes(n, max_points)
    else:
        wanted = {int(m) for m in sizes} | ({n} if n >= 2 else set())
        grid = np.asarray(sorted(wanted), dtype=np.int64)
        bad = grid[(grid < 2) | (grid > n)]
        if len(bad):
            raise ValueError(f"sizes must lie in [2, n={n}], got {bad.tolist()}")
    empty = np.zeros(0)
    if n < 2:
        return MarginalCurve(int(label), n, grid, empty, empty, repeats, bool(normalize))

    z = z.detach().cpu()
    if normalize:  # before narrowing to dtype: float32 turned rows of norm 1e160 into inf, 1e-200 into 0
        z = unit_rows(z.to(torch.promote_types(z.dtype, dtype)))
    y = _span_coordinates(z.to(dtype))
    k = y.shape[1]
    rng = np.random.default_rng(_class_seed(seed, int(label)))
    perms = torch.from_numpy(np.argsort(rng.random((repeats, n)), axis=1))
    mean = np.empty(len(grid))
    std = np.empty(len(grid))
    partial = grid < n
    part = grid[partial]
    for group in _chunks(part, repeats, k, _ELEMENT_BUDGET):
        top = int(part[group[-1]])
        block = y[perms[:, :top]]  # (repeats, top, k)
        ms = torch.from_numpy(part[group])
        mask = torch.arange(top).view(1, 1, -1) < ms.view(-1, 1, 1)  # (g, 1, top)
        mask = mask.expand(-1, repeats, -1).reshape(-1, top)
        blocks = block.unsqueeze(0).expand(len(group), -1, -1, -1).reshape(-1, top, k)
        s = padded_class_scales(blocks, mask, normalize=False, dtype=dtype)
        s = s.view(len(group), repeats).cpu().numpy()
        idx = np.flatnonzero(partial)[group]
        mean[idx] = s.mean(1)
        std[idx] = s.std(1)
    whole = torch.ones(1, n, dtype=torch.bool)
    mean[~partial] = float(padded_class_scales(y.unsqueeze(0), whole, normalize=False, dtype=dtype)[0])
    std[~partial] = 0.0
    return MarginalCurve(int(label), n, grid, mean, std, repeats, bool(normalize))


def class_marginal_curves(
    features,
    labels,
    classes: Optional[Sequence[int]] = None,
    repeats: int = 10,
    seed: int = 0,
    normalize: bool = True,
    max_points: Optional[int] = None,
) -> list[MarginalCurve]:
    """Marginal effect curve of every class (or of ``classes``), in label order.

    Args:
        features: (N, d) samples (tensor or array); raw inputs are flattened
            by the caller (e.g. pixels of ``1 x 8 x 8`` images -> 64 values).
        labels: (N,) integer labels.
        classes: labels to analyse; default every label present.
        repeats, seed, normalize, max_points: as in :func:`marginal_effect_curve`.

    >>> import torch
    >>> z = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    >>> curves = class_marginal_curves(z, [0] * 20 + [1] * 10, repeats=3)
    >>> [(c.label, c.count, len(c.sizes)) for c in curves]
    [(0, 20, 19), (1, 10, 9)]
    """
    z = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if lab.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers, got dtype {lab.dtype}")
    if z.dim() != 2 or len(lab) != z.shape[0]:
        raise ValueError(
            f"features must be (N, d) and labels (N,), got {tuple(z.shape)} and {lab.shape}"
        )
    wanted = np.unique(lab) if classes is None else np.asarray(list(classes), dtype=np.int64)
    curves = []
    for c in wanted:
        rows = torch.from_numpy(np.flatnonzero(lab == c))
        curve = marginal_effect_curve(
            z[rows], repeats=repeats, seed=seed, normalize=normalize, label=int(c),
            max_points=max_points,
        )
        logger.debug("class %d: n=%d, S(n)=%.4f bits", c, curve.count, curve.full_scale)
        curves.append(curve)
    return curves


def saturation_summary(
    curves: Sequence[MarginalCurve], points: Sequence[int] = SATURATION_POINTS
) -> list[dict]:
    """How saturated each class's scale is: :math:`S(m) / S(n)` at each ``m`` of ``points``.

    Returns one dict per curve: ``label``, ``count``, ``full_scale`` (bits),
    and for each ``m`` of ``points``: ``scale_at_<m>`` (mean S over subsets
    of size m) and ``fraction_at_<m>`` (that over ``full_scale``); both NaN
    when the class has fewer than ``m`` samples or ``m`` is not on its grid.

    >>> import numpy as np
    >>> c = MarginalCurve(0, 4, np.array([2, 3, 4]), np.array([1.0, 1.5, 2.0]), np.zeros(3), 1, True)
    >>> row = saturation_summary([c], points=(2, 8))[0]
    >>> row["full_scale"], row["scale_at_2"], row["fraction_at_2"], row["fraction_at_8"]
    (2.0, 1.0, 0.5, nan)
    """
    rows = []
    for c in curves:
        row = {"label": c.label, "count": c.count, "full_scale": c.full_scale}
        for m in points:
            s = c.at(m) if m <= c.count else math.nan
            row[f"scale_at_{m}"] = s
            row[f"fraction_at_{m}"] = s / c.full_scale if c.full_scale > 0 else math.nan
        rows.append(row)
    return rows
