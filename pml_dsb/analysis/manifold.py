r"""Manifold check: the semantic scale of a point cloud as the cloud is scaled up.

The paper measures Stanford point-cloud objects scaled by several factors and
finds that the measured volume

.. math::

    S(f) = \tfrac12 \log_2 \det\!\left(I_d + \tfrac{d}{N} f^2 P_c P_c^\top\right)

of the centred points :math:`P_c` scaled by :math:`f` rises monotonically and
slowly with :math:`f`. Here :math:`S` is computed with ``normalize=False``:
L2-normalising every point would map all scaled copies onto the same unit
vectors and remove the scale. Growth is at most logarithmic: doubling ``f``
adds at most ``d`` bits (``det(I + 4A) <= 4^d det(I + A)``).

Point clouds: scikit-learn's ``make_swiss_roll`` and ``make_s_curve`` (seeded),
or a user's ``.npy`` (N x 3 array) or ASCII ``.ply`` file (vertices' x, y, z).
"""
from __future__ import annotations

import logging
import math
import os
from typing import Sequence, Union

import numpy as np
import torch

from pml_dsb.functional import semantic_scale

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_FACTORS",
    "BUILTIN_CLOUDS",
    "builtin_point_cloud",
    "read_ply",
    "load_point_cloud",
    "scaled_volumes",
    "volume_report",
]

#: Scale factors of the manifold check: 0.5 to 4 in steps of 0.5.
DEFAULT_FACTORS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
#: Names of the generated point clouds.
BUILTIN_CLOUDS = ("swiss_roll", "s_curve")


def builtin_point_cloud(name: str, n_samples: int = 2000, seed: int = 0, noise: float = 0.0) -> np.ndarray:
    """A scikit-learn point cloud (``"swiss_roll"`` or ``"s_curve"``) as an (N, 3) float64 array.

    >>> builtin_point_cloud("s_curve", 100).shape
    (100, 3)
    """
    from sklearn.datasets import make_s_curve, make_swiss_roll

    makers = {"swiss_roll": make_swiss_roll, "s_curve": make_s_curve}
    if name not in makers:
        raise ValueError(f"point cloud name must be one of {BUILTIN_CLOUDS}, got {name!r}")
    points, _ = makers[name](n_samples=n_samples, noise=noise, random_state=seed)
    return points.astype(np.float64)


def read_ply(path: Union[str, os.PathLike]) -> np.ndarray:
    """The vertices (x, y, z) of an ASCII PLY file as an (N, 3) float64 array.

    Elements before ``vertex`` in the header are skipped line by line (an
    ASCII element takes one line per item); properties other than x, y, z
    (normals, colours) are ignored. Binary PLY files raise ``ValueError``.

    >>> import tempfile, os
    >>> text = ("ply\\nformat ascii 1.0\\nelement vertex 2\\nproperty float x\\n"
    ...         "property float y\\nproperty float z\\nproperty uchar red\\n"
    ...         "element face 0\\nproperty list uchar int vertex_indices\\nend_header\\n"
    ...         "0 0 0 255\\n1 2 3 255\\n")
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = os.path.join(d, "two.ply")
    ...     _ = open(p, "w").write(text)
    ...     read_ply(p).tolist()
    [[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]
    """
    path = os.fspath(path)
    with open(path, "rb") as fh:
        raw = fh.read()
    end = raw.find(b"end_header")
    if not raw.startswith(b"ply") or end < 0:
        raise ValueError(f"{path!r} is not a PLY file (no 'ply' magic or no 'end_header')")
    header = raw[:end].decode("ascii", errors="replace").splitlines()
    fmt = next((line.split()[1:2] for line in header if line.startswith("format")), None)
    if not fmt:  # no "format" line, or a bare one
        raise ValueError(f"{path!r} names no format in its PLY header (expected 'format ascii 1.0')")
    fmt = fmt[0]
    if fmt != "ascii":
        raise ValueError(
            f"{path!r} is a {fmt} PLY file; only ASCII PLY is read. Convert it, e.g. "
            "with Open3D (o3d.io.write_point_cloud(out, pcd, write_ascii=True)) or "
            "MeshLab, or save the vertices as a .npy (N x 3) array"
        )
    elements = []  # [name, count, [property names]]
    for line in header:
        tok = line.split()
        if not tok:
            continue
        if tok[0] == "element":
            if len(tok) != 3 or not tok[2].isdigit():
                raise ValueError(f"{path!r}: malformed PLY header line {line!r} (expected 'element NAME COUNT')")
            elements.append([tok[1], int(tok[2]), []])
        elif tok[0] == "property" and elements:
            elements[-1][2].append(tok[-1])
    if not any(e[0] == "vertex" for e in elements):
        raise ValueError(f"{path!r} has no 'element vertex' in its header")
    parts = raw[end:].split(b"\n", 1)
    if len(parts) < 2:
        raise ValueError(f"{path!r} ends at 'end_header': no vertex data (a truncated file?)")
    body = parts[1].decode("ascii").splitlines()
    body = [line for line in body if line.strip()]
    start = 0
    for name, count, props in elements:
        if name != "vertex":
            start += count
            continue
        missing = [a for a in ("x", "y", "z") if a not in props]
        if missing:
            raise ValueError(f"{path!r}: vertex element has no property {missing}")
        lines = body[start:start + count]
        if len(lines) < count:
            raise ValueError(f"{path!r}: header declares {count} vertices, the file holds {len(lines)}")
        cols = [props.index(a) for a in ("x", "y", "z")]
        try:
            table = np.array([line.split() for line in lines], dtype=np.float64)
        except ValueError as err:
            raise ValueError(f"{path!r}: malformed vertex lines ({err})") from None
        if table.ndim != 2 or table.shape[1] != len(props):
            raise ValueError(f"{path!r}: vertex lines must have {len(props)} values each")
        return table[:, cols]
    raise AssertionError("unreachable")


