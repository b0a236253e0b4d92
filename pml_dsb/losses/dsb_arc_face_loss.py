from pytorch_metric_learning.losses import ArcFaceLoss

from .dsb_weighting import DSBWeightingMixin

__all__ = ["DSBArcFaceLoss"]


class DSBArcFaceLoss(DSBWeightingMixin, ArcFaceLoss):
    """PML's ``ArcFaceLoss`` with DSB weighting: the mixin is all it takes."""
