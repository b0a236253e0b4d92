"""logdet_and_inverse_spd against numpy in float64 (``np.linalg.slogdet`` and
``np.linalg.inv`` on the same values), for float64 and float32 batches, an
unbatched matrix and extra batch dimensions; the input is left unchanged, a
matrix that is not positive definite raises, and a 300 x 300 matrix with 2
threads finishes (the LAPACK path must not hang like torch's slogdet)."""
import textwrap

import numpy as np
import pytest
from thread_testlib import run_with_two_threads
import torch

from pml_dsb.functional.semantic_scale import logdet_and_inverse_spd


def _spd(gen, *shape, dtype=torch.float64, shift=0.5):
    """Random SPD matrices of shape (*batch, n, n), made in float64."""
    *batch, n = shape
    x = torch.randn(*batch, n, n, generator=gen, dtype=torch.float64)
    a = x @ x.transpose(-1, -2) / n + shift * torch.eye(n, dtype=torch.float64)
    return a.to(dtype)


def _np_reference(a):
    """float64 numpy log det and inverse of the values of ``a``."""
    values = a.double().numpy()
    sign, logdet = np.linalg.slogdet(values)
    assert np.all(sign > 0)
    return logdet, np.linalg.inv(values)


# tolerances: float64 is compared tightly; float32 results come from a float32
# factorisation of well-conditioned matrices (condition number < ~50)
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5)}


@pytest.mark.parametrize("shape", [(5, 6), (3, 1), (1, 17), (2, 3, 4)], ids=str)
def test_matches_numpy(gen, float_dtype, shape):
    a = _spd(gen, *shape, dtype=float_dtype)
    before = a.clone()
    logdet, inverse = logdet_and_inverse_spd(a)
    want_logdet, want_inverse = _np_reference(a)
    assert logdet.shape == a.shape[:-2] and inverse.shape == a.shape
    assert logdet.dtype == float_dtype and inverse.dtype == float_dtype
    np.testing.assert_allclose(logdet.double().numpy(), want_logdet, **TOL[float_dtype])
    np.testing.assert_allclose(inverse.double().numpy(), want_inverse, **TOL[float_dtype])
    # the full inverse, both triangles, exactly symmetric
    assert torch.equal(inverse, inverse.transpose(-1, -2))
    assert torch.equal(a, before)  # input unchanged


def test_unbatched_matrix(gen, float_dtype):
    a = _spd(gen, 9, dtype=float_dtype)
    before = a.clone()
    logdet, inverse = logdet_and_inverse_spd(a)
    want_logdet, want_inverse = _np_reference(a)
    assert logdet.shape == () and inverse.shape == (9, 9)
    np.testing.assert_allclose(float(logdet), want_logdet, **TOL[float_dtype])
    np.testing.assert_allclose(inverse.double().numpy(), want_inverse, **TOL[float_dtype])
    assert torch.equal(a, before)


def test_non_contiguous_input(gen):
    a = _spd(gen, 4, 6)
    view = a.transpose(-1, -2)  # same values (symmetric), not contiguous
    assert not view.is_contiguous()
    logdet, inverse = logdet_and_inverse_spd(view)
    want_logdet, want_inverse = _np_reference(a)
    np.testing.assert_allclose(logdet.numpy(), want_logdet, rtol=1e-10)
    np.testing.assert_allclose(inverse.numpy(), want_inverse, rtol=1e-10, atol=1e-12)
    assert torch.equal(view, a.transpose(-1, -2))


def test_identity_and_diagonal():
    diag = torch.tensor([1.0, 2.0, 4.0, 0.5], dtype=torch.float64)
    a = torch.stack([torch.eye(4, dtype=torch.float64), torch.diag(diag)])
    logdet, inverse = logdet_and_inverse_spd(a)
    assert torch.equal(inverse[0], torch.eye(4, dtype=torch.float64)) and float(logdet[0]) == 0.0
    np.testing.assert_allclose(inverse[1].numpy(), np.diag(1.0 / diag.numpy()), rtol=1e-15, atol=0)
    np.testing.assert_allclose(float(logdet[1]), np.log(4.0), rtol=1e-15)


@pytest.mark.parametrize("which", [0, 2])
def test_not_positive_definite_raises(gen, float_dtype, which):
    a = _spd(gen, 3, 5, dtype=float_dtype)
    a[which, 2, 2] = -1.0  # a negative diagonal entry: never positive definite
    before = a.clone()
    with pytest.raises(torch.linalg.LinAlgError):
        logdet_and_inverse_spd(a)
    assert torch.equal(a, before)


def test_singular_and_indefinite_raise(gen):
    v = torch.randn(6, 1, generator=gen, dtype=torch.float64)
    with pytest.raises(torch.linalg.LinAlgError):
        logdet_and_inverse_spd(torch.zeros(6, 6, dtype=torch.float64))
    with pytest.raises(torch.linalg.LinAlgError):
        logdet_and_inverse_spd(torch.eye(6, dtype=torch.float64) - 2 * v @ v.T / float(v.T @ v))


_THREADS_SCRIPT = textwrap.dedent(
    """
    import json, time, torch
    torch.set_num_threads(2)
    from pml_dsb.functional.semantic_scale import logdet_and_inverse_spd
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 300, generator=g, dtype=torch.float64)
    a = x @ x.T / 300 + torch.eye(300, dtype=torch.float64)
    start = time.perf_counter()
    logdet, inverse = logdet_and_inverse_spd(a)
    logdet32, inverse32 = logdet_and_inverse_spd(a.float())
    seconds = time.perf_counter() - start
    torch.save({"a": a, "inverse": inverse, "inverse32": inverse32}, "out.pt")
    print(json.dumps({
        "threads": torch.get_num_threads(), "seconds": seconds,
        "logdet": float(logdet), "logdet32": logdet32.tolist(),
    }))
    """
)


@pytest.mark.slow
def test_no_hang_with_two_threads_on_300_by_300(tmp_path):
    out = run_with_two_threads(_THREADS_SCRIPT, tmp_path, "logdet_and_inverse_spd on a 300 x 300 matrix")
    assert out["seconds"] < 60, out["seconds"]
    saved = torch.load(tmp_path / "out.pt")
    want_logdet, want_inverse = _np_reference(saved["a"])
    np.testing.assert_allclose(out["logdet"], want_logdet, rtol=1e-10)
    np.testing.assert_allclose(saved["inverse"].numpy(), want_inverse, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(out["logdet32"], want_logdet, rtol=1e-5)
    np.testing.assert_allclose(saved["inverse32"].double().numpy(), want_inverse, rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
def test_cuda_matches_numpy(gen):
    a = _spd(gen, 3, 7)
    logdet, inverse = logdet_and_inverse_spd(a.cuda())
    assert logdet.device.type == "cuda" and inverse.device.type == "cuda"
    want_logdet, want_inverse = _np_reference(a)
    np.testing.assert_allclose(logdet.cpu().numpy(), want_logdet, rtol=1e-10)
    np.testing.assert_allclose(inverse.cpu().numpy(), want_inverse, rtol=1e-9, atol=1e-12)
    with pytest.raises(torch.linalg.LinAlgError):
        logdet_and_inverse_spd(-a.cuda())
