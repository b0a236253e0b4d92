"""DSB losses: PML losses re-weighted by the inverse semantic scale of each class."""
from .class_balanced import class_balanced_reducer
from .dsb_arc_face_loss import DSBArcFaceLoss
from .dsb_cos_face_loss import DSBCosFaceLoss
from .dsb_cross_batch_memory import DSBCrossBatchMemory
from .dsb_normalized_softmax_loss import DSBNormalizedSoftmaxLoss
from .dsb_soft_triple_loss import DSBSoftTripleLoss
from .dsb_weighting import DSBWeightingMixin, dsb_class_weights, weight_losses_by_class, with_dsb_weighting
from .sample_indices import SampleIndicesGetter

__all__ = [
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
