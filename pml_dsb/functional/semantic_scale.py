r"""Semantic scale: the volume of the space that a class's features span.

For the m feature vectors of one class, stacked as the columns of
:math:`Z \in \mathbb{R}^{d \times m}` and centred, :math:`Z_c = Z - \bar Z`,

.. math::

    S = \tfrac12 \log_2 \det\!\left(I_d + \tfrac{d}{m} Z_c Z_c^\top\right)
      = \tfrac12 \log_2 \det\!\left(I_m + \tfrac{d}{m} Z_c^\top Z_c\right),

in bits (Sylvester's identity gives the second form). Every function here
computes in whichever of the two spaces is smaller, with a Cholesky
factorisation (``torch.linalg.slogdet`` hangs on 2-thread CPU builds for
matrices of size >= 256; ``cholesky_ex`` does not). By default each vector is
L2-normalised first (``normalize=False`` turns this off). Classes with fewer
than two samples have no spread: their scale is 0.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as _np
import torch
import torch.nn.functional as F
from scipy.linalg import lapack as _lapack

__all__ = ["semantic_scale", "class_semantic_scales", "padded_class_scales", "unnormalized_norm_limit"]

_LOG2 = math.log(2.0)

_EPS64 = torch.finfo(torch.float64).eps

#: Above this trace of (d/m)·Zc·Zcᵀ, float64 rounding of I + (d/m)·Zc·Zcᵀ can move
#: a unit eigenvalue (a direction of no spread) by more than 1e-6, and near
#: 1/eps the Cholesky factorisation fails: such classes (only reachable
#: without normalisation) take the singular values of Zc instead.
SPREAD_LIMIT = 1e-6 / _EPS64


def unnormalized_norm_limit(embedding_size: int, singular_values: bool = True) -> float:
    """The largest feature norm at which float64 scales of unnormalised
    features stay within 1e-6 nats per direction: through Zc's singular values
    (the functions here: the rounding of Zc itself, eps times the norm, must
    stay below 1e-3 after the d/m factor) or through a factorisation of
    I + (d/m)·Zc·Zcᵀ (``singular_values=False``, the memory's running
    statistics: eps times d times the squared norm below 1e-6)."""
    if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size < 1:
        raise ValueError(f"embedding_size must be an int >= 1, got {embedding_size!r}")
    if singular_values:
        return 1e-3 / (_EPS64 * math.sqrt(embedding_size))
    return math.sqrt(SPREAD_LIMIT / embedding_size)


def unit_rows(z: torch.Tensor) -> torch.Tensor:
    """Each row of a floating tensor scaled to unit L2 norm (zero rows stay zero),
    for any norm the dtype holds: each row is first divided by its largest
    magnitude, so that its squares neither overflow (``F.normalize`` gave rows
    of norm past ~1e154 in float64 as zero) nor underflow (below its 1e-12
    floor, rows came out short of unit length). A zero row's gradient is
    ``F.normalize``'s (1/eps): dividing it by a clamped tiny magnitude as well
    gave 1/tiny**2, an infinite gradient."""
    peak = z.abs().amax(-1, keepdim=True)
    scaled = z / torch.where(peak > 0, peak, 1.0)  # non-zero rows: norm in [1, sqrt(d)]
    return F.normalize(scaled, dim=-1, eps=max(1e-12, torch.finfo(z.dtype).tiny))


def check_int(name: str, value, low: int) -> int:
    """``value`` as an int if it is a whole number >= ``low`` (numpy's integers
    too, e.g. ``labels.max() + 1``); bools, floats and strings are refused."""
    if isinstance(value, (bool, _np.bool_)) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def check_flag(name: str, value) -> bool:
    """``value`` as a bool if it is one (numpy's included); "no" or None would
    silently read as true or false."""
    if not isinstance(value, (bool, _np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def describe(value) -> str:
    """A value for an error message: a tensor's shape and dtype, else its type."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


def _check_features(features: torch.Tensor, name: str = "features") -> None:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2 or features.shape[1] == 0:
        raise ValueError(f"{name} must have shape (m, d) with d >= 1, got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {features.dtype}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or Inf values")


def _mkl_friendly(n: int) -> int:
    """Size to pad an n x n SPD matrix to: MKL's Cholesky is 2-3x slower at exactly
    128, 256, 512 than nearby sizes, and an identity block leaves log det unchanged."""
    return n + 8 if n >= 128 and n % 128 == 0 else n


def _logdet_spd_lapack(a: torch.Tensor, sizes: Optional[list[int]] = None):
    """CPU path: LAPACK potrf on each matrix in place (``a`` is overwritten).

    torch's batched ``cholesky_ex`` copies the batch and zeroes its upper
    triangles; factorising in place saves both passes over the matrices.
    ``sizes``: factorise only each matrix's leading block of that size.
    Returns None if a matrix is not positive definite.
    """
    potrf = _lapack.dpotrf if a.dtype == torch.float64 else _lapack.spotrf
    # a C-ordered symmetric matrix is its own Fortran-ordered transpose, so either
    # triangle serves: OpenBLAS (one thread) factorised the lower one ~1.3x faster
    # below n = 128 in float64 (n = 256 in float32), the upper one ~1.15x faster above
    lower_below = 128 if a.dtype == torch.float64 else 256
    arrays = a.detach().numpy().reshape(-1, a.shape[-2], a.shape[-1])
    # the factors' diagonals, 1 past each leading block; logs summed once at
    # the end (a numpy log and sum per matrix cost ~2-10 us, potrf ~15 at n = 64)
    diagonals = _np.ones(arrays.shape[:2], dtype=arrays.dtype)
    for k, matrix in enumerate(arrays):
        if sizes is not None and sizes[k] < matrix.shape[0]:
            if sizes[k] == 0:
                continue
            # a leading block is not contiguous: potrf works on a small copy
            matrix = _np.ascontiguousarray(matrix[: sizes[k], : sizes[k]])
        factor, info = potrf(matrix.T, lower=int(len(matrix) < lower_below), overwrite_a=1, clean=0)
        if info != 0:
            return None
        diagonals[k, : len(factor)] = factor.diagonal()
    out = 2.0 * _np.log(diagonals.astype(_np.float64)).sum(1)
    return torch.from_numpy(out).to(a.dtype).view(a.shape[:-2])


def logdet_spd(a: torch.Tensor, overwrite: bool = False, sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """log det of a batch of symmetric positive definite matrices (..., n, n).

    On CPU, without autograd, the matrices are factorised by LAPACK, in place
    when ``overwrite`` is true (``a`` then holds garbage afterwards); otherwise
    by ``torch.linalg.cholesky_ex``. A matrix that rounding made indefinite in
    float32 is redone in float64; with ``overwrite`` there is no original left
    to redo, and ``torch.linalg.LinAlgError`` is raised instead.

    ``sizes``: optional integer tensor of the batch's shape, at most n: the
    log det of each matrix's leading ``sizes`` x ``sizes`` block instead (for
    padded batches of matrices of different sizes; LAPACK then factorises
    only that block, and a Cholesky factor's leading block is the factor of
    the leading block). The whole matrices must still be positive definite:
    the torch path factorises them whole.
    """
    if sizes is not None and (
        sizes.dtype.is_floating_point
        or sizes.dtype == torch.bool
        or sizes.shape != a.shape[:-2]
        or bool((sizes < 0).any() | (sizes > a.shape[-1]).any())
    ):
        raise ValueError(
            f"sizes must be an integer tensor of the batch shape {tuple(a.shape[:-2])} with values in "
            f"[0, {a.shape[-1]}], got dtype {sizes.dtype} and shape {tuple(sizes.shape)}"
        )
    if (
        a.device.type == "cpu"
        and not a.requires_grad
        and a.dtype in (torch.float32, torch.float64)
        and a.is_contiguous()
        and a.numel()
    ):
        out = _logdet_spd_lapack(a if overwrite else a.clone(), None if sizes is None else sizes.flatten().tolist())
        if out is not None:
            return out
        if overwrite or a.dtype == torch.float64:
            raise torch.linalg.LinAlgError("logdet_spd: a matrix is not positive definite")
        a = a.double()  # rounding broke definiteness: retry below in float64
    n = a.shape[-1]
    pad = _mkl_friendly(n) - n
    if pad:
        a = F.pad(a, (0, pad, 0, pad))
        idx = torch.arange(n, n + pad, device=a.device)
        a[..., idx, idx] = 1.0
    chol, info = torch.linalg.cholesky_ex(a)
    if bool((info != 0).any()):
        # I + PSD is positive definite in exact arithmetic; only rounding in a
        # low precision can break that: redo those matrices in float64.
        bad = info != 0
        chol = chol.clone()
        chol[bad] = torch.linalg.cholesky(a[bad].double()).to(chol.dtype)
    logs = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1))
    if sizes is not None:
        inside = torch.arange(logs.shape[-1], device=logs.device) < sizes.to(logs.device).unsqueeze(-1)
        logs = torch.where(inside, logs, 0.0)
    return 2.0 * logs.sum(-1)


