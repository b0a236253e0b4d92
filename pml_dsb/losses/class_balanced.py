"""The class-balanced (CB) baseline of Cui et al. (2019) in PML form."""
from pytorch_metric_learning.reducers import ClassWeightedReducer

from ..functional.weights import class_balanced_weights

__all__ = ["class_balanced_reducer"]


def class_balanced_reducer(counts, beta: float = 0.9999) -> ClassWeightedReducer:
    """PML ``ClassWeightedReducer`` with class-balanced weights.

    CB-SoftTriple is ``SoftTripleLoss(..., reducer=class_balanced_reducer(counts))``
    and CB-NormSoftmax ``NormalizedSoftmaxLoss(..., reducer=class_balanced_reducer(counts))``,
    with ``counts`` the training samples per class. The reducer takes the mean
    of ``w[label] * loss`` over the batch, as the DSB losses do.

    >>> r = class_balanced_reducer([100, 10], beta=0.9)
    >>> r.weights
    tensor([0.7889, 1.2111])
    """
    return ClassWeightedReducer(weights=class_balanced_weights(counts, beta).float())
