"""Imbalance summary: scale ratio beside the count imbalance factor, classes ranked."""
import math

import numpy as np
import pytest
from scipy import stats

from pml_dsb.analysis import imbalance_summary


def test_ratios_and_ranking():
    scales = np.array([3.0, 0.0, 1.5, 6.0])
    counts = np.array([100, 1, 10, 40])
    out = imbalance_summary(scales, counts, classes=["a", "b", "c", "d"])
    assert out["scale_ratio"] == pytest.approx(4.0)  # 6 / 1.5: the class without a scale is left out
    assert out["count_imbalance_factor"] == pytest.approx(100.0)
    assert out["num_without_scale"] == 1
    # "b" has no scale (S = 0): listed last, unranked, and out of the correlation
    assert [r["class"] for r in out["classes"]] == ["c", "a", "d", "b"]
    assert [r["scale_rank"] for r in out["classes"]] == [1, 2, 3, None]
    assert [r["count_rank"] for r in out["classes"]] == [1, 3, 2, None]
    has = scales > 0
    assert out["scale_count_spearman"] == pytest.approx(stats.spearmanr(scales[has], counts[has])[0])
    assert out["scale_count_spearman"] != pytest.approx(stats.spearmanr(scales, counts)[0])


def test_too_few_classes_with_a_scale():
    out = imbalance_summary([0.0, 2.0, 0.0], [1, 5, 1])
    assert math.isnan(out["scale_count_spearman"]) and out["num_without_scale"] == 2
    assert [r["scale_rank"] for r in out["classes"]] == [1, None, None]


def test_balanced_and_invalid():
    out = imbalance_summary([1.0, 2.0], [5, 5])
    assert out["count_imbalance_factor"] == 1.0 and math.isnan(out["scale_count_spearman"])
    with pytest.raises(ValueError, match="shape"):
        imbalance_summary([1.0, 2.0], [5])
    with pytest.raises(ValueError, match="non-negative"):
        imbalance_summary([1.0, -2.0], [5, 5])


def test_a_class_without_samples_is_left_out_of_the_count_factor():
    """max n / min n is over the classes with samples: a class of count 0 made it
    inf (50 / 0) instead of 50 / 10."""
    out = imbalance_summary([2.0, 1.0, 0.0], [10, 50, 0])
    assert out["count_imbalance_factor"] == pytest.approx(5.0)
    assert out["num_without_scale"] == 1 and out["classes"][-1]["count"] == 0
    assert math.isnan(imbalance_summary([0.0, 0.0], [0, 0])["count_imbalance_factor"])


def test_two_classes_with_a_scale_have_a_rank_correlation():
    """Two ranked classes are enough for Spearman's rho (+-1, as scipy gives)."""
    scales, counts = np.array([1.0, 2.0, 0.0]), np.array([10, 5, 3])
    out = imbalance_summary(scales, counts)
    assert out["scale_count_spearman"] == pytest.approx(stats.spearmanr([1.0, 2.0], [10, 5])[0]) == -1.0
