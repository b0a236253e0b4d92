"""Scale against bias: correlations against scipy, seeded bootstrap, the winner statement."""
import math

import numpy as np
import pytest
from scipy import stats

from pml_dsb.analysis import (
    bootstrap_correlation,
    count_predictors,
    compare_predictors,
    pearson,
    predictor_correlations,
    scale_bias_analysis,
    spearman,
)

X = np.array([3.1, 0.5, 2.2, 2.2, 7.0, 4.4, 1.0, 5.5, 6.1, 0.9])
Y = np.array([0.80, 0.41, 0.62, 0.70, 0.95, 0.60, 0.52, 0.71, 0.90, 0.33])


@pytest.fixture
def seeded_run():
    """Per-seed scale and accuracy of 12 classes over 4 seeds; accuracy follows scale."""
    rng = np.random.default_rng(5)
    scale = rng.uniform(1, 5, size=12) + rng.normal(0, 0.1, size=(4, 12))
    counts = rng.integers(5, 200, size=12)
    acc = 0.5 + 0.08 * scale.mean(0) + rng.normal(0, 0.03, size=(4, 12))
    return scale, counts, acc


def test_equal_scipy_on_fixed_inputs():
    assert float(pearson(X, Y)) == pytest.approx(stats.pearsonr(X, Y)[0], abs=1e-12)
    assert float(spearman(X, Y)) == pytest.approx(stats.spearmanr(X, Y)[0], abs=1e-12)  # X has a tie
    rows = np.stack([X, X[::-1], np.sqrt(X)])
    got = spearman(rows, np.stack([Y, Y, Y]))
    for r, g in zip(rows, got):
        assert g == pytest.approx(stats.spearmanr(r, Y)[0], abs=1e-12)


@pytest.mark.parametrize("factor", [1e160, 1e200, 1e-170, 1e-300])
def test_pearson_is_scale_invariant_at_extreme_magnitudes(factor):
    # sums of squares of such values overflow or underflow unless rescaled first
    want = stats.pearsonr(X, Y)[0]
    assert float(pearson(np.asarray(X) * factor, Y)) == pytest.approx(want, abs=1e-12)
    assert float(pearson(X, np.asarray(Y) * factor)) == pytest.approx(want, abs=1e-12)
    assert math.isnan(float(pearson(np.full(4, factor), [1.0, 2.0, 3.0, 4.0])))


def test_constant_input_is_nan():
    assert math.isnan(float(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])))
    assert math.isnan(float(spearman([0.1] * 5, [1, 2, 3, 4, 5])))


def test_bootstrap_seeded_and_reproducible(seeded_run):
    scale, _, acc = seeded_run
    for unit in ("classes", "seeds"):  # Pearson: continuous, so quantiles of different draws differ
        a = bootstrap_correlation(scale, acc, "pearson", unit, n_boot=300, seed=11)
        b = bootstrap_correlation(scale, acc, "pearson", unit, n_boot=300, seed=11)
        c = bootstrap_correlation(scale, acc, "pearson", unit, n_boot=300, seed=12)
        assert a == b
        assert a != c
        assert a[0] <= a[1]
    point = float(spearman(scale.mean(0), acc.mean(0)))
    lo, hi = bootstrap_correlation(scale, acc, n_boot=500, seed=0)
    assert lo <= point <= hi


@pytest.mark.parametrize("confidence", [0.95, 0.8])
def test_bootstrap_interval_takes_the_two_tail_quantiles(confidence):
    """A 95% percentile interval is the 2.5% and 97.5% quantiles of the
    replicates, not the 5% and 95% (a 90% interval called 95%)."""
    from pml_dsb.analysis.correlation import _interval

    values = np.random.default_rng(3).normal(size=4001)
    tail = (1 - confidence) / 2
    assert _interval(values, confidence) == pytest.approx(tuple(np.percentile(values, [100 * tail, 100 * (1 - tail)])))
    # through the public function: replicates drawn as its docstring says
    rng = np.random.default_rng(7)
    idx = rng.integers(0, len(X), size=(500, len(X)))
    replicates = np.array([stats.pearsonr(X[i], Y[i])[0] for i in idx])
    want = np.quantile(replicates[np.isfinite(replicates)], [tail, 1 - tail])
    assert bootstrap_correlation(X, Y, "pearson", n_boot=500, confidence=confidence, seed=7) == pytest.approx(
        tuple(want), abs=1e-12)


