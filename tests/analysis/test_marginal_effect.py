"""Marginal effect curves: exact against per-subset semantic_scale, seeded, saturating."""
import numpy as np
import pytest
import torch

import pml_dsb
from pml_dsb.analysis import class_marginal_curves, marginal_effect_curve, marginal_sizes, saturation_summary


@pytest.fixture
def gaussian_class():
    """300 samples of an anisotropic Gaussian in d=8 (a class with a known,
    finite covariance: its scale must saturate)."""
    rng = np.random.default_rng(123)
    return rng.normal(size=(300, 8)) * np.linspace(0.5, 2.0, 8) + 3.0


@pytest.mark.parametrize("n,d", [(25, 40), (30, 6)])  # Gram-span and covariance forms
@pytest.mark.parametrize("normalize", [True, False])
def test_curve_equals_semantic_scale_of_each_subset(n, d, normalize):
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(n + d), dtype=torch.float64) * 2 + 1
    curve = marginal_effect_curve(z, repeats=3, seed=7, normalize=normalize, label=4)
    # the documented draw: nested prefixes of permutations from default_rng([seed, label])
    perms = np.argsort(np.random.default_rng([7, 4]).random((3, n)), axis=1)
    for i, m in enumerate(curve.sizes):
        s = [float(pml_dsb.semantic_scale(z[perms[r, :m]], normalize=normalize)) for r in range(3)]
        assert curve.mean[i] == pytest.approx(np.mean(s), rel=1e-10, abs=1e-12)
        assert curve.std[i] == pytest.approx(np.std(s), rel=1e-8, abs=1e-10)
    assert curve.sizes.tolist() == list(range(2, n + 1))
    assert curve.full_scale == pytest.approx(float(pml_dsb.semantic_scale(z, normalize=normalize)), rel=1e-12)
    assert curve.std[-1] == 0.0


def test_gaussian_class_saturates(gaussian_class):
    curve = marginal_effect_curve(gaussian_class, repeats=20, seed=0, normalize=False)
    mean = curve.mean
    # increments shrink: the gain per added sample falls from window to window
    edges = [2, 12, 32, 72, 152, 300]
    slopes = [(curve.at(b) - curve.at(a)) / (b - a) for a, b in zip(edges[:-1], edges[1:])]
    assert slopes[0] > 0
    assert all(later < earlier for earlier, later in zip(slopes, slopes[1:]))
    assert curve.at(300) - curve.at(152) < 0.05 * (curve.at(12) - curve.at(2))
    # and it approaches the population value 0.5 log2 det(I + d Sigma)
    sigma = np.diag((np.linspace(0.5, 2.0, 8)) ** 2)
    limit = 0.5 * np.log2(np.linalg.det(np.eye(8) + 8 * sigma))
    assert mean[-1] == pytest.approx(limit, rel=0.05)
    rows = saturation_summary([curve])
    assert 0.9 < rows[0]["fraction_at_50"] < rows[0]["fraction_at_100"] <= 1.01


def test_seeded_and_independent_of_other_classes(gaussian_class):
    z = torch.as_tensor(gaussian_class[:60])
    a = marginal_effect_curve(z, repeats=4, seed=3, label=1)
    b = marginal_effect_curve(z, repeats=4, seed=3, label=1)
    c = marginal_effect_curve(z, repeats=4, seed=4, label=1)
    np.testing.assert_array_equal(a.mean, b.mean)
    assert not np.array_equal(a.mean, c.mean)
    labels = np.r_[np.zeros(30, int), np.ones(30, int)]
    both = class_marginal_curves(z, labels, repeats=4, seed=3)
    only = class_marginal_curves(z, labels, classes=[1], repeats=4, seed=3)
    np.testing.assert_array_equal(both[1].mean, only[0].mean)


def test_size_grid_and_saturation_points():
    sizes = marginal_sizes(500, max_points=20)
    assert sizes[0] == 2 and sizes[-1] == 500 and {50, 100} <= set(sizes.tolist())
    assert len(sizes) <= 23 and np.all(np.diff(sizes) > 0)
    z = np.random.default_rng(0).normal(size=(120, 5))
    curve = marginal_effect_curve(z, repeats=2, max_points=10)
    assert {50, 100, 120} <= set(curve.sizes.tolist())
    row = saturation_summary([curve], points=(50, 100, 200))[0]
    assert np.isfinite(row["fraction_at_100"]) and np.isnan(row["fraction_at_200"])
    assert marginal_sizes(1).tolist() == []


