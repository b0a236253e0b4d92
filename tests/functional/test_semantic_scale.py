"""semantic_scale, class_semantic_scales and padded_class_scales against a float64
numpy implementation of DEFINITIONS.md's formula (``np_ref`` in tests/conftest.py):

    S = 0.5 * log2 det(I_d + (d/m) Zc Zc^T)      (d x d, np.linalg.slogdet)
      = 0.5 * log2 det(I_m + (d/m) Zc^T Zc)      (Sylvester, m x m)
"""
import math
import textwrap

import numpy as np
import pytest
from thread_testlib import run_with_two_threads
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pml_dsb import class_semantic_scales, semantic_scale
from pml_dsb.functional import padded_class_scales, unnormalized_norm_limit

RTOL = 1e-10  # the package computes in float64, like the reference


def _randn(gen, m, d, dtype=torch.float32):
    return torch.randn(m, d, generator=gen, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------- random data
@pytest.mark.parametrize(
    "m,d",
    [(2, 3), (5, 8), (12, 4), (6, 6), (7, 1), (16, 16), (3, 16), (40, 5)],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("normalize", [True, False], ids=["l2", "raw"])
def test_matches_numpy_reference(gen, np_ref, float_dtype, m, d, normalize):
    x = _randn(gen, m, d, float_dtype)
    got = semantic_scale(x, normalize=normalize)
    want = np_ref.semantic_scale(x.double().numpy(), normalize)
    assert got.dtype == torch.float64 and got.shape == ()
    assert want > 0
    np.testing.assert_allclose(float(got), want, rtol=RTOL)


@pytest.mark.parametrize("m,d", [(4, 9), (9, 4), (7, 7)], ids=["m<d", "m>d", "m==d"])
def test_sylvester_gram_and_covariance_forms_agree(gen, np_ref, m, d):
    x = _randn(gen, m, d, torch.float64).numpy()
    dxd = np_ref.semantic_scale(x, form="dxd")
    mxm = np_ref.semantic_scale(x, form="mxm")
    np.testing.assert_allclose(dxd, mxm, rtol=1e-12)
    got = float(semantic_scale(torch.from_numpy(x)))
    np.testing.assert_allclose(got, dxd, rtol=RTOL)
    np.testing.assert_allclose(got, mxm, rtol=RTOL)


def test_default_is_l2_normalised(gen):
    x = _randn(gen, 6, 4)
    rows = x * torch.tensor([[0.5], [3.0], [1.0], [7.0], [0.1], [2.0]])
    assert float(semantic_scale(rows)) == pytest.approx(float(semantic_scale(x)), rel=1e-6)
    assert float(semantic_scale(rows, normalize=False)) != pytest.approx(
        float(semantic_scale(x, normalize=False)), rel=1e-3
    )


# ------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("m", [0, 1])
@pytest.mark.parametrize("normalize", [True, False], ids=["l2", "raw"])
def test_fewer_than_two_samples_is_zero(gen, m, normalize):
    got = semantic_scale(_randn(gen, m, 5), normalize=normalize)
    assert got.dtype == torch.float64
    assert float(got) == 0.0


@pytest.mark.parametrize("normalize", [True, False], ids=["l2", "raw"])
def test_identical_rows_have_zero_scale(gen, normalize):
    x = _randn(gen, 1, 6).repeat(5, 1)
    assert abs(float(semantic_scale(x, normalize=normalize))) < 1e-12


def test_positive_multiples_of_one_vector_have_zero_scale_when_normalised(gen):
    v = _randn(gen, 1, 6, torch.float64)
    x = v * torch.tensor([[1.0], [2.0], [0.25], [8.0]], dtype=torch.float64)
    assert abs(float(semantic_scale(x))) < 1e-12
    assert float(semantic_scale(x, normalize=False)) > 0.1


def test_duplicate_rows_match_numpy(gen, np_ref):
    x = _randn(gen, 4, 6, torch.float64)
    x = torch.cat([x, x[:2], x[:1]])  # 7 rows, 3 duplicated
    np.testing.assert_allclose(float(semantic_scale(x)), np_ref.semantic_scale(x.numpy()), rtol=RTOL)


@pytest.mark.parametrize("m", [5, 20], ids=["m<d", "m>d"])
def test_rank_deficient_features_match_numpy(gen, np_ref, m):
    basis = _randn(gen, 2, 8, torch.float64)
    x = _randn(gen, m, 2, torch.float64) @ basis  # rank 2 in d = 8
    for normalize in (True, False):
        np.testing.assert_allclose(
            float(semantic_scale(x, normalize=normalize)),
            np_ref.semantic_scale(x.numpy(), normalize),
            rtol=RTOL,
        )


# Powers of two scale floats exactly, so the normalised vectors, hence S, are
# unchanged bit for bit in exact arithmetic.
@pytest.mark.parametrize(
    "dtype,exponent",
    [(torch.float32, 100), (torch.float32, -100), (torch.float32, -45),
     (torch.float64, 300), (torch.float64, -300), (torch.float64, -45),
     # squares beyond float64's range (overflow to inf, underflow to subnormals)
     (torch.float64, 1000), (torch.float64, -1000), (torch.float64, -530)],
    ids=lambda v: str(v),
)
def test_normalised_scale_is_invariant_to_huge_and_tiny_norms(gen, np_ref, dtype, exponent):
    x = _randn(gen, 6, 5, dtype)
    scaled = x * (2.0 ** exponent)
    assert torch.isfinite(scaled).all() and (scaled != 0).all()
    want = np_ref.semantic_scale(x.double().numpy())
    np.testing.assert_allclose(float(semantic_scale(scaled)), want, rtol=1e-12)
    # float32 statistics of float64 rows beyond float32's range: normalised first
    mask = torch.ones(1, 6, dtype=torch.bool)
    np.testing.assert_allclose(float(padded_class_scales(scaled[None].double(), mask, dtype=torch.float32)), want,
                               rtol=1e-5)


@pytest.mark.parametrize("exponent", [30, 10, -10, -20], ids=lambda v: f"2^{v}")
def test_unnormalised_scale_matches_numpy_at_large_and_small_norms(gen, np_ref, exponent):
    x = _randn(gen, 6, 5, torch.float32) * (2.0 ** exponent)
    want = np_ref.semantic_scale(x.double().numpy(), normalize=False)
    np.testing.assert_allclose(float(semantic_scale(x, normalize=False)), want, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("exponent", [27, 38], ids=lambda v: f"2^{v}")
def test_unnormalised_huge_rank_deficient_classes_match_singular_values(gen, np_ref, exponent):
    """Where huge features leave directions without spread (centring's in the
    m x m form, a low-rank class's in the d x d form), float64 rounding once
    swallowed their unit eigenvalues: scales drifted, then the factorisation
    failed. Such classes take Zc's singular values, beside ordinary ones;
    within 1e-6 nats per direction up to the norm limit."""
    big = 2.0**exponent
    few = _randn(gen, 3, 4, torch.float64) * big  # m x m form, one null direction
    flat = _randn(gen, 8, 2, torch.float64) @ _randn(gen, 2, 4, torch.float64) * big  # rank 2 in d = 4
    plain = _randn(gen, 3, 4, torch.float64)  # beside them, in the same buckets
    features = torch.cat([few, flat, plain, plain[:2] + 1.0])
    labels = torch.tensor([0] * 3 + [1] * 8 + [2] * 3 + [3] * 2)
    got = class_semantic_scales(features, labels, 4, normalize=False)
    want = [np_ref.semantic_scale(features[labels == c].numpy(), normalize=False, form="svd") for c in range(4)]
    assert float(features.norm(dim=1).max()) < unnormalized_norm_limit(4)  # precondition
    atol = 4 * 1e-6 / math.log(2)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=atol)
    np.testing.assert_allclose(float(semantic_scale(few, normalize=False)), want[0], rtol=0, atol=atol)


@pytest.mark.parametrize("d,norm", [(4, 1.6e12), (16, 8e11)], ids=["d=4", "d=16"])
def test_unnormalised_norms_up_to_1e3_over_eps_sqrt_d_are_resolved(gen, np_ref, d, norm):
    """The limit is where the rounding of Zc, eps * norm, reaches 1e-3 / sqrt(d):
    ~2.25e12 at d = 4, ~1.13e12 at d = 16. Rows of norm 0.7 of that (beyond a
    limit taken with d instead of sqrt(d)) are accepted and resolved within
    1e-6 nats per direction (numpy's singular values in float64)."""
    assert norm < 0.75 * 1e-3 / (np.finfo(np.float64).eps * math.sqrt(d))
    few = _randn(gen, 3, d, torch.float64)  # m x m form: one direction without spread
    x = few / few.norm(dim=1, keepdim=True) * norm
    want = np_ref.semantic_scale(x.numpy(), normalize=False, form="svd")
    atol = min(3, d) * 1e-6 / math.log(2)
    np.testing.assert_allclose(float(semantic_scale(x, normalize=False)), want, rtol=0, atol=atol)
    got = class_semantic_scales(x, torch.zeros(3, dtype=torch.long), 1, normalize=False)
    np.testing.assert_allclose(got.numpy(), [want], rtol=0, atol=atol)


def test_unnormalised_features_float64_cannot_resolve_raise(gen):
    """Past the limit the rounding of Zc itself outweighs the identity term:
    no float64 method gives S there, so every entry point says so."""
    x = _randn(gen, 3, 4, torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * unnormalized_norm_limit(4) * 1.01
    labels = torch.tensor([0, 0, 0])
    for call in (lambda: semantic_scale(x, normalize=False),
                 lambda: class_semantic_scales(x, labels, 1, normalize=False),
                 lambda: padded_class_scales(x.unsqueeze(0), torch.ones(1, 3, dtype=torch.bool), normalize=False)):
        with pytest.raises(ValueError, match=r"features reach norm .* only for norms up to .* at d=4"):
            call()
    assert float(semantic_scale(x * 0.98, normalize=False)) > 0  # below it: a scale
    assert float(semantic_scale(x)) > 0  # normalised: no limit


@pytest.mark.parametrize("m,d", [(5, 8), (12, 4)], ids=["m<d", "m>d"])
@pytest.mark.parametrize("normalize", [True, False], ids=["l2", "raw"])
def test_half_precision_inputs_match_numpy_on_upcast_values(gen, np_ref, half_dtype, m, d, normalize):
    x = _randn(gen, m, d).to(half_dtype)
    got = semantic_scale(x, normalize=normalize)
    assert got.dtype == torch.float64
    want = np_ref.semantic_scale(x.double().numpy(), normalize)
    np.testing.assert_allclose(float(got), want, rtol=RTOL)


@settings(max_examples=30, deadline=None, database=None)
@given(
    m=st.integers(0, 12),
    d=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
    exponent=st.integers(-8, 8),
    normalize=st.booleans(),
)
def test_hypothesis_matches_numpy(np_ref, m, d, seed, exponent, normalize):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g, dtype=torch.float64) * (2.0 ** exponent)
    got = float(semantic_scale(x, normalize=normalize))
    want = np_ref.semantic_scale(x.numpy(), normalize)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert got >= -1e-12


@pytest.mark.parametrize("m,d", [(4, 3), (3, 5)], ids=["m>d", "m<d"])
@pytest.mark.parametrize("normalize", [True, False], ids=["l2", "raw"])
def test_gradcheck_float64(gen, m, d, normalize):
    x = _randn(gen, m, d, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: semantic_scale(z, normalize=normalize), (x,))


@pytest.mark.parametrize("normalize", [True, False], ids=["l2", "raw"])
def test_gradcheck_class_scales_float64(gen, normalize):
    # classes in both spaces (3 samples < d = 4 < 6 samples), a single sample
    # (scale 0, no gradient) and an empty class, in one batched call
    x = _randn(gen, 10, 4, torch.float64).requires_grad_()
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 2])
    assert torch.autograd.gradcheck(lambda z: class_semantic_scales(z, labels, 4, normalize=normalize), (x,))


