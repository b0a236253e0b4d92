"""``pml-dsb analyze``: measure semantic scale and test the paper's claims on your data.

One job per module, all re-exported here:

* :mod:`~pml_dsb.analysis.marginal`: marginal effect curves (S of random
  subsets of m samples, m = 2..n) and their saturation.
* :mod:`~pml_dsb.analysis.correlation`: semantic scale, train count and log
  count as predictors of per-class accuracy: Spearman/Pearson, bootstrap
  intervals over classes and seeds, which predictor wins.
* :mod:`~pml_dsb.analysis.manifold`: the volume of point clouds scaled by 0.5..4.
* :mod:`~pml_dsb.analysis.imbalance`: scale max/min beside the count
  imbalance factor, classes ranked.
* :mod:`~pml_dsb.analysis.run_table`: per-class arrays of a benchmark run folder.
* :mod:`~pml_dsb.analysis.features`: raw inputs of a dataset, or a model's embeddings.
* :mod:`~pml_dsb.analysis.plots`: the PNG figures (matplotlib, optional).
* :mod:`~pml_dsb.analysis.cli`: ``register(subparsers)`` for ``pml-dsb analyze``.
"""
from .correlation import (
    PredictorCorrelation,
    bootstrap_correlation,
    compare_predictors,
    correlation,
    count_predictors,
    pearson,
    predictor_correlations,
    scale_bias_analysis,
    spearman,
)
from .features import DATASET_NAMES, checkpoint_features, embed_dataset, load_dataset, raw_features
from .imbalance import imbalance_summary
from .manifold import (
    BUILTIN_CLOUDS,
    DEFAULT_FACTORS,
    builtin_point_cloud,
    load_point_cloud,
    read_ply,
    scaled_volumes,
    volume_report,
)
from .marginal import (
    SATURATION_POINTS,
    MarginalCurve,
    class_marginal_curves,
    marginal_effect_curve,
    marginal_sizes,
    saturation_summary,
)
from .run_table import RunTable, load_run_table

__all__ = [
    "MarginalCurve",
    "marginal_sizes",
    "marginal_effect_curve",
    "class_marginal_curves",
    "saturation_summary",
    "SATURATION_POINTS",
    "pearson",
    "spearman",
    "correlation",
    "bootstrap_correlation",
    "PredictorCorrelation",
    "predictor_correlations",
    "compare_predictors",
    "count_predictors",
    "scale_bias_analysis",
    "BUILTIN_CLOUDS",
    "DEFAULT_FACTORS",
    "builtin_point_cloud",
    "read_ply",
    "load_point_cloud",
    "scaled_volumes",
    "volume_report",
    "imbalance_summary",
    "RunTable",
    "load_run_table",
    "DATASET_NAMES",
    "load_dataset",
    "raw_features",
    "embed_dataset",
    "checkpoint_features",
]