def logdet_and_inverse_spd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log det and inverse of a batch of symmetric positive definite matrices (..., n, n).

    One Cholesky factorisation per matrix: LAPACK ``potrf`` + ``potri`` on CPU
    (scipy's, which does not hang with 2 threads), ``cholesky_ex`` +
    ``cholesky_inverse`` elsewhere. ``a`` is left unchanged. Raises
    ``torch.linalg.LinAlgError`` if a matrix is not positive definite.
    """
    if a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64):
        potrf, potri = (_lapack.dpotrf, _lapack.dpotri) if a.dtype == torch.float64 else (_lapack.spotrf, _lapack.spotri)
        arrays = a.detach().contiguous().numpy().reshape(-1, a.shape[-2], a.shape[-1])
        logdet = _np.empty(len(arrays))
        inverse = _np.empty_like(arrays)
        for k, matrix in enumerate(arrays):
            factor, info = potrf(matrix, lower=1, clean=1)
            if info == 0:
                inv, info = potri(factor, lower=1)
            if info != 0:
                raise torch.linalg.LinAlgError("logdet_and_inverse_spd: a matrix is not positive definite")
            logdet[k] = 2.0 * _np.log(factor.diagonal()).sum()
            lower = _np.tril(inv)  # potri fills one triangle only
            inverse[k] = lower + _np.tril(inv, -1).T
        return (
            torch.from_numpy(logdet).to(a.dtype).view(a.shape[:-2]),
            torch.from_numpy(inverse).view(a.shape),
        )
    chol, info = torch.linalg.cholesky_ex(a)
    if bool((info != 0).any()):
        raise torch.linalg.LinAlgError("logdet_and_inverse_spd: a matrix is not positive definite")
    logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return logdet, torch.cholesky_inverse(chol)


def padded_class_scales(
    features: torch.Tensor,
    mask: torch.Tensor,
    normalize: bool = True,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    r"""Semantic scales of a batch of classes stored as padded blocks.

    Args:
        features: (t, n, d) tensor; ``features[i, j]`` is the j-th sample of
            class i where ``mask[i, j]`` is true, anything otherwise.
        mask: (t, n) bool tensor of valid samples.
        normalize: L2-normalise every vector before centring.
        dtype: the precision of the statistics and the factorisation
            (float64 by default; float32 agrees within 1e-5 relative on the
            memory's benchmark shapes, but not for tightly clustered classes:
            6 unit rows at d = 16, each at distance 0.03, 0.003, 0.0003 from a
            common unit vector, gave 1.2e-5, 3.2e-3, 0.34 relative, medians of
            20 draws in benchmarks/bench_float32_tight_classes.py; unlike the
            memory, nothing here is recomputed in float64).

    Returns:
        (t,) tensor of :math:`S` in bits, in ``dtype``; 0 where fewer than two
        samples are valid. Padded rows are zeroed, so they add an identity
        block to the Gram form and nothing to the covariance form: they never
        count as samples.
    """
    normalize = check_flag("normalize", normalize)
    if not isinstance(features, torch.Tensor) or features.dim() != 3 or not features.is_floating_point():
        raise TypeError(f"features must be a floating (t, n, d) tensor, got {describe(features)}")
    t, n, d = features.shape
    if d == 0:
        raise ValueError(f"features must have shape (t, n, d) with d >= 1, got shape {tuple(features.shape)}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (t, n):
        raise TypeError(f"mask must be a bool tensor of shape {(t, n)}, got {describe(mask)}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    out = torch.zeros(t, dtype=dtype, device=features.device)
    if t == 0 or n == 0:
        return out
    with torch.autocast(device_type=features.device.type, enabled=False):
        # not z * mask: a padded NaN or Inf times 0 is NaN (before the
        # normalisation too, whose gradient would carry it)
        wide_enough = torch.promote_types(features.dtype, dtype)  # float64 input narrows after normalising
        z = torch.where(mask.unsqueeze(-1), features.to(wide_enough), 0.0)
        if not bool(torch.isfinite(z).all()):
            raise ValueError("features contains NaN or Inf values in rows that mask marks valid")
        if normalize:
            z = unit_rows(z)
        z = z.to(dtype)
        valid = mask.to(dtype).unsqueeze(-1)
        if not normalize:
            _check_unnormalized_norms(z, d)
        m = mask.sum(1)
        ok = m >= 2
        if not bool(ok.any()):
            return out
        z, valid, m = z[ok], valid[ok], m[ok].to(dtype)
        mean = z.sum(1, keepdim=True) / m.view(-1, 1, 1)
        zc = (z - mean) * valid
        alpha = (d / m).view(-1, 1, 1)
        if n <= d:  # Gram (m x m) form
            gram = zc @ zc.transpose(1, 2)
        else:  # covariance (d x d) form
            gram = zc.transpose(1, 2) @ zc
        eye = torch.eye(gram.shape[-1], dtype=dtype, device=gram.device)
        wide = None
        if not normalize:  # unit vectors bound the trace by d: never wide
            wide = alpha.view(-1) * gram.diagonal(dim1=-2, dim2=-1).sum(-1) > SPREAD_LIMIT
        if wide is None or not bool(wide.any()):
            # in place only in float64: a float32 matrix may need its original for a float64 redo
            out[ok] = logdet_spd(eye + alpha * gram, overwrite=dtype == torch.float64) / (2.0 * _LOG2)
            return out
        bits = torch.empty(len(gram), dtype=dtype, device=gram.device)
        narrow = ~wide
        if bool(narrow.any()):
            bits[narrow] = logdet_spd(eye + alpha[narrow] * gram[narrow]) / (2.0 * _LOG2)
        # singular values of Zc: accurate to eps times the largest, so no lost identity term
        sigma = torch.linalg.svdvals(zc[wide].double())
        bits[wide] = (torch.log1p(alpha[wide].view(-1, 1).double() * sigma**2).sum(-1) / (2.0 * _LOG2)).to(dtype)
        out[ok] = bits
    return out


def _check_unnormalized_norms(z: torch.Tensor, d: int) -> None:
    """Raise ``ValueError`` where float64 cannot resolve a class's spread."""
    norm = float(z.detach().double().norm(dim=-1).amax())
    limit = unnormalized_norm_limit(d)
    if norm > limit:
        raise ValueError(
            f"features reach norm {norm:.4g}; without normalisation float64 resolves a class's spread "
            f"(the identity term of I + (d/m)·Zc·Zcᵀ) only for norms up to {limit:.4g} at d={d}: "
            f"scale them down or normalise them"
        )


def semantic_scale(features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    r"""Semantic scale :math:`S` of one class, in bits, as a float64 scalar tensor.

    Args:
        features: (m, d) tensor, one sample per row, any floating dtype and device.
        normalize: L2-normalise each row first (default, as docs/DEFINITIONS.md says).

    Differentiable with respect to ``features`` (computed in float64, the
    gradient comes back in the features' dtype).

    >>> import torch
    >>> z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> round(float(semantic_scale(z)), 12)   # Zc Zc^T = [[.5, -.5], [-.5, .5]]: 0.5*log2 det(I + Zc Zc^T) = 0.5*log2(2)
    0.5
    >>> float(semantic_scale(z[:1]))        # one sample: no spread
    0.0
    """
    _check_features(features)
    normalize = check_flag("normalize", normalize)
    m = features.shape[0]
    if m < 2:
        return _connected(torch.zeros((), dtype=torch.float64, device=features.device), features)
    mask = torch.ones(1, m, dtype=torch.bool, device=features.device)
    return padded_class_scales(features.unsqueeze(0), mask, normalize=normalize)[0]


def _check_labels(labels: torch.Tensor, num_classes: int, length: int) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != length:
        raise ValueError(
            f"labels must have shape ({length},) to match the features, got {tuple(labels.shape)}"
        )
    if length and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, num_classes={num_classes}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )


def group_by_class(
    features: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the samples of ``classes`` into (t, n, d) blocks with a (t, n) mask."""
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    counts = torch.bincount(sorted_labels, minlength=int(classes.max()) + 1 if len(classes) else 0)
    starts = torch.cumsum(counts, 0) - counts
    sizes = counts[classes]
    n = int(sizes.max()) if len(classes) else 0
    ar = torch.arange(n, device=features.device)
    mask = ar.unsqueeze(0) < sizes.unsqueeze(1)
    rows = (starts[classes].unsqueeze(1) + ar.unsqueeze(0)).clamp(max=max(len(order) - 1, 0))
    return features[order[rows]], mask


def class_semantic_scales(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    normalize: bool = True,
) -> torch.Tensor:
    r"""Semantic scale of every class, as a (num_classes,) float64 tensor in bits.

    Classes are computed in one batched call per size bucket, each in the
    smaller of the Gram and covariance spaces. A class with fewer than two
    samples gets 0.

    >>> import torch
    >>> z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> class_semantic_scales(z, torch.tensor([0, 0, 1]), 3)
    tensor([0.5000, 0.0000, 0.0000], dtype=torch.float64)
    """
    _check_features(features)
    normalize = check_flag("normalize", normalize)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    num_classes = int(num_classes)  # numpy's integers too, as the marginal functions take
    _check_labels(labels, num_classes, features.shape[0])
    labels = labels.to(features.device).long()
    out = torch.zeros(num_classes, dtype=torch.float64, device=features.device)
    counts = torch.bincount(labels, minlength=num_classes)
    classes = torch.nonzero(counts >= 2).flatten()
    for bucket in size_buckets(counts[classes]):
        cls = classes[bucket]
        block, mask = group_by_class(features, labels, cls)
        out[cls] = padded_class_scales(block, mask, normalize=normalize)
    return _connected(out, features)


def _connected(scales: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``scales`` in the graph of ``features`` when those need gradients: a
    class with fewer than two samples (S = 0) then gets zero gradients instead
    of a backward() that fails because nothing requires grad."""
    if features.requires_grad and not scales.requires_grad:
        return scales + (features * 0).sum(dtype=scales.dtype)  # finite features (checked): exactly 0
    return scales


def size_buckets(sizes: torch.Tensor, ratio: float = 1.5, max_buckets: int | None = None) -> list[torch.Tensor]:
    """Split positions of ``sizes`` into groups whose sizes differ by at most
    ``ratio``, so that padding every group to its largest member wastes little.

    ``max_buckets``: take instead the finest of ``ratio``, 2, 4 and 8 that
    needs at most this many groups (8 if none does), for devices where each
    group costs more than its padding.
    """
    if sizes.numel() == 0:
        return []
    order = torch.argsort(sizes)
    logs = torch.log(sizes[order].double().clamp(min=1))
    ratios = [ratio] if max_buckets is None else [ratio] + [r for r in (2.0, 4.0, 8.0) if r > ratio]
    scale = torch.tensor([[math.log(r)] for r in ratios], dtype=logs.dtype, device=logs.device)
    keys = torch.floor(logs / scale).long().cpu()  # one transfer for every candidate ratio
    for row in keys:
        _, counts = torch.unique_consecutive(row, return_counts=True)
        if max_buckets is None or len(counts) <= max_buckets:
            break
    return list(torch.split(order, counts.tolist()))