def test_gradcheck_padded_class_scales_float64(gen):
    x = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([[True, True, False, True, False], [True, True, True, True, True]])
    assert torch.autograd.gradcheck(lambda z: padded_class_scales(z, mask), (x,))


def test_gradient_flows_to_input(gen):
    x = _randn(gen, 5, 3).requires_grad_()
    semantic_scale(x).backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0


def test_fewer_than_two_samples_give_zero_gradients(gen):
    # S = 0 for m < 2 is still a function of the features: backward() works
    x = _randn(gen, 3, 4, torch.float64).requires_grad_()
    semantic_scale(x[:1]).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    y = _randn(gen, 3, 4, torch.float64).requires_grad_()
    class_semantic_scales(y, torch.tensor([0, 1, 2]), 4).sum().backward()  # no class has two
    assert torch.equal(y.grad, torch.zeros_like(y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_row_gets_a_finite_gradient(gen, dtype):
    # a zero row (ReLU embeddings) stays zero when normalised; its gradient is
    # F.normalize's 1/eps, not 1/tiny**2 (inf); the other rows' gradients are
    # those of a from-scratch float64 formula in which the zero row is a constant
    x = _randn(gen, 5, 3, dtype)
    x[2] = 0
    x.requires_grad_()
    value = semantic_scale(x)
    value.backward()
    assert torch.isfinite(x.grad).all()

    rows = x.detach().double()[[0, 1, 3, 4]].requires_grad_()
    z = torch.cat([(rows / rows.norm(dim=1, keepdim=True))[:2], torch.zeros(1, 3, dtype=torch.float64),
                   (rows / rows.norm(dim=1, keepdim=True))[2:]])
    zc = z - z.mean(0)
    ref = 0.5 * torch.logdet(torch.eye(3, dtype=torch.float64) + (3 / 5) * zc.T @ zc) / math.log(2)
    ref.backward()
    np.testing.assert_allclose(float(value.detach()), float(ref.detach()), rtol=1e-6)
    np.testing.assert_allclose(x.grad[[0, 1, 3, 4]].double().numpy(), rows.grad.numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "bad,exc,words",
    [
        ([[1.0, 2.0], [3.0, 4.0]], TypeError, ["features", "list"]),
        (torch.ones(4), ValueError, ["features", "(4,)"]),
        (torch.ones(3, 2, dtype=torch.long), TypeError, ["features", "int64"]),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ValueError, ["features", "NaN"]),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), ValueError, ["features", "Inf"]),
        (torch.ones(3, 0), ValueError, ["features", "d >= 1", "(3, 0)"]),
    ],
    ids=["list", "1-D", "int", "nan", "inf", "d=0"],
)
@pytest.mark.parametrize("normalize", [True, False])
def test_bad_features_raise(bad, exc, words, normalize):
    for call in (
        lambda: semantic_scale(bad, normalize=normalize),
        lambda: class_semantic_scales(bad, torch.zeros(len(bad), dtype=torch.long), 2, normalize=normalize),
    ):
        with pytest.raises(exc) as info:
            call()
        for w in words:
            assert w in str(info.value)


