from pytorch_metric_learning.losses import CosFaceLoss

from .dsb_weighting import DSBWeightingMixin

__all__ = ["DSBCosFaceLoss"]


class DSBCosFaceLoss(DSBWeightingMixin, CosFaceLoss):
    """PML's ``CosFaceLoss`` with DSB weighting: the mixin is all it takes."""
