r"""Scale against bias: which per-class quantity tracks per-class accuracy best.

Predictors of a class's test accuracy (Recall@1 or top-1 accuracy):
``semantic_scale`` (:math:`S`, bits, on the class's train features),
``train_count`` (:math:`n_c`) and ``log_count`` (:math:`\log n_c`). For each
predictor this module gives Spearman's and Pearson's correlation with the
accuracy, and percentile bootstrap confidence intervals

- over classes: resample the classes with replacement (per-class values
  averaged over the seeds first), and
- over seeds: resample the training seeds with replacement, average each
  class's values over the drawn seeds, correlate across all classes
  (needs at least two seeds),

each from a ``numpy.random.default_rng(seed)``: the same seed gives the same
interval. :func:`compare_predictors` names the predictor with the largest
absolute Spearman correlation and gives a paired bootstrap interval of its
lead over the runner-up. The sign is reported, never assumed: the paper
expects larger scale (and larger count) with higher accuracy.

Correlations of a constant input are NaN (a balanced training set makes
``train_count`` constant: it cannot rank the classes).
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy.stats import rankdata

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "pearson",
    "spearman",
    "correlation",
    "bootstrap_correlation",
    "PredictorCorrelation",
    "predictor_correlations",
    "compare_predictors",
    "scale_bias_analysis",
    "count_predictors",
]

METHODS = ("spearman", "pearson")
#: predictors that measure the same quantity (the count, raw or logged):
#: never reported as tied with each other
_QUANTITY = {"train_count": "count", "log_count": "count"}

_LABEL = {"semantic_scale": "semantic scale", "train_count": "train count", "log_count": "log train count"}


def pearson(x, y) -> np.ndarray:
    r"""Pearson's r along the last axis (vectorised over leading axes); NaN where
    either input is constant.

    >>> float(pearson([1.0, 2.0, 3.0], [2.0, 4.0, 7.0])).__round__(6)
    0.993399
    >>> pearson([[1, 2, 3], [1, 1, 1]], [[3, 2, 1], [1, 2, 3]]).tolist()
    [-1.0, nan]
    """
    x0 = np.asarray(x, dtype=np.float64)
    y0 = np.asarray(y, dtype=np.float64)
    if x0.shape != y0.shape or x0.shape[-1] < 2:
        raise ValueError(f"x and y need the same shape with >= 2 values, got {x0.shape}, {y0.shape}")
    n = x0.shape[-1]
    # r is scale-invariant: each row to magnitude <= 1 first, so that the sums
    # of squares below neither overflow (1e160) nor underflow (1e-170)
    x0, y0 = _peak_scaled(x0), _peak_scaled(y0)
    x = x0 - x0.mean(-1, keepdims=True)
    y = y0 - y0.mean(-1, keepdims=True)
    sxx = (x * x).sum(-1)
    syy = (y * y).sum(-1)
    # a spread at the rounding level of the values counts as constant
    const = (np.sqrt(sxx / n) <= 1e-12 * np.abs(x0).max(-1)) | (
        np.sqrt(syy / n) <= 1e-12 * np.abs(y0).max(-1)
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(const, np.nan, (x * y).sum(-1) / np.sqrt(np.where(const, 1.0, sxx * syy)))
    return np.clip(r, -1.0, 1.0)


def _peak_scaled(a: np.ndarray) -> np.ndarray:
    peak = np.abs(a).max(-1, keepdims=True)
    return a / np.where(peak > 0, peak, 1.0)


def spearman(x, y) -> np.ndarray:
    """Spearman's rho along the last axis: Pearson's r of the ranks (ties get
    their average rank, as ``scipy.stats.spearmanr`` does).

    >>> float(spearman([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]))
    0.8
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return pearson(rankdata(x, axis=-1), rankdata(y, axis=-1))