@pytest.mark.parametrize("d", [0, -3, 2.5, True])
def test_unnormalized_norm_limit_needs_a_dimension(d):
    with pytest.raises(ValueError, match=f"embedding_size must be an int >= 1, got {d!r}"):
        unnormalized_norm_limit(d)


# ------------------------------------------------------ class_semantic_scales
def _imbalanced_labels(gen, sizes):
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(sizes)])
    return labels[torch.randperm(len(labels), generator=gen)]


@pytest.mark.parametrize("normalize", [True, False], ids=["l2", "raw"])
def test_class_scales_equal_per_class_semantic_scale(gen, np_ref, normalize):
    # sizes spread over several size buckets, with empty and one-sample classes
    sizes = [2, 3, 5, 9, 20, 0, 1, 33, 6]
    d = 6
    labels = _imbalanced_labels(gen, sizes)
    x = _randn(gen, len(labels), d)
    got = class_semantic_scales(x, labels, len(sizes), normalize=normalize)
    assert got.shape == (len(sizes),) and got.dtype == torch.float64
    per_class = torch.stack([semantic_scale(x[labels == c], normalize=normalize) for c in range(len(sizes))])
    torch.testing.assert_close(got, per_class, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got.numpy(), np_ref.class_scales(x.double().numpy(), labels.numpy(), len(sizes), normalize), rtol=RTOL)
    assert got[5] == 0 and got[6] == 0


