"""pml-dsb: Dynamic Semantic-Scale-Balanced learning for pytorch-metric-learning.

The core names live here; evaluation, datasets, models and the benchmark
runner are subpackages (``pml_dsb.evaluation``, ``pml_dsb.datasets``, ...).
"""
from .functional import class_balanced_weights, class_semantic_scales, dsb_weights, semantic_scale
from .losses import (
    DSBArcFaceLoss,
    DSBCosFaceLoss,
    DSBCrossBatchMemory,
    DSBNormalizedSoftmaxLoss,
    DSBSoftTripleLoss,
    DSBWeightingMixin,
    SampleIndicesGetter,
    class_balanced_reducer,
    dsb_class_weights,
    weight_losses_by_class,
    with_dsb_weighting,
)
from .memory import SemanticScaleMemory

__version__ = "0.1.0"

__all__ = [
    "semantic_scale",
    "class_semantic_scales",
    "dsb_weights",
    "class_balanced_weights",
    "SemanticScaleMemory",
    "DSBSoftTripleLoss",
    "DSBNormalizedSoftmaxLoss",
    "DSBArcFaceLoss",
    "DSBCosFaceLoss",
    "DSBCrossBatchMemory",
    "DSBWeightingMixin",
    "weight_losses_by_class",
    "dsb_class_weights",
    "with_dsb_weighting",
    "class_balanced_reducer",
    "SampleIndicesGetter",
]