def test_seed_bootstrap_needs_two_seeds():
    assert all(math.isnan(v) for v in bootstrap_correlation(X, Y, unit="seeds", n_boot=50))
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_correlation(X, Y, n_boot=0)
    with pytest.raises(ValueError, match="unit"):
        bootstrap_correlation(X, Y, unit="epochs", n_boot=10)


def test_per_seed_and_averaged_values(seeded_run):
    scale, counts, acc = seeded_run
    out = predictor_correlations({"semantic_scale": scale, "train_count": counts}, acc, n_boot=100)
    first = out[0]
    assert (first.predictor, first.method) == ("semantic_scale", "spearman")
    assert first.value == pytest.approx(stats.spearmanr(scale.mean(0), acc.mean(0))[0])
    assert first.per_seed == pytest.approx([stats.spearmanr(s, a)[0] for s, a in zip(scale, acc)])


def test_winner_margin_and_plain_statement(seeded_run):
    scale, counts, acc = seeded_run
    out = scale_bias_analysis(scale, counts, acc, n_boot=400, seed=1)
    comp = out["comparison"]["spearman"]
    assert comp["winner"] == "semantic_scale"
    assert comp["margin"] == pytest.approx(
        abs(comp["values"]["semantic_scale"]) - abs(comp["values"][comp["runner_up"]]))
    assert comp["decisive"] and comp["margin_ci"][0] > 0
    assert "semantic scale tracks per-class accuracy best" in comp["statement"]
    assert "log_count" in comp["same_ranking"]  # log is monotonic: same Spearman as the count
    # the sign is reported, not assumed
    flipped = compare_predictors({"semantic_scale": -scale.mean(0)}, acc, n_boot=50)
    assert flipped["winner"] == "semantic_scale" and flipped["opposite_sign"] == ["semantic_scale"]
    assert "LOWER accuracy" in flipped["statement"]


def test_the_winner_has_the_largest_magnitude_whatever_its_sign():
    """A count that tracks accuracy perfectly but inversely (rho = -1) beats a
    scale with rho = +0.89: the winner is the largest |rho|, and its margin is
    positive."""
    acc = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    scale, count = [1, 2, 4, 3, 6, 5], [60, 50, 40, 30, 20, 10]
    r = compare_predictors({"semantic_scale": scale, "train_count": count}, acc, n_boot=200)
    rho_scale, rho_count = stats.spearmanr(scale, acc)[0], stats.spearmanr(count, acc)[0]
    assert (r["winner"], r["runner_up"]) == ("train_count", "semantic_scale")
    assert r["margin"] == pytest.approx(abs(rho_count) - abs(rho_scale)) and r["margin"] > 0
    assert "semantic scale tracks per-class accuracy best" not in r["statement"]


def test_lead_fraction_counts_strict_leads_only():
    """Scale ranks 6 classes as accuracy does (|rho| = 1 in every replicate);
    the count swaps the last two. The scale leads strictly only in the
    replicates that draw both of those classes: 1 - 2(5/6)^6 + (4/6)^6 = 0.418
    of them; in the others the two tie, which is no lead."""
    acc = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    r = compare_predictors({"semantic_scale": [1, 2, 3, 4, 5, 6], "train_count": [1, 2, 3, 4, 6, 5]},
                           acc, n_boot=2000, seed=0)
    assert r["winner"] == "semantic_scale"
    both = 1 - 2 * (5 / 6) ** 6 + (4 / 6) ** 6
    assert r["lead_fraction"] == pytest.approx(both, abs=0.05)  # binomial sd ~0.011


def test_balanced_counts_cannot_rank(seeded_run):
    scale, _, acc = seeded_run
    comp = scale_bias_analysis(scale, np.full(12, 50), acc, n_boot=100)["comparison"]["pearson"]
    assert comp["winner"] == "semantic_scale" and "train_count" in comp["undefined"]
    assert "constant across classes" in comp["statement"]
    out = scale_bias_analysis(scale, np.full(12, np.nan), acc, n_boot=50)
    assert out["unavailable"] == ["train_count", "log_count"]