def test_class_scales_accept_int32_labels_and_extra_classes(gen, np_ref):
    labels = torch.tensor([0, 0, 0, 2, 2, 1, 2], dtype=torch.int32)
    x = _randn(gen, 7, 3)
    got = class_semantic_scales(x, labels, 5)
    np.testing.assert_allclose(got.numpy(), np_ref.class_scales(x.double().numpy(), labels.numpy(), 5), rtol=RTOL)
    assert got[3] == 0 and got[4] == 0 and got[1] == 0


@pytest.mark.parametrize(
    "labels,exc,words",
    [
        (torch.tensor([0, 1, 3]), ValueError, ["labels", "3"]),
        (torch.tensor([0, -1, 1]), ValueError, ["labels", "-1"]),
        (torch.tensor([0.0, 1.0, 1.0]), TypeError, ["labels", "float32"]),
        (torch.tensor([True, False, True]), TypeError, ["labels", "bool"]),
        (torch.tensor([0, 1]), ValueError, ["labels", "(2,)"]),
    ],
    ids=["too-large", "negative", "float", "bool", "length"],
)
def test_class_scales_reject_bad_labels(gen, labels, exc, words):
    with pytest.raises(exc) as info:
        class_semantic_scales(_randn(gen, 3, 2), labels, 3)
    for w in words:
        assert w in str(info.value)


