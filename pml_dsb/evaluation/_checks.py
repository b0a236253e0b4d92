"""Input validation and conversion shared by the evaluation functions (private).

Every public function of :mod:`pml_dsb.evaluation` funnels its inputs through
here, so that every error names the argument, the offending value and what
was expected, in the same words everywhere.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import numpy as np
import torch

_NORM_EPS = 1e-12


def cuda_index(x: Any) -> int | None:
    """The CUDA device index of ``x`` when it is a CUDA tensor, else None."""
    if isinstance(x, torch.Tensor) and x.is_cuda:
        return x.device.index if x.device.index is not None else torch.cuda.current_device()
    return None


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        # numpy has no bfloat16 (autocast outputs it); float32 holds it exactly
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    if x is None:
        raise ValueError(f"{name} is None; expected an array of shape (N, d)")
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} could not be converted to an array ({err})") from err


def as_embeddings(x: Any, name: str) -> np.ndarray:
    """``x`` as a float32 (N, d) numpy array (shares memory when it can;
    inputs of magnitude beyond 2**32 or below 2**-32 are first scaled by one
    power of two, which no metric here sees).

    Raises ``ValueError`` for an empty array, a shape other than (N, d) with
    N, d >= 1, or any NaN or infinite entry; ``TypeError`` for a non-numeric one.
    """
    arr = _to_numpy(x, name)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must have shape (N, d), got shape {tuple(arr.shape)}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(
            f"{name} is empty (shape {tuple(arr.shape)}); expected at least one "
            "embedding of at least one dimension"
        )
    finite = np.isfinite(arr)  # in the input's own dtype: float64 beyond float32's range is finite
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        shown = ", ".join(str(i) for i in bad_rows[:5]) + (", ..." if bad_rows.size > 5 else "")
        raise ValueError(
            f"{name} contains {int((~finite).sum())} NaN or infinite values in "
            f"{bad_rows.size} rows (rows {shown}); expected finite embeddings"
        )
    if arr.dtype.itemsize >= 4:  # narrower types stay well inside these bounds
        # one power-of-two factor for the whole array brings it inside float32's
        # range (no overflow, no flush to zero) and keeps its squared distances
        # finite in float32 (k-means on raw rows), and it keeps cosines and
        # the order of distances: every metric here is invariant to a global scale
        largest = float(np.abs(arr).max())
        if largest > 2.0**32 or 0 < largest < 2.0**-32:
            arr = np.ldexp(arr.astype(np.float64), -math.frexp(largest)[1])
    return np.ascontiguousarray(arr, dtype=np.float32)


def as_labels(y: Any, name: str, n: int, embeddings_name: str) -> np.ndarray:
    """``y`` as a 1-D numpy array of length ``n`` (shape (n,) or (n, 1) accepted)."""
    if y is None:
        raise ValueError(f"{name} is None; expected one label per row of {embeddings_name}")
    arr = _to_numpy(y, name)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(
            f"{name} must have shape (N,) or (N, 1), got shape {tuple(arr.shape)}"
        )
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
            or np.issubdtype(arr.dtype, np.bool_)):
        raise TypeError(f"{name} must hold numeric labels, got dtype {arr.dtype}")
    if arr.shape[0] != n:
        raise ValueError(
            f"{name} has {arr.shape[0]} labels but {embeddings_name} has {n} rows; "
            "expected one label per embedding"
        )
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite labels; expected finite labels")
    return arr


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation into a new float32 array (zero rows stay zero)."""
    # squares summed in float64: a row of tiny entries beside large rows
    # (within as_embeddings' bounds) would underflow in float32
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))[:, None]
    return np.divide(x, np.maximum(norms, _NORM_EPS), dtype=np.float32)


#: faiss takes its k-means seed as a C int
MAX_FAISS_SEED = 2**31 - 1


def check_int(value: Any, name: str, minimum: int, maximum: Optional[int] = None) -> int:
    """``value`` as an int >= ``minimum`` (and <= ``maximum``; bools rejected)."""
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int {bounds}, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an int {bounds}, got {value!r}")
    return int(value)


def check_ks(ks: Any, name: str = "recall_ks") -> tuple[int, ...]:
    """A non-empty iterable of positive ints, returned sorted without duplicates."""
    if isinstance(ks, numbers.Integral) and not isinstance(ks, bool):
        ks = (ks,)
    if not isinstance(ks, Iterable) or isinstance(ks, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of positive ints, got {ks!r}")
    ks = tuple(ks)
    if len(ks) == 0:
        raise ValueError(f"{name} is empty; expected at least one positive int, e.g. (1, 2, 4, 8)")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"{name} must hold positive ints, got {ks!r}")
    return tuple(sorted({int(k) for k in ks}))


def check_k_fits(k: int, num_reference: int, ref_includes_query: bool, name: str) -> None:
    """Raise unless ``k`` neighbours exist besides the query itself."""
    available = num_reference - int(ref_includes_query)
    if k > available:
        extra = " (the query itself excluded)" if ref_includes_query else ""
        raise ValueError(
            f"{name} asks for k={k} neighbours but the reference set offers only "
            f"{available}{extra}; expected k <= {available}"
        )


def scalar(v: Any) -> Any:
    """A numpy scalar as the matching Python scalar (dict keys, JSON, SQLite)."""
    return v.item() if isinstance(v, np.generic) else v


def as_count_mapping(train_counts: Any, name: str = "train_counts") -> dict:
    """Training counts as {label: count}.

    Accepts a mapping label -> count, or a 1-D sequence / array / tensor whose
    i-th entry is the count of label i.
    """
    if isinstance(train_counts, Mapping):
        items = list(train_counts.items())
    else:
        arr = _to_numpy(train_counts, name)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(
                f"{name} must be a mapping label -> count or a non-empty 1-D sequence "
                f"of counts indexed by label, got shape {tuple(arr.shape)}"
            )
        items = list(enumerate(arr.tolist()))
    out = {}
    for label, count in items:
        if isinstance(count, float) and count.is_integer():
            count = int(count)
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(
                f"{name} must hold non-negative integer counts, got {count!r} for label {label!r}"
            )
        out[scalar(label)] = int(count)
    return out