def test_classes_without_a_scale_or_an_accuracy_are_left_out(seeded_run, caplog):
    scale, counts, acc = (a.copy() for a in seeded_run)
    scale[:, 0] = 0.0  # one training sample: no scale (DEFINITIONS)
    scale[2, 1] = 0.0  # no scale in one seed
    acc[3, 2] = np.nan  # no query of class 2 in one seed
    out = scale_bias_analysis(scale, counts, acc, n_boot=50)
    keep = np.arange(12) >= 3
    values = {(c["predictor"], c["method"]): c["value"] for c in out["correlations"]}
    expected = stats.spearmanr(scale[:, keep].mean(0), acc[:, keep].mean(0))[0]
    assert values[("semantic_scale", "spearman")] == pytest.approx(expected, abs=1e-12)
    assert values[("train_count", "pearson")] == pytest.approx(
        stats.pearsonr(counts[keep], acc[:, keep].mean(0))[0], abs=1e-12)
    assert "3 of 12 classes" in caplog.text
    with pytest.raises(ValueError, match="only 2 classes"):
        scale_bias_analysis(np.r_[0.0, 1.0, 2.0], [1, 5, 9], [0.1, 0.2, 0.3], n_boot=20)


def test_non_finite_values_are_refused_by_the_parts():
    with pytest.raises(ValueError, match=r"accuracy has NaN or infinite values at class positions \[3\]"):
        compare_predictors({"semantic_scale": X}, np.where(np.arange(10) == 3, np.nan, Y), n_boot=20)
    with pytest.raises(ValueError, match="semantic_scale has NaN"):
        predictor_correlations({"semantic_scale": np.r_[X[:9], np.inf]}, Y, n_boot=20)


def test_no_sign_claimed_for_a_null_link():
    rng = np.random.default_rng(4)
    scale, counts, acc = rng.uniform(1, 5, 30), rng.integers(5, 200, 30), rng.uniform(0.2, 0.9, 30)
    comp = compare_predictors({"semantic_scale": scale, "train_count": counts}, acc, n_boot=400)
    for name in ("semantic_scale", "train_count"):
        lo, hi = comp["intervals"][name]
        assert lo == pytest.approx(bootstrap_correlation(
            {"semantic_scale": scale, "train_count": counts}[name], acc, n_boot=400)[0])
        assert lo < 0 < hi and name in comp["no_clear_sign"]
    assert comp["opposite_sign"] == [] and "LOWER" not in comp["statement"]
    assert "no predictor shows a clear link" in comp["statement"] and "tracks per-class accuracy best" not in (
        comp["statement"])


def test_tie_is_reported_as_a_tie():
    comp = compare_predictors({"semantic_scale": X, "train_count": -X}, Y, n_boot=50)
    assert comp["margin"] == 0 and "tied for the strongest link" in comp["statement"]
    # the same sentence whatever the dict order
    flipped = compare_predictors({"train_count": -X, "semantic_scale": X}, Y, n_boot=50)
    assert "tied" in flipped["statement"] and "semantic scale" in flipped["statement"]


@pytest.mark.parametrize("order", [("semantic_scale", "train_count"), ("train_count", "semantic_scale")])
def test_a_scale_that_ranks_classes_as_the_count_does_ties_with_it(order):
    """Once the first predictor in the dict won alone, "the only predictor with
    a defined correlation", though the other had the very same Spearman rho."""
    counts = np.array([3, 8, 20, 41, 77, 150, 230, 400, 510, 600])
    scale = np.log(counts) * 0.7 + 1.0  # a different quantity, the same ranking
    comp = compare_predictors({n: {"semantic_scale": scale, "train_count": counts}[n] for n in order}, Y,
                              method="spearman", n_boot=50)
    assert stats.spearmanr(scale, Y)[0] == pytest.approx(stats.spearmanr(counts, Y)[0], abs=1e-15)
    assert sorted(comp["tied"]) == ["semantic_scale", "train_count"]
    assert "semantic scale and train count are tied" in comp["statement"] or (
        "train count and semantic scale are tied" in comp["statement"])
    assert "only predictor" not in comp["statement"] and "tracks per-class accuracy best" not in comp["statement"]