def test_class_scales_accept_numpy_integer_num_classes(gen):
    x, labels = _randn(gen, 6, 3), torch.tensor([0, 0, 1, 1, 1, 0])
    num_classes = np.asarray(labels).max() + 1  # np.int64
    assert torch.equal(class_semantic_scales(x, labels, num_classes), class_semantic_scales(x, labels, 2))


@pytest.mark.parametrize("num_classes", [0, True, 2.0, "3"], ids=str)
def test_class_scales_reject_bad_num_classes(gen, num_classes):
    with pytest.raises(ValueError, match=f"num_classes must be a positive int, got {num_classes!r}"):
        class_semantic_scales(_randn(gen, 3, 2), torch.tensor([0, 1, 1]), num_classes)


@pytest.mark.parametrize("normalize", [True, False], ids=["l2", "raw"])
def test_padded_class_scales_masked_nan_rows_get_zero_gradients(gen, normalize):
    x = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64)
    x[0, 3], x[1, 2:] = float("nan"), float("inf")
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    x.requires_grad_(True)
    padded_class_scales(x, mask, normalize=normalize).sum().backward()
    assert bool(torch.isfinite(x.grad[mask]).all()) and bool((x.grad[mask] != 0).any())
    assert bool((x.grad[~mask] == 0).all())


def test_padded_class_scales_ignore_masked_rows(gen, np_ref):
    sizes = [4, 2, 7, 1, 0]
    n, d = 7, 3
    block = torch.randn(len(sizes), n, d, generator=gen, dtype=torch.float64) * 100.0  # garbage
    mask = torch.arange(n).unsqueeze(0) < torch.tensor(sizes).unsqueeze(1)
    block[0, 5], block[2, 6:] = float("nan"), float("inf")  # in masked-out rows: ignored too
    mask[2, 6] = False
    sizes[2] = 6
    got = padded_class_scales(block, mask)
    want = [np_ref.semantic_scale(block[i, : sizes[i]].numpy()) for i in range(len(sizes))]
    np.testing.assert_allclose(got.numpy(), want, rtol=RTOL)


