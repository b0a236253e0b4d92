"""dsb_weights against a hand-written loop of DEFINITIONS.md's rules, and
class_balanced_weights against Cui et al.'s formula written here."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pml_dsb import class_balanced_weights, dsb_weights


# ------------------------------------------------------------------ dsb_weights
@pytest.mark.parametrize("normalize", ["mean", None])
@pytest.mark.parametrize(
    "scales,counts",
    [
        ([1.0, 2.0, 4.0, 0.5], [5, 3, 9, 2]),  # all have a scale
        ([1.0, 2.0, 0.0, 3.0], [5, 5, 1, 0]),  # one-sample and empty classes
        ([1.0, 2.5, 7.0, 3.0], [5, 1, 4, 2]),  # positive S but one sample: no scale
        ([1e-13, 1e-12, 2.0, 0.25], [4, 4, 4, 4]),  # S <= eps (1e-12 included)
        ([0.0, 0.0, 0.0], [3, 1, 0]),  # nobody has a scale
        ([5.0, 0.0], [1, 1]),
    ],
    ids=["all", "empty-and-single", "single-with-S", "tiny-S", "none", "single-only"],
)
def test_dsb_weights_match_loop(np_ref, normalize, scales, counts):
    got = dsb_weights(torch.tensor(scales, dtype=torch.float64), torch.tensor(counts), normalize=normalize)
    assert got.dtype == torch.float64 and got.shape == (len(scales),)
    np.testing.assert_allclose(got.numpy(), np_ref.dsb_weights(scales, counts, normalize), rtol=1e-14)


def test_dsb_weights_hand_values():
    # raw 1/S = [1, 0.5, 0.25]; mean 7/12; class 3 has one sample -> the largest
    got = dsb_weights(torch.tensor([1.0, 2.0, 4.0, 9.0]), torch.tensor([2, 2, 2, 1]))
    want = np.array([1.0, 0.5, 0.25, 1.0]) / (1.75 / 3)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-14)
    raw = dsb_weights(torch.tensor([1.0, 2.0, 4.0, 9.0]), torch.tensor([2, 2, 2, 1]), normalize=None)
    np.testing.assert_allclose(raw.numpy(), [1.0, 0.5, 0.25, 1.0], rtol=1e-15)


@pytest.mark.parametrize("scale,classes", [(5.1, 3), (0.3, 7), (2.9, 7)])
def test_dsb_weights_of_equal_scales_are_exactly_one(scale, classes):
    # 1/S divided by its mean rounds one ulp away from 1 at these values; a
    # class without a scale gets the largest weight, 1, too
    scales = torch.full((classes + 1,), scale, dtype=torch.float64)
    counts = torch.tensor([3] * classes + [1])
    assert torch.equal(dsb_weights(scales, counts), torch.ones(classes + 1, dtype=torch.float64))


@pytest.mark.parametrize("normalize", ["mean", None])
def test_dsb_weights_subnormal_scale_with_zero_eps_counts_as_no_scale(normalize):
    # 1/1e-320 overflows: that class gets the largest weight of the others, as without a scale
    got = dsb_weights(torch.tensor([1e-320, 1.0, 2.0], dtype=torch.float64), torch.tensor([3, 3, 3]),
                      normalize=normalize, eps=0.0)
    want = dsb_weights(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), torch.tensor([3, 3, 3]),
                       normalize=normalize, eps=0.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_dsb_weights_all_ones_without_any_scale():
    got = dsb_weights(torch.zeros(4), torch.tensor([0, 1, 5, 1]))
    assert torch.equal(got, torch.ones(4, dtype=torch.float64))


def test_dsb_weights_accept_float32_scales(np_ref):
    scales = torch.tensor([0.3, 1.7, 2.9], dtype=torch.float32)
    got = dsb_weights(scales, torch.tensor([2, 3, 4]))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), np_ref.dsb_weights(scales.double().numpy(), [2, 3, 4]), rtol=1e-14)


@settings(max_examples=40, deadline=None, database=None)
@given(
    data=st.lists(
        st.tuples(
            st.one_of(st.just(0.0), st.floats(1e-6, 50.0), st.floats(0.0, 2e-12)),
            st.integers(0, 6),
        ),
        min_size=1,
        max_size=12,
    ),
    normalize=st.sampled_from(["mean", None]),
)
def test_dsb_weights_hypothesis(np_ref, data, normalize):
    scales = [s for s, _ in data]
    counts = [n for _, n in data]
    got = dsb_weights(torch.tensor(scales, dtype=torch.float64), torch.tensor(counts), normalize=normalize)
    want = np_ref.dsb_weights(scales, counts, normalize)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    has = np.array([n >= 2 and s > 1e-12 for s, n in data])
    if normalize == "mean" and has.any():
        assert got.numpy()[has].mean() == pytest.approx(1.0, rel=1e-12)
    if has.any() and not has.all():
        assert np.all(got.numpy()[~has] == got.numpy().max())


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        (dict(scales=torch.ones(3), counts=torch.ones(4, dtype=torch.long)), ValueError, "counts"),
        (dict(scales=torch.ones(2, 2), counts=torch.ones(2, 2, dtype=torch.long)), ValueError, "(C,)"),
        (dict(scales=torch.ones(3), counts=torch.ones(3, dtype=torch.long), normalize="sum"), ValueError, "'sum'"),
        (dict(scales=torch.ones(3), counts=torch.full((3,), 2), eps=-1.0), ValueError, "eps must be a finite number >= 0"),
        (dict(scales=torch.ones(3), counts=torch.full((3,), 2), eps=float("nan")), ValueError, "got nan"),
        (dict(scales=torch.tensor([1.0, float("nan"), 2.0]), counts=torch.full((3,), 2)), ValueError,
         "scales must be finite, got [nan] (classes [1])"),
        # +inf took weight 0: that class's loss silently dropped
        (dict(scales=torch.tensor([float("inf"), 1.0]), counts=torch.full((2,), 2)), ValueError,
         "scales must be finite, got [inf] (classes [0])"),
        (dict(scales=torch.ones(2), counts=torch.tensor([2, -1])), ValueError, "counts must be whole numbers >= 0"),
        (dict(scales=torch.ones(2), counts=torch.tensor([2.0, float("nan")])), ValueError, "counts must be whole numbers"),
        (dict(scales=[1.0, 2.0], counts=torch.full((2,), 2)), TypeError, "scales must be a torch.Tensor, got list"),
    ],
    ids=["length", "2-D", "normalize", "eps<0", "eps-nan", "nan-scale", "inf-scale", "negative-count", "nan-count",
         "list"],
)
def test_dsb_weights_bad_arguments(kwargs, exc, word):
    with pytest.raises(exc) as info:
        dsb_weights(**kwargs)
    assert word in str(info.value)


# --------------------------------------------------------- class_balanced_weights
def _cb_reference(counts, beta):
    """w_c = (1 - beta) / (1 - beta**n_c), scaled to sum to C (Cui et al. 2019)."""
    w = [(1.0 - beta) / (1.0 - beta ** int(n)) for n in counts]
    total = sum(w)
    return np.array([x * len(w) / total for x in w])


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.999, 0.9999])
@pytest.mark.parametrize(
    "counts", [[100, 10], [500, 200, 50, 5, 1], [7, 7, 7], [1]], ids=["two", "long-tail", "equal", "one"]
)
def test_class_balanced_weights_match_formula(counts, beta):
    got = class_balanced_weights(counts, beta=beta)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), _cb_reference(counts, beta), rtol=1e-12)
    assert float(got.sum()) == pytest.approx(len(counts), rel=1e-12)


def test_class_balanced_default_beta_and_tensor_input():
    counts = torch.tensor([1280, 40, 5])
    np.testing.assert_allclose(class_balanced_weights(counts).numpy(), _cb_reference(counts.tolist(), 0.9999), rtol=1e-12)
    # float counts holding whole numbers are accepted
    np.testing.assert_allclose(
        class_balanced_weights(torch.tensor([3.0, 9.0]), 0.9).numpy(), _cb_reference([3, 9], 0.9), rtol=1e-12
    )


def test_class_balanced_limits():
    assert torch.equal(class_balanced_weights([1, 10, 100], beta=0.0), torch.ones(3, dtype=torch.float64))
    w = class_balanced_weights([1, 10, 100], beta=0.9)
    assert w[0] > w[1] > w[2]


@pytest.mark.parametrize(
    "counts,beta,exc,word",
    [
        ([5, 0, 3], 0.9, ValueError, "counts"),
        ([5, -2], 0.9, ValueError, "counts"),
        ([2.5, 3.0], 0.9, TypeError, "counts"),
        ([], 0.9, ValueError, "counts"),
        ([[1, 2], [3, 4]], 0.9, ValueError, "counts"),
        ([5, 3], 1.0, ValueError, "beta"),
        ([5, 3], -0.1, ValueError, "beta"),
        ([5, 3], 1.5, ValueError, "beta"),
        ([5, 3], float("nan"), ValueError, "beta"),
        (torch.tensor([True, True]), 0.9, TypeError, "torch.bool"),
        ([5, 3], "0.9", ValueError, "beta must be a number in [0, 1), got '0.9'"),  # a bare '<=' TypeError
        ([5, 3], None, ValueError, "beta must be a number"),
        (None, 0.9, TypeError, "counts must be a sequence or tensor of whole numbers, got None"),
        ([3, float("inf")], 0.9, TypeError, "counts must be whole numbers"),  # was accepted
    ],
    ids=["zero", "negative", "fractional", "empty", "2-D", "beta=1", "beta<0", "beta>1", "beta=nan", "bool",
         "beta-str", "beta-none", "counts-none", "counts-inf"],
)
def test_class_balanced_bad_arguments(counts, beta, exc, word):
    with pytest.raises(exc) as info:
        class_balanced_weights(counts, beta=beta)
    assert word in str(info.value)


def test_whole_float_counts_are_counts():
    scales = torch.tensor([1.0, 2.0, 0.5])
    assert torch.equal(dsb_weights(scales, torch.tensor([5.0, 5.0, 1.0])), dsb_weights(scales, torch.tensor([5, 5, 1])))