def test_tiny_and_invalid_inputs():
    one = marginal_effect_curve(np.ones((1, 3)), repeats=2)
    assert one.full_scale == 0.0 and len(one.sizes) == 0
    with pytest.raises(ValueError, match="repeats"):
        marginal_effect_curve(np.ones((4, 3)), repeats=0)
    with pytest.raises(ValueError, match="sizes"):
        marginal_effect_curve(np.random.rand(5, 3), sizes=[1, 3])
    with pytest.raises(ValueError, match="NaN"):
        marginal_effect_curve(np.full((4, 3), np.nan))
    with pytest.raises(TypeError, match="labels"):
        class_marginal_curves(np.random.rand(4, 3), [0.0, 1.0, 0.0, 1.0])


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("factor", [1e-13, 1e-200, 1e160])
def test_rows_of_any_norm_give_the_scale_of_their_directions(factor, dtype, rtol):
    # F.normalize's 1e-12 floor left tiny rows short of unit length, and squares
    # of rows past ~1e154 overflowed: full_scale was 0.05 or 0 for 1.28; in
    # float32 the rows were narrowed before their normalisation (inf or 0)
    z = torch.randn(6, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = marginal_effect_curve(z, repeats=2)
    got = marginal_effect_curve(z * factor, repeats=2, dtype=dtype)
    assert got.full_scale == pytest.approx(want.full_scale, rel=rtol)
    np.testing.assert_allclose(got.mean, want.mean, rtol=rtol)


def test_negative_labels_are_seeded_apart_from_the_others():
    z = np.random.default_rng(4).normal(size=(10, 3))
    curves = {c.label: c for c in class_marginal_curves(np.concatenate([z, z]), [-2] * 10 + [2] * 10, repeats=3)}
    assert sorted(curves) == [-2, 2]
    # [seed, -label, 1] for a negative label (numpy seeds are non-negative)
    perms = np.argsort(np.random.default_rng([0, 2, 1]).random((3, 10)), axis=1)
    s = [float(pml_dsb.semantic_scale(torch.as_tensor(z[perms[r, :4]]))) for r in range(3)]
    assert curves[-2].at(4) == pytest.approx(np.mean(s), rel=1e-10)
    assert curves[-2].at(4) != pytest.approx(curves[2].at(4), rel=1e-6)  # the same rows, other subsets


def test_every_size_when_the_class_has_max_points_sizes():
    """A class of n samples has n - 1 sizes 2..n: with exactly max_points of them
    the full grid is due; comparing n itself to max_points dropped size 8 of 2..9."""
    assert marginal_sizes(9, max_points=8).tolist() == list(range(2, 10))
    assert marginal_sizes(9, max_points=9).tolist() == list(range(2, 10))
    # one size more than max_points: the geometric grid, rounded, no longer every size
    assert marginal_sizes(10, max_points=8).tolist() == np.unique(np.rint(np.geomspace(2, 10, 8))).tolist()


def test_a_class_of_exactly_a_saturation_size_is_fully_saturated_there():
    """S(50) / S(n) of a class of exactly n = 50 samples is S(n) / S(n) = 1; a
    strict ``m < count`` made it NaN, as if the class had fewer than 50."""
    z = torch.randn(50, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    curve = marginal_effect_curve(z, repeats=2, max_points=4)
    row = saturation_summary([curve])[0]
    assert row["count"] == 50
    assert row["scale_at_50"] == pytest.approx(float(pml_dsb.semantic_scale(z)), rel=1e-12)
    assert row["fraction_at_50"] == pytest.approx(1.0, rel=1e-12)
    assert np.isnan(row["fraction_at_100"])


def test_a_class_without_a_scale_has_no_saturation_fraction():
    """A one-sample class has no curve and S = 0 ("no scale yet"): its scale at
    every m and its fraction are undefined (NaN), never a fraction of 0."""
    z = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    curves = class_marginal_curves(z, [0] * 6 + [1], repeats=2)
    rows = {r["label"]: r for r in saturation_summary(curves, points=(2, 6))}
    lone = rows[1]
    assert lone["count"] == 1 and lone["full_scale"] == 0.0
    assert all(np.isnan(lone[k]) for k in ("scale_at_2", "fraction_at_2", "scale_at_6", "fraction_at_6"))
    full = float(pml_dsb.semantic_scale(z[:6]))
    assert rows[0]["full_scale"] == pytest.approx(full, abs=1e-12)
    assert rows[0]["fraction_at_6"] == pytest.approx(1.0, abs=1e-12)


def test_given_sizes_always_end_with_the_whole_class():
    """sizes=(2, 3) on a class of 9: n = 9 is added, where the curve is S of
    the whole class with no spread."""
    z = torch.randn(9, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    curve = marginal_effect_curve(z, sizes=(3, 2), repeats=3, seed=0)
    assert curve.sizes.tolist() == [2, 3, 9]
    assert curve.full_scale == pytest.approx(float(pml_dsb.semantic_scale(z)), abs=1e-12)
    assert curve.std[-1] == 0.0 and curve.at(9) == curve.full_scale