def test_a_pearson_tie_within_rounding_is_a_tie():
    """A scale linear in the count has the same Pearson r up to ~1e-16: which
    one 'won' came down to rounding."""
    counts = np.array([3, 8, 20, 41, 77, 150, 230, 400, 510, 600], dtype=float)
    comp = compare_predictors({"semantic_scale": 0.013 * counts + 0.7, "train_count": counts}, Y,
                              method="pearson", n_boot=50)
    assert abs(comp["values"]["semantic_scale"] - comp["values"]["train_count"]) < 1e-12
    assert sorted(comp["tied"]) == ["semantic_scale", "train_count"] and "are tied" in comp["statement"]
    # log count measures the count too: never "tied" with it, however close
    alone = compare_predictors({"train_count": counts, "log_count": np.log(counts)}, Y, method="spearman", n_boot=50)
    assert alone["tied"] == [] and "tied" not in alone["statement"]


def test_an_undefined_interval_is_not_called_one_that_spans_zero():
    comp = compare_predictors({"semantic_scale": [1.0, 2.0, 3.0, 4.0], "train_count": [5, 5, 5, 9]},
                              [0.1, 0.2, 0.3, 0.45], "spearman", n_boot=10, seed=0)
    assert all(math.isnan(v) for v in comp["intervals"]["train_count"])
    assert comp["no_interval"] == ["train_count"] and "train_count" not in comp["no_clear_sign"]
    assert "spans 0" not in comp["statement"] and "train count has no interval" in comp["statement"]


def test_count_predictors_needs_one_count_per_class():
    # 5 scales with 3 counts gave arrays of different lengths; negative counts NaN logs
    with pytest.raises(ValueError, match="one value per class"):
        count_predictors([1.0, 2.0, 3.0, 4.0, 5.0], [10, 20, 30])
    with pytest.raises(ValueError, match="counts must be >= 0"):
        count_predictors([1.0, 2.0], [-1, 5])
    got = count_predictors(np.ones((3, 2)), [0, 5])  # (seeds, classes) scales; a class unseen in training
    assert np.isnan(got["log_count"][0]) and got["log_count"][1] == pytest.approx(math.log(5))


@pytest.mark.parametrize("unit", ["classes", "seeds"])
def test_bootstrap_over_seed_class_arrays_follows_its_definition(seeded_run, unit):
    """Replicates drawn from ``default_rng(seed)`` as the module says: over
    classes, the classes resampled after averaging each over the seeds; over
    seeds, the seeds resampled and each class averaged over the drawn ones.
    Every seed differs here, so an estimator that dropped or ignored a seed
    would give another interval."""
    scale, _, acc = seeded_run
    seeds, classes = acc.shape
    n_boot, tail = 300, 0.025
    rng = np.random.default_rng(4)
    if unit == "classes":
        idx = rng.integers(0, classes, size=(n_boot, classes))
        pairs = [(scale.mean(0)[i], acc.mean(0)[i]) for i in idx]
    else:
        idx = rng.integers(0, seeds, size=(n_boot, seeds))
        pairs = [(scale[i].mean(0), acc[i].mean(0)) for i in idx]
    replicates = np.array([stats.pearsonr(x, y)[0] if np.ptp(x) > 0 and np.ptp(y) > 0 else np.nan
                           for x, y in pairs])
    want = tuple(np.quantile(replicates[np.isfinite(replicates)], [tail, 1 - tail]))
    got = bootstrap_correlation(scale, acc, "pearson", unit, n_boot=n_boot, seed=4)
    assert got == pytest.approx(want, abs=1e-12)
    # predictor_correlations reports the same two intervals for its (seeds, C) predictor
    (row,) = predictor_correlations({"semantic_scale": scale}, acc, methods=("pearson",), n_boot=n_boot, seed=4)
    assert (row.ci_classes if unit == "classes" else row.ci_seeds) == pytest.approx(want, abs=1e-12)