def load_point_cloud(path: Union[str, os.PathLike]) -> np.ndarray:
    """A point cloud from a ``.npy`` (N x 3) or ASCII ``.ply`` file, as float64 (N, 3)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        points = np.load(path, allow_pickle=False)
    elif ext == ".ply":
        points = read_ply(path)
    else:
        raise ValueError(f"point cloud file must end in .npy or .ply, got {path!r}")
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or points.shape[0] < 2:
        raise ValueError(f"{path!r}: expected an (N, 3) point cloud with N >= 2, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError(f"{path!r}: the point cloud contains NaN or Inf values")
    return points


def scaled_volumes(points, factors: Sequence[float] = DEFAULT_FACTORS) -> np.ndarray:
    """Semantic scale (bits, ``normalize=False``) of ``points * f`` for each factor ``f``.

    Scaling about the origin or about the centroid gives the same value
    (the points are centred first).

    >>> import numpy as np
    >>> v = scaled_volumes(np.random.default_rng(0).normal(size=(50, 3)), [1, 2, 4])
    >>> bool(np.all(np.diff(v) > 0))
    True
    """
    factors = np.asarray(factors, dtype=np.float64)
    if factors.ndim != 1 or len(factors) == 0 or not np.all(np.isfinite(factors)) or np.any(factors <= 0):
        raise ValueError(f"factors must be a non-empty sequence of positive numbers, got {factors.tolist()}")
    p = torch.as_tensor(np.asarray(points, dtype=np.float64))
    return np.array([float(semantic_scale(p * float(f), normalize=False)) for f in factors])


def volume_report(factors: Sequence[float], volumes: Sequence[float], dim: int = 3) -> dict:
    """Whether the volumes rise monotonically and slowly with the factor.

    - ``monotonic``: strictly increasing in the factor.
    - ``slow``: no step adds more than ``dim`` bits per doubling of the factor
      (``max_bits_per_doubling <= dim``), the logarithmic growth the formula
      allows; a larger step means the computation is wrong.
    - ``sublinear``: the volume grows by less than the factor does
      (``volume_ratio < factor_ratio``). This one depends on the cloud's
      units: a cloud with coordinates much smaller than 1 is in the
      quadratic regime (``S ~ f^2``) of ``log det(I + f^2 A)`` at these factors.
    - ``bits_per_doubling``: least-squares slope of S against log2 f.

    >>> r = volume_report([1, 2, 4], [10.0, 12.9, 15.9])
    >>> r["monotonic"], r["slow"], r["sublinear"], round(r["bits_per_doubling"], 2)
    (True, True, True, 2.95)
    """
    f = np.asarray(factors, dtype=np.float64)
    v = np.asarray(volumes, dtype=np.float64)
    if f.shape != v.shape or f.ndim != 1 or len(f) < 2:
        raise ValueError(f"factors and volumes need the same length >= 2, got {f.shape} and {v.shape}")
    if not np.all(np.isfinite(f) & (f > 0)):  # log2 f below
        raise ValueError(f"factors must be positive and finite, got {f.tolist()}")
    if len(np.unique(f)) != len(f):  # a zero step in log2 f: NaN growth rates, a false "not monotonic"
        raise ValueError(f"factors must be distinct, got {sorted(f.tolist())}")
    order = np.argsort(f)
    f, v = f[order], v[order]
    steps = np.diff(v) / np.diff(np.log2(f))
    growth = float(v[-1] / v[0]) if v[0] > 0 else math.inf
    ratio = float(f[-1] / f[0])
    return {
        "monotonic": bool(np.all(np.diff(v) > 0)),
        "slow": bool(np.all(steps <= dim * (1 + 1e-9))),
        "sublinear": bool(growth < ratio),
        "volume_ratio": growth,
        "factor_ratio": ratio,
        "bits_per_doubling": float(np.polyfit(np.log2(f), v, 1)[0]),
        "max_bits_per_doubling": float(steps.max()),
        "dim": int(dim),
    }
