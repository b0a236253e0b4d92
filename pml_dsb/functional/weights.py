r"""Per-class loss weights: DSB's :math:`1/S` and the class-balanced baseline."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

__all__ = ["dsb_weights", "class_balanced_weights", "NORMALIZE_CHOICES"]

NORMALIZE_CHOICES = ("mean", None)


def check_normalize(normalize) -> None:
    if normalize not in NORMALIZE_CHOICES:
        raise ValueError(f"normalize must be one of {NORMALIZE_CHOICES}, got {normalize!r}")


def check_eps(eps) -> None:
    """``eps``, the scale at or below which a class has no scale, must be a finite number >= 0."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0.0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def dsb_weights(
    scales: torch.Tensor,
    counts: torch.Tensor,
    normalize: Optional[str] = "mean",
    eps: float = 1e-12,
) -> torch.Tensor:
    r"""DSB class weights :math:`w_c = 1/S_c` from semantic scales.

    Args:
        scales: (C,) semantic scales :math:`S_c` (bits).
        counts: (C,) samples per class behind each scale.
        normalize: ``"mean"`` divides by the mean weight of the classes that
            have a scale, so those weights average 1; ``None`` keeps the raw
            :math:`1/S_c` of the paper.
        eps: a scale at or below ``eps`` counts as no scale.

    Returns:
        (C,) float64 weights. A class with fewer than two samples or
        :math:`S_c \le` ``eps`` has no scale and gets the largest weight among
        the classes that have one (it is the least represented); if no class
        has a scale, every weight is 1.

    >>> import torch
    >>> dsb_weights(torch.tensor([1.0, 2.0, 0.0]), torch.tensor([5, 5, 1]), normalize=None)
    tensor([1.0000, 0.5000, 1.0000], dtype=torch.float64)
    >>> dsb_weights(torch.tensor([1.0, 2.0, 0.0]), torch.tensor([5, 5, 1]))
    tensor([1.3333, 0.6667, 1.3333], dtype=torch.float64)
    """
    check_normalize(normalize)
    check_eps(eps)
    for name, value in (("scales", scales), ("counts", counts)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if scales.shape != counts.shape or scales.dim() != 1:
        raise ValueError(
            f"scales and counts must both have shape (C,), got {tuple(scales.shape)} "
            f"and {tuple(counts.shape)}"
        )
    scales = _finite_scales(scales)
    whole = not counts.is_floating_point() or bool((torch.isfinite(counts) & (counts == counts.round())).all())
    if counts.is_complex() or counts.dtype == torch.bool or not whole or bool((counts < 0).any()):
        raise ValueError(f"counts must be whole numbers >= 0, got {counts.tolist()} (dtype {counts.dtype})")
    return _dsb_weights(scales, counts, normalize, eps, finite=True)


def _finite_scales(scales: torch.Tensor) -> torch.Tensor:
    """``scales`` in float64; ``ValueError`` unless every one is finite."""
    scales = scales.to(torch.float64)
    # NaN would read as "no scale" and get the largest weight, +inf as a weight
    # of 0 (its loss dropped); a rounding-negative scale is <= eps: no scale
    # the largest magnitude is finite iff every value is (a NaN propagates): one
    # reduction, where torch.isfinite(...).any() is 6 operations
    if scales.numel() and not math.isfinite(float(scales.abs().amax())):
        bad = ~torch.isfinite(scales)
        raise ValueError(
            f"scales must be finite, got {scales[bad].tolist()} "
            f"(classes {torch.nonzero(bad).flatten().tolist()})"
        )
    return scales


def _dsb_weights(
    scales: torch.Tensor, counts: torch.Tensor, normalize: Optional[str], eps: float, finite: bool = False
) -> torch.Tensor:
    """:func:`dsb_weights` without the checks of its arguments, except that the
    scales must be finite (checked unless ``finite``): for a memory's own scales
    and counts (a (C,) tensor and whole counts >= 0)."""
    if not finite:
        scales = _finite_scales(scales)
    # with eps = 0, a subnormal scale's 1/S overflows: such a class has no usable scale
    inv_all = torch.reciprocal(scales)  # each class's 1/S once (1.0 / x is reciprocal(x) * 1.0: the same values)
    # (finite scales > eps >= 0 have a positive 1/S, finite or +inf: != inf is isfinite there, in one operation)
    has_scale = (counts.to(scales.device) >= 2) & (scales > eps) & (inv_all != math.inf)
    weights = torch.ones_like(scales)
    if not bool(has_scale.any()):
        return weights
    inv = inv_all[has_scale]
    if normalize == "mean":
        # equal scales give weights of exactly 1 (the parent's loss, bit for bit):
        # a mean of three or more equal values can round one ulp away from them
        low, high = torch.aminmax(inv)
        inv = torch.ones_like(inv) if bool(high == low) else inv / inv.mean()
    weights.fill_(float(inv.max()))
    weights[has_scale] = inv
    return weights


def class_balanced_weights(counts, beta: float = 0.9999) -> torch.Tensor:
    r"""Class-balanced weights of Cui et al. (2019), as a float64 (C,) tensor.

    :math:`w_c = (1-\beta) / (1-\beta^{n_c})`, normalised so the weights sum to
    the number of classes C. Pass them to PML's ``ClassWeightedReducer`` for
    CB-SoftTriple and CB-NormSoftmax (see :func:`pml_dsb.losses.class_balanced_reducer`),
    or to ``torch.nn.CrossEntropyLoss(weight=...)``.

    Args:
        counts: training samples per class (sequence or tensor), every one >= 1.
        beta: in [0, 1); 0 gives uniform weights, beta -> 1 inverse frequency.

    >>> class_balanced_weights([100, 10], beta=0.9)
    tensor([0.7889, 1.2111], dtype=torch.float64)
    """
    try:
        counts = torch.as_tensor(counts)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"counts must be a sequence or tensor of whole numbers, got {counts!r}") from err
    if counts.dtype == torch.bool or counts.is_complex():
        raise TypeError(f"counts must be whole numbers, got dtype {counts.dtype}")
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}")
    if counts.dtype.is_floating_point and not bool((counts == counts.round()).all() & torch.isfinite(counts).all()):
        raise TypeError(f"counts must be whole numbers, got {counts.tolist()}")
    if bool((counts < 1).any()):
        bad = torch.nonzero(counts < 1).flatten().tolist()
        raise ValueError(f"counts must be >= 1 for every class; classes {bad} have fewer")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
    n = counts.to(torch.float64)
    effective = (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n)) / (1.0 - beta)
    w = 1.0 / effective
    return w * (len(w) / w.sum())
