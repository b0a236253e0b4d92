from pytorch_metric_learning.losses import NormalizedSoftmaxLoss

from .dsb_weighting import DSBWeightingMixin

__all__ = ["DSBNormalizedSoftmaxLoss"]


class DSBNormalizedSoftmaxLoss(DSBWeightingMixin, NormalizedSoftmaxLoss):
    r"""Normalized softmax loss re-weighted by semantic scale (DSB-NSM).

    .. math::

        L_i = -w_{y_i}\log\frac{\exp(W_{y_i}^\top z_i/\sigma)}{\sum_{j=1}^{C}\exp(W_j^\top z_i/\sigma)},
        \qquad w_c \propto 1/S_c

    with :math:`W_j` the L2-normalised class weights, :math:`\sigma` the
    temperature and :math:`S_c` the semantic scale of class c in the memory.
    Until the memory reaches stage 3 the loss is exactly PML's
    ``NormalizedSoftmaxLoss``.

    Parameters: every ``NormalizedSoftmaxLoss`` parameter (``num_classes``,
    ``embedding_size``, ``temperature=0.05``, ...), plus ``memory_size``,
    ``warmup_epochs=5``, ``normalize="mean"``, ``memory``, ``update_memory``.

    Default distance: ``DotProductSimilarity``. Default reducer: ``MeanReducer``.
    Reducer input: ``loss``, element-wise (weighted).
    """