# ------------------------------------------------ 2 threads, n >= 256: no hang
_HANG_SCRIPT = textwrap.dedent(
    """
    import json, torch
    torch.set_num_threads(2)
    from pml_dsb import SemanticScaleMemory, semantic_scale
    from pml_dsb.functional import padded_class_scales, unnormalized_norm_limit
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 300, generator=g)
    y = torch.randn(300, 256, generator=g)
    labels = torch.zeros(300, dtype=torch.long)
    # the memory's own paths: class 0 in d x d form (300 > gram_size), class 1 in a 270 x 270 Gram form
    mem = SemanticScaleMemory(2, 300, 570, gram_size=280)
    mem.enqueue(x, labels)
    mem.enqueue(torch.randn(270, 300, generator=g), torch.ones(270, dtype=torch.long))
    z, zl = mem.contents()
    out = {
        "memory": mem.scales().tolist(),
        "threads": torch.get_num_threads(),
        "square": float(semantic_scale(x)),
        "d256": float(semantic_scale(y)),
        "gram256": float(semantic_scale(x[:256])),
        "fp32": float(padded_class_scales(x[None], torch.ones(1, 300, dtype=torch.bool), dtype=torch.float32)[0]),
    }
    torch.save({"x": x, "y": y, "z": z, "zl": zl}, "inputs.pt")
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_no_hang_with_two_threads_on_300_by_300(np_ref, tmp_path):
    out = run_with_two_threads(_HANG_SCRIPT, tmp_path, "semantic_scale on a 300 x 300 class")
    inputs = torch.load(tmp_path / "inputs.pt")
    x, y = inputs["x"].double().numpy(), inputs["y"].double().numpy()
    np.testing.assert_allclose(out["square"], np_ref.semantic_scale(x), rtol=1e-10)
    np.testing.assert_allclose(out["d256"], np_ref.semantic_scale(y), rtol=1e-10)
    np.testing.assert_allclose(out["gram256"], np_ref.semantic_scale(x[:256]), rtol=1e-10)
    np.testing.assert_allclose(out["fp32"], np_ref.semantic_scale(x), rtol=1e-5)
    z, zl = inputs["z"].double().numpy(), inputs["zl"].numpy()
    np.testing.assert_allclose(out["memory"], np_ref.class_scales(z, zl, 2, normalize=False), rtol=1e-6)


# ------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("normalize", [True, False], ids=["l2", "raw"])
def test_cuda_matches_numpy(gen, np_ref, normalize):
    x = _randn(gen, 9, 5)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 0])
    got = semantic_scale(x.cuda(), normalize=normalize)
    assert got.device.type == "cuda"
    np.testing.assert_allclose(float(got), np_ref.semantic_scale(x.double().numpy(), normalize), rtol=1e-9)
    per_class = class_semantic_scales(x.cuda(), labels.cuda(), 3, normalize=normalize)
    assert per_class.device.type == "cuda"
    np.testing.assert_allclose(
        per_class.cpu().numpy(), np_ref.class_scales(x.double().numpy(), labels.numpy(), 3, normalize), rtol=1e-9
    )


def _float32_only_failure():
    """A float32 matrix whose float32 Cholesky fails while float64 succeeds on
    the same values (rank one plus 1e-7 I: rounding decides), found by scanning
    seeds and checked with LAPACK directly, factorising either triangle."""
    from scipy.linalg import lapack

    for seed in range(200):
        v = torch.randn(6, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        matrix = (v @ v.T + 1e-7 * torch.eye(6, dtype=torch.float64)).float()
        fails32 = all(lapack.spotrf(matrix.numpy().copy(), lower=lower)[1] != 0 for lower in (0, 1))
        if fails32 and lapack.dpotrf(matrix.double().numpy().copy())[1] == 0:
            return matrix
    raise AssertionError("no float32-only Cholesky failure among 200 seeds")


def test_logdet_spd_redoes_a_float32_failure_in_float64_from_the_untouched_input():
    from pml_dsb.functional.semantic_scale import logdet_spd

    batch = torch.stack([2 * torch.eye(6), _float32_only_failure()])
    before = batch.clone()
    got = logdet_spd(batch)
    assert torch.equal(batch, before)  # the input is not factorised in place
    want = torch.logdet(before.double())  # the first matrix's result is not garbage either
    assert torch.allclose(got.double(), want, rtol=1e-9)
    with pytest.raises(torch.linalg.LinAlgError):
        logdet_spd(batch.clone(), overwrite=True)  # no original left to redo from


@pytest.mark.parametrize("path", ["lapack", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logdet_spd_sizes_give_the_leading_blocks_log_det(path, dtype):
    """``sizes`` asks for each matrix's leading block; the reference is numpy's
    slogdet of that block, cut out in float64. The trailing parts are not
    identity blocks here, so a result that factorised the whole matrix differs."""
    from pml_dsb.functional.semantic_scale import logdet_spd

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, 9, generator=g, dtype=torch.float64)
    batch = (x @ x.transpose(1, 2) + 0.5 * torch.eye(9, dtype=torch.float64)).to(dtype)
    sizes = torch.tensor([9, 5, 1, 0])
    if path == "torch":
        batch.requires_grad_(True)  # autograd inputs take torch's Cholesky path
    got = logdet_spd(batch, sizes=sizes)
    blocks = [batch.detach().double()[k, :n, :n].numpy() for k, n in enumerate(sizes.tolist())]
    want = [np.linalg.slogdet(block)[1] if block.size else 0.0 for block in blocks]
    np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=1e-5 if dtype == torch.float32 else 1e-12)
    assert not np.isclose(want[1], np.linalg.slogdet(batch.detach().double()[1].numpy())[1])


@pytest.mark.parametrize("path", ["lapack", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logdet_spd_either_triangle_gives_the_log_det(dtype, path):
    """The LAPACK path factorises the lower triangle of small matrices and the
    upper one of large ones (whichever is faster): sizes either side of both
    switches (128 in float64, 256 in float32), against numpy's float64 slogdet.
    The torch path (autograd, or a GPU) pads sizes 128 and 256 with an identity
    block (MKL is slow at exactly those), which must leave the log det as it is;
    its gradient is the inverse."""
    from pml_dsb.functional.semantic_scale import logdet_spd

    g = torch.Generator().manual_seed(5)
    for n in (127, 128, 255, 256):
        x = torch.randn(2, n, n // 2, generator=g, dtype=torch.float64)
        batch = (torch.eye(n, dtype=torch.float64) + (2 / n) * x @ x.transpose(1, 2)).to(dtype)
        batch.requires_grad_(path == "torch")
        got = logdet_spd(batch)
        want = [np.linalg.slogdet(m.detach().double().numpy())[1] for m in batch]
        rtol = 1e-5 if dtype == torch.float32 else 1e-12
        np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=rtol)
        if path == "torch" and n == 128:
            got.sum().backward()
            inverse = np.linalg.inv(batch.detach().double().numpy())
            atol = 1e-4 if dtype == torch.float32 else 1e-10
            np.testing.assert_allclose(batch.grad.double().numpy(), inverse, atol=atol)


def test_logdet_spd_rejects_bad_sizes():
    from pml_dsb.functional.semantic_scale import logdet_spd

    batch = torch.eye(3).expand(2, 3, 3).contiguous()
    for sizes in (torch.tensor([3]), torch.tensor([3, 4]), torch.tensor([-1, 2]), torch.tensor([2.0, 3.0])):
        with pytest.raises(ValueError, match="sizes must be an integer tensor of the batch shape"):
            logdet_spd(batch, sizes=sizes)


@pytest.mark.parametrize(
    "call, exc, words",
    [
        # "no" read as true, None as false
        (lambda z: semantic_scale(z, normalize="no"), TypeError, "normalize must be True or False, got 'no'"),
        (lambda z: semantic_scale(z, normalize=0), TypeError, "normalize must be True or False, got 0"),
        (lambda z: class_semantic_scales(z, torch.tensor([0, 0, 1, 1]), 2, normalize=None), TypeError, "normalize"),
        # padded_class_scales had no checks: NaN came back as a scale, integer dtypes as 0
        (lambda z: padded_class_scales(z.unsqueeze(0).clone().index_fill_(1, torch.tensor([0]), float("nan")),
                                       torch.ones(1, 4, dtype=torch.bool)), ValueError, "NaN or Inf values in rows"),
        (lambda z: padded_class_scales(z.unsqueeze(0).long(), torch.ones(1, 4, dtype=torch.bool)), TypeError,
         "features must be a floating (t, n, d) tensor"),
        (lambda z: padded_class_scales(z.unsqueeze(0), torch.ones(1, 4, dtype=torch.long)), TypeError,
         "mask must be a bool tensor of shape (1, 4)"),
        (lambda z: padded_class_scales(z.unsqueeze(0), torch.ones(1, 4, dtype=torch.bool), dtype=torch.int64),
         ValueError, "dtype must be torch.float32 or torch.float64"),
    ],
    ids=["normalize-str", "normalize-int", "normalize-none", "nan", "int-features", "int-mask", "int-dtype"],
)
def test_bad_arguments_name_themselves(call, exc, words):
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(exc) as info:
        call(z)
    assert words in str(info.value)


def test_numpy_bools_are_bools():
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(semantic_scale(z, normalize=np.False_), semantic_scale(z, normalize=False))
