"""Shared fixtures: seeded generators, dtypes, the gpu marker, float64 references.

Keep this small: test folders add their own helpers beside their tests.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.fixture
def gen():
    """A fresh, seeded CPU torch.Generator (libraries never seed global RNGs)."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["fp32", "fp64"])
def float_dtype(request):
    return request.param


@pytest.fixture(params=[torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def half_dtype(request):
    return request.param


# --------------------------------------------------------------------------
# float64 numpy references, written from DEFINITIONS.md (not from pml_dsb)
def _np_semantic_scale(z, normalize=True, form="dxd"):
    """S = 0.5 * log2 det(I_d + (d/m) Zc Zc^T), rows of ``z`` are the samples.

    ``form="mxm"`` uses Sylvester's I_m + (d/m) Zc^T Zc instead; ``form="svd"``
    the singular values s of Zc, 0.5 * sum log2(1 + (d/m) s^2), which keeps its
    accuracy where huge features swamp the identity term. m < 2 gives 0.
    """
    z = np.asarray(z, dtype=np.float64)
    m, d = z.shape
    if m < 2:
        return 0.0
    if normalize:
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
    zc = (z - z.mean(axis=0, keepdims=True)).T  # d x m, columns are samples
    if form == "svd":
        s = np.linalg.svd(zc, compute_uv=False)
        return 0.5 * np.log1p((d / m) * s**2).sum() / np.log(2.0)
    if form == "dxd":
        a = np.eye(d) + (d / m) * zc @ zc.T
    else:
        a = np.eye(m) + (d / m) * zc.T @ zc
    sign, logdet = np.linalg.slogdet(a)
    assert sign > 0
    return 0.5 * logdet / np.log(2.0)


def _np_class_scales(z, labels, num_classes, normalize=True):
    z = np.asarray(z, dtype=np.float64)
    labels = np.asarray(labels)
    return np.array(
        [_np_semantic_scale(z[labels == c], normalize) for c in range(num_classes)]
    )


def _loop_dsb_weights(scales, counts, normalize="mean", eps=1e-12):
    """DEFINITIONS.md "DSB weights", one class at a time."""
    has = [int(n) >= 2 and float(s) > eps for s, n in zip(scales, counts)]
    raw = [1.0 / float(s) if h else None for s, h in zip(scales, has)]
    present = [r for r in raw if r is not None]
    if not present:
        return np.ones(len(raw))
    if normalize == "mean":
        mean = sum(present) / len(present)
        raw = [r / mean if r is not None else None for r in raw]
        present = [r / mean for r in present]
    largest = max(present)
    return np.array([r if r is not None else largest for r in raw])


@pytest.fixture(scope="session")
def np_ref():
    """float64 numpy references: ``semantic_scale``, ``class_scales``, ``dsb_weights``."""
    return SimpleNamespace(
        semantic_scale=_np_semantic_scale,
        class_scales=_np_class_scales,
        dsb_weights=_loop_dsb_weights,
    )