def correlation(x, y, method: str = "spearman") -> np.ndarray:
    """``spearman`` or ``pearson`` of ``x`` and ``y`` along the last axis."""
    if method == "spearman":
        return spearman(x, y)
    if method == "pearson":
        return pearson(x, y)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _as_seed_class(name: str, value, num_seeds: Optional[int] = None) -> np.ndarray:
    """Return a (num_seeds, C) float64 array (a (C,) input is repeated per seed)."""
    a = np.asarray(value, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape (C,) or (seeds, C), got {a.shape}")
    if num_seeds is not None and a.shape[0] == 1 and num_seeds > 1:
        a = np.repeat(a, num_seeds, axis=0)
    return a


def scored_classes(scale: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """(C,) mask of the classes with a scale (``S > 0``) and a finite accuracy
    in every seed (rows of the (seeds, C) arrays). S = 0 is "no scale yet"
    (fewer than 2 samples or no spread, docs/DEFINITIONS.md): such a class, or one without
    an accuracy, would enter the correlations as a value."""
    return (np.isfinite(scale) & (scale > 0)).all(0) & np.isfinite(accuracy).all(0)


def _finite(name: str, a: np.ndarray) -> np.ndarray:
    """``a`` unchanged; a ``ValueError`` naming the classes if any value is NaN
    or infinite (a NaN would make every correlation NaN, which reads as
    "constant")."""
    bad = np.flatnonzero(~np.isfinite(a).all(0))
    if len(bad):
        raise ValueError(
            f"{name} has NaN or infinite values at class positions {bad[:10].tolist()}"
            f"{' ...' if len(bad) > 10 else ''} ({len(bad)} of {a.shape[1]}); leave those classes out first "
            "(scale_bias_analysis does)"
        )
    return a


def _check_boot(n_boot, confidence, seed) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not (isinstance(confidence, numbers.Real) and 0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _resampled(x: np.ndarray, y: np.ndarray, unit: str, n_boot: int, rng) -> tuple:
    """Bootstrap replicates of (x, y), each (n_boot, C), averaged over seeds."""
    seeds, classes = y.shape
    if unit == "classes":
        idx = rng.integers(0, classes, size=(n_boot, classes))
        return x.mean(0)[idx], y.mean(0)[idx]
    if unit == "seeds":
        idx = rng.integers(0, seeds, size=(n_boot, seeds))
        return x[idx].mean(1), y[idx].mean(1)
    raise ValueError(f"unit must be 'classes' or 'seeds', got {unit!r}")


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if len(finite) < max(10, 0.5 * len(values)):  # mostly undefined resamples
        return (math.nan, math.nan)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(finite, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


def bootstrap_correlation(
    x,
    y,
    method: str = "spearman",
    unit: str = "classes",
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``correlation(x, y)``.

    Args:
        x: (C,) or (seeds, C) predictor values (a (C,) predictor is the same for every seed).
        y: (C,) or (seeds, C) accuracies.
        method: ``"spearman"`` or ``"pearson"``.
        unit: ``"classes"`` (resample classes, values averaged over seeds) or
            ``"seeds"`` (resample seeds, correlate all classes).
        n_boot: bootstrap replicates.
        confidence: coverage of the interval (0.95: the 2.5% and 97.5% quantiles).
        seed: seed of the ``numpy.random.default_rng`` that draws the resamples.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when fewer than two seeds are given
        for ``unit="seeds"`` or most replicates are undefined (constant input).

    >>> x, y = [1, 2, 3, 4, 5, 6], [1.0, 3.0, 2.0, 5.0, 4.0, 6.0]
    >>> bootstrap_correlation(x, y, seed=1) == bootstrap_correlation(x, y, seed=1)
    True
    """
    _check_boot(n_boot, confidence, seed)
    y2 = _as_seed_class("y", y)
    x2 = _as_seed_class("x", x, y2.shape[0])
    y2 = _as_seed_class("y", y2, x2.shape[0])
    if x2.shape != y2.shape:
        raise ValueError(f"x and y must have matching shapes, got {x2.shape} and {y2.shape}")
    if unit == "seeds" and y2.shape[0] < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(int(seed))
    bx, by = _resampled(x2, y2, unit, int(n_boot), rng)
    return _interval(correlation(bx, by, method), confidence)


@dataclass
class PredictorCorrelation:
    """Correlation of one predictor with accuracy.

    ``value`` is the correlation of the seed-averaged per-class values;
    ``per_seed`` the correlation within each seed; ``ci_classes`` and
    ``ci_seeds`` the bootstrap intervals (NaN where undefined).
    """

    predictor: str
    method: str
    value: float
    ci_classes: tuple[float, float]
    ci_seeds: tuple[float, float]
    per_seed: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return {
            "predictor": self.predictor,
            "method": self.method,
            "value": self.value,
            "ci_classes": list(self.ci_classes),
            "ci_seeds": list(self.ci_seeds),
            "per_seed": list(self.per_seed),
        }


def count_predictors(scale, counts) -> dict[str, np.ndarray]:
    """The three standard predictors: ``semantic_scale``, ``train_count``, ``log_count``.

    >>> sorted(count_predictors([1.0, 2.0], [10, 100]))
    ['log_count', 'semantic_scale', 'train_count']
    """
    counts = np.asarray(counts, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    if scale.ndim == 0 or counts.ndim == 0 or scale.shape[-1] != counts.shape[-1]:  # (seeds, C) scales: (C,) counts
        raise ValueError(f"scale and counts need one value per class each, got shapes {scale.shape} and {counts.shape}")
    if np.any(counts < 0):  # 0 (a class unseen in training) has no log: NaN
        raise ValueError(f"counts must be >= 0, got {counts.tolist()}")
    with np.errstate(divide="ignore", invalid="ignore"):
        logc = np.where(counts > 0, np.log(np.where(counts > 0, counts, 1.0)), np.nan)
    return {"semantic_scale": scale, "train_count": counts, "log_count": logc}


def predictor_correlations(
    predictors: Mapping[str, object],
    accuracy,
    methods: Sequence[str] = METHODS,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[PredictorCorrelation]:
    """Correlation of each predictor with ``accuracy``, with both bootstrap intervals.

    Args:
        predictors: name -> (C,) or (seeds, C) values.
        accuracy: (C,) or (seeds, C) per-class accuracy.
        methods, n_boot, confidence, seed: see :func:`bootstrap_correlation`;
            every interval uses ``seed`` (so the resampled classes are the same
            for every predictor: the intervals are paired).

    >>> out = predictor_correlations({"a": [1, 2, 3, 4]}, [0.1, 0.3, 0.2, 0.4], n_boot=50)
    >>> [(p.predictor, p.method, round(p.value, 3)) for p in out]
    [('a', 'spearman', 0.8), ('a', 'pearson', 0.8)]
    """
    acc = _finite("accuracy", _as_seed_class("accuracy", accuracy))
    out = []
    for name, values in predictors.items():
        x = _finite(name, _as_seed_class(name, values, acc.shape[0]))
        y = _as_seed_class("accuracy", acc, x.shape[0])
        if x.shape != y.shape:
            raise ValueError(f"{name} has shape {x.shape}, accuracy {y.shape}: they must match")
        for method in methods:
            out.append(
                PredictorCorrelation(
                    predictor=name,
                    method=method,
                    value=float(correlation(x.mean(0), y.mean(0), method)),
                    ci_classes=bootstrap_correlation(x, y, method, "classes", n_boot, confidence, seed),
                    ci_seeds=bootstrap_correlation(x, y, method, "seeds", n_boot, confidence, seed),
                    per_seed=[float(v) for v in correlation(x, y, method)],
                )
            )
    return out


def compare_predictors(
    predictors: Mapping[str, object],
    accuracy,
    method: str = "spearman",
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    expected_sign: Optional[Mapping[str, int]] = None,
) -> dict:
    """Which predictor tracks accuracy best (largest ``|correlation|``), by how much.

    A paired bootstrap over classes (the same resampled classes for every
    predictor) gives the interval of the winner's lead in ``|r|`` over the
    runner-up and the fraction of replicates in which it leads. Predictors
    that rank the classes identically to an earlier one (``log_count`` and
    ``train_count`` under Spearman) are compared once; predictors whose
    correlation is undefined (constant) cannot win.

    Returns a dict: ``method``, ``values`` (name -> correlation), ``winner``,
    ``runner_up``, ``margin`` (difference in ``|r|``), ``margin_ci``,
    ``lead_fraction``, ``decisive`` (the margin's interval excludes 0),
    ``leads`` (the same four for the winner against every other predictor),
    ``intervals`` (name -> bootstrap interval of the correlation over
    classes), ``opposite_sign`` (predictors whose interval excludes 0 on the
    side opposite to ``expected_sign``, default +1 for every predictor: the
    paper's hypothesis), ``no_clear_sign`` (predictors whose interval spans
    0: no sign is claimed for them), ``no_interval`` (predictors whose
    interval is undefined: too few resamples have a defined correlation; no
    sign is claimed either), ``tied`` (the winner and every predictor as
    strong: same ranking, or ``|r|`` equal within 1e-12; empty when the winner
    stands alone), ``undefined`` (constant predictors) and
    ``statement``, a plain sentence. Predictors and accuracy must be finite
    (``ValueError`` otherwise). Each interval is a plain 95% (``confidence``)
    interval, not adjusted for looking at several predictors: on pure noise
    some predictor gets a "clear" sign more often than 5% of the time.

    >>> r = compare_predictors({"semantic_scale": [1, 2, 3, 4, 5], "train_count": [5, 1, 4, 2, 3]},
    ...                        [0.1, 0.2, 0.3, 0.4, 0.5], n_boot=200)
    >>> r["winner"], r["runner_up"], round(r["margin"], 6)
    ('semantic_scale', 'train_count', 0.7)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_boot(n_boot, confidence, seed)
    acc = _finite("accuracy", _as_seed_class("accuracy", accuracy))
    names, xs = [], []
    for name, values in predictors.items():
        x = _finite(name, _as_seed_class(name, values, acc.shape[0]))
        names.append(name)
        xs.append(x.mean(0))
    y = acc.mean(0)
    values = {n: float(correlation(x, y, method)) for n, x in zip(names, xs)}
    aliases: dict[str, str] = {}
    candidates = []
    for n, x in zip(names, xs):
        same = [
            c for c in candidates
            if method == "spearman" and np.array_equal(rankdata(x), rankdata(xs[names.index(c)]))
        ]
        if same:
            aliases[n] = same[0]
        elif np.isfinite(values[n]):
            candidates.append(n)
    # a sign is reported only where the interval over classes excludes 0
    intervals = {
        n: list(bootstrap_correlation(x, y, method, "classes", n_boot, confidence, seed)) for n, x in zip(names, xs)
    }
    clear = {n: bool(intervals[n][0] > 0 or intervals[n][1] < 0) for n in names}
    has_interval = {n: bool(np.isfinite(intervals[n]).all()) for n in names}
    expected_sign = expected_sign or {}
    opposite = [n for n in names if clear[n] and np.sign(values[n]) != expected_sign.get(n, 1)]
    result = {
        "method": method, "values": values, "intervals": intervals, "winner": None, "runner_up": None,
        "tied": [], "margin": math.nan, "margin_ci": [math.nan, math.nan], "lead_fraction": math.nan,
        "leads": {}, "decisive": False, "same_ranking": aliases, "opposite_sign": opposite,
        "no_clear_sign": [n for n in names if np.isfinite(values[n]) and has_interval[n] and not clear[n]],
        # too few resamples with a defined correlation (tiny or nearly constant inputs)
        "no_interval": [n for n in names if np.isfinite(values[n]) and not has_interval[n]],
        "undefined": [n for n in names if not np.isfinite(values[n])],
        "num_classes": int(len(y)), "num_seeds": int(acc.shape[0]),
    }
    if not candidates:
        result["statement"] = f"No predictor has a defined {method} correlation with accuracy."
        return result
    ordered = sorted(candidates, key=lambda n: -abs(values[n]))
    winner = ordered[0]
    result["winner"] = winner
    # predictors as strong as the winner: ranking the classes as it does, or within
    # rounding of its |r| (a scale linear in the count differs by ~1e-16): none of
    # them is named ahead of the others
    quantity = {n: _QUANTITY.get(n, n) for n in names}
    result["tied"] = [winner] + [
        n for n in names if aliases.get(n) == winner and quantity[n] != quantity[winner]
    ] + [
        n for n in ordered[1:] if math.isclose(abs(values[n]), abs(values[winner]), rel_tol=1e-12, abs_tol=1e-12)
        and quantity[n] != quantity[winner]
    ]
    if len(result["tied"]) == 1:
        result["tied"] = []
    result["leads"] = {}
    if len(ordered) > 1:
        rng = np.random.default_rng(int(seed))
        idx = rng.integers(0, len(y), size=(int(n_boot), len(y)))
        boot = {n: np.abs(correlation(xs[names.index(n)][idx], y[idx], method)) for n in ordered}
        for other in ordered[1:]:
            diff = boot[winner] - boot[other]
            ok = np.isfinite(diff)
            lo, hi = _interval(diff, confidence)
            result["leads"][other] = {
                "margin": abs(values[winner]) - abs(values[other]),
                "margin_ci": [lo, hi],
                "lead_fraction": float((diff[ok] > 0).mean()) if ok.any() else math.nan,
                "decisive": bool(np.isfinite(lo) and lo > 0),
            }
        second = ordered[1]
        result["runner_up"] = second
        result.update({k: result["leads"][second][k] for k in ("margin", "margin_ci", "lead_fraction", "decisive")})
    result["statement"] = _statement(result, confidence)
    return result


def _fmt(name: str) -> str:
    return _LABEL.get(name, name)


def _statement(r: dict, confidence: float) -> str:
    sym = {"spearman": "Spearman rho", "pearson": "Pearson r"}[r["method"]]
    v = r["values"]
    w = r["winner"]
    lo, hi = r["intervals"][w]
    shown = f"{sym} = {v[w]:+.3f}, {confidence:.0%} interval over classes [{lo:+.3f}, {hi:+.3f}]"
    s = r["runner_up"]
    tied = r.get("tied", [])
    if w in r.get("no_interval", []):
        shown = f"{sym} = {v[w]:+.3f}, no {confidence:.0%} interval: too few resamples have a defined correlation"
    if tied:
        names = [_fmt(n) for n in tied]
        parts = [f"{', '.join(names[:-1])} and {names[-1]} are tied for the strongest link with per-class "
                 f"accuracy ({shown}): "
                 + ("neither tracks it better" if len(names) == 2 else "none of them tracks it better")]
    elif w in r["no_clear_sign"]:
        parts = [f"no predictor shows a clear link with per-class accuracy: the strongest, {_fmt(w)} ({shown}), "
                 "has an interval that spans 0"]
    else:
        parts = [f"{_fmt(w)} tracks per-class accuracy best ({shown})"]
    if s is not None and s not in tied:
        lo, hi = r["margin_ci"]
        parts[0] += (
            f", ahead of {_fmt(s)} ({sym} = {v[s]:+.3f}) by {r['margin']:.3f} in |{sym.split()[-1]}|"
            f" ({confidence:.0%} paired bootstrap interval over {r['num_classes']} classes "
            f"[{lo:+.3f}, {hi:+.3f}], ahead in {r['lead_fraction']:.0%} of resamples)"
        )
        parts.append(
            "the lead is clear of bootstrap noise" if r["decisive"]
            else "the lead is within bootstrap noise: no predictor clearly wins"
        )
        scale = "semantic_scale"
        if scale in r["leads"] and scale != s:
            lead = r["leads"][scale]
            lo, hi = lead["margin_ci"]
            parts.append(
                f"{_fmt(scale)} ({sym} = {v[scale]:+.3f}) trails it by {lead['margin']:.3f} "
                f"[{lo:+.3f}, {hi:+.3f}]" + (" (clear of noise)" if lead["decisive"] else " (within noise)")
            )
    elif s is None and not tied:
        parts[0] += " (the only predictor with a defined correlation)"
    for n, alias in r["same_ranking"].items():
        parts.append(f"{_fmt(n)} ranks the classes as {_fmt(alias)} does (same {sym})")
    for n in r["undefined"]:
        parts.append(f"{_fmt(n)} is constant across classes and cannot rank them")
    for n in r["opposite_sign"]:
        if n not in r["same_ranking"]:
            parts.append(f"larger {_fmt(n)} goes with LOWER accuracy (sign opposite to the paper's claim)")
    for n in r["no_clear_sign"]:
        if n not in r["same_ranking"] and n != w:
            lo, hi = r["intervals"][n]
            parts.append(f"{_fmt(n)} shows no clear link ({sym} = {v[n]:+.3f}, interval [{lo:+.3f}, {hi:+.3f}] "
                         "spans 0)")
    for n in r.get("no_interval", []):
        if n not in r["same_ranking"] and n != w:
            parts.append(f"{_fmt(n)} has no interval ({sym} = {v[n]:+.3f}; too few resamples have a defined "
                         "correlation): no sign is claimed for it")
    return "; ".join(parts) + "."


def scale_bias_analysis(
    scale,
    counts,
    accuracy,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """The whole part-2 analysis on plain arrays.

    Args:
        scale: (C,) or (seeds, C) semantic scale of each class (bits); a class
            with ``S <= 0`` (no scale) in some seed is left out, with a warning.
        counts: (C,) or (seeds, C) training samples per class.
        accuracy: (C,) or (seeds, C) per-class test accuracy / Recall@1; a
            class with a non-finite value in some seed is left out, likewise.
        n_boot, confidence, seed: bootstrap settings (see :func:`bootstrap_correlation`).

    Returns:
        ``{"correlations": [PredictorCorrelation.to_dict(), ...],
        "comparison": {"spearman": compare_predictors(...), "pearson": ...}}``.

    >>> out = scale_bias_analysis([1, 2, 3, 4, 5], [3, 5, 4, 1, 2], [.1, .2, .3, .5, .4], n_boot=100)
    >>> out["comparison"]["spearman"]["winner"]
    'semantic_scale'
    """
    acc = _as_seed_class("accuracy", accuracy)
    s = _as_seed_class("scale", scale)
    c = _as_seed_class("counts", counts)
    if not s.shape[1] == c.shape[1] == acc.shape[1]:
        raise ValueError(f"scale, counts and accuracy must have the same classes, got {s.shape}, {c.shape}, "
                         f"{acc.shape}")
    keep = scored_classes(s, acc)
    if not keep.all():
        logger.warning("%d of %d classes have no scale (S <= 0 or missing) or a non-finite accuracy in some "
                       "seed; left out", int((~keep).sum()), len(keep))
    if keep.sum() < 3:
        raise ValueError(f"only {int(keep.sum())} classes have a scale and a finite accuracy; need at least 3")
    scale, counts, accuracy = s[:, keep], c[:, keep], acc[:, keep]
    if counts.shape[0] == 1:
        counts = counts[0]
    preds = count_predictors(scale, counts)
    unavailable = [n for n, v in preds.items() if not np.all(np.isfinite(v))]
    preds = {n: v for n, v in preds.items() if n not in unavailable}
    if not preds:
        raise ValueError("no predictor has finite values for every class")
    cors = predictor_correlations(preds, accuracy, METHODS, n_boot, confidence, seed)
    comparison = {m: compare_predictors(preds, accuracy, m, n_boot, confidence, seed) for m in METHODS}
    for m, comp in comparison.items():
        comp["unavailable"] = unavailable
        if unavailable:
            comp["statement"] += " Not compared (missing or non-positive values): " + ", ".join(
                _fmt(n) for n in unavailable) + "."
        logger.debug("%s: %s", m, comp["statement"])  # the CLI prints it
    return {"correlations": [c.to_dict() for c in cors], "comparison": comparison, "unavailable": unavailable}