def test_the_paired_lead_interval_follows_its_definition():
    """The lead of the winner over the runner-up: |r| of each on the same
    resampled classes (``default_rng(seed)``), its percentile interval, and
    ``decisive`` exactly when the interval's low end is above 0."""
    rng = np.random.default_rng(8)
    acc = rng.uniform(0.2, 0.9, size=15)
    a = acc + rng.normal(0, 0.05, size=15)  # close to accuracy
    b = acc + rng.normal(0, 0.25, size=15)  # a noisier copy
    n_boot = 400
    idx = np.random.default_rng(3).integers(0, 15, size=(n_boot, 15))
    lead = np.array([abs(stats.pearsonr(a[i], acc[i])[0]) - abs(stats.pearsonr(b[i], acc[i])[0]) for i in idx])
    want = np.quantile(lead, [0.025, 0.975])
    r = compare_predictors({"a": a, "b": b}, acc, method="pearson", n_boot=n_boot, seed=3)
    assert (r["winner"], r["runner_up"]) == ("a", "b")
    assert r["margin_ci"] == pytest.approx(list(want), abs=1e-12)
    assert r["lead_fraction"] == pytest.approx(float((lead > 0).mean()))
    assert r["decisive"] == bool(want[0] > 0)
    # a lead whose interval reaches below 0 is not decisive, even if its high end is above 0
    c = acc + rng.normal(0, 0.06, size=15)
    close = compare_predictors({"a": a, "c": c}, acc, method="pearson", n_boot=n_boot, seed=3)
    lo, hi = close["margin_ci"]
    assert lo < 0 < hi and close["decisive"] is False


def test_under_pearson_a_count_and_its_log_are_two_predictors():
    """Only Spearman's rho is the same for a count and its log (same ranking);
    Pearson's r differs, so both are compared, each with its own r."""
    counts = np.array([2, 3, 5, 8, 13, 40, 90, 200, 400, 500], dtype=float)
    acc = np.array([0.1, 0.2, 0.25, 0.4, 0.45, 0.5, 0.6, 0.62, 0.65, 0.7])
    preds = {"train_count": counts, "log_count": np.log(counts)}
    r = compare_predictors(preds, acc, method="pearson", n_boot=100)
    want = {n: stats.pearsonr(v, acc)[0] for n, v in preds.items()}
    assert r["values"] == pytest.approx(want, abs=1e-12)
    assert r["same_ranking"] == {}
    assert (r["winner"], r["runner_up"]) == ("log_count", "train_count")  # acc is near-linear in log n
    assert r["margin"] == pytest.approx(abs(want["log_count"]) - abs(want["train_count"]), abs=1e-12)
    rho = compare_predictors(preds, acc, method="spearman", n_boot=100)
    assert rho["same_ranking"] == {"log_count": "train_count"}


def test_a_lead_beyond_rounding_is_not_a_tie():
    """|r| that differ by ~1e-5 (relative) are a real, if small, lead: only
    differences at the rounding level (1e-12) count as a tie."""
    acc = np.linspace(0.1, 0.9, 10)
    a, b = acc.copy(), acc.copy()
    a[2] += 0.010
    b[2] += 0.0105
    ra, rb = stats.pearsonr(a, acc)[0], stats.pearsonr(b, acc)[0]
    assert 1e-9 < (ra - rb) / ra < 1e-3
    r = compare_predictors({"a": a, "b": b}, acc, method="pearson", n_boot=50)
    assert (r["winner"], r["runner_up"], r["tied"]) == ("a", "b", [])
    assert r["margin"] == pytest.approx(ra - rb, rel=1e-6)
    assert "tied" not in r["statement"]


def test_bootstrap_settings_are_checked_at_their_edges():
    """confidence lies in the open interval (0, 1); the seed is a non-negative integer."""
    for call in (lambda **kw: bootstrap_correlation(X, Y, n_boot=20, **kw),
                 lambda **kw: compare_predictors({"a": X}, Y, n_boot=20, **kw)):
        with pytest.raises(ValueError, match="confidence must be in"):
            call(confidence=1.0)
        with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
            call(seed=-1)
        call(confidence=0.999, seed=0)  # the edges inside pass
