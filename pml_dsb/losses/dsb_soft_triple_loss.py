from pytorch_metric_learning.losses import SoftTripleLoss

from .dsb_weighting import DSBWeightingMixin

__all__ = ["DSBSoftTripleLoss"]


class DSBSoftTripleLoss(DSBWeightingMixin, SoftTripleLoss):
    r"""SoftTriple loss re-weighted by semantic scale (DSB-ST).

    .. math::

        L_i = -\frac{w_{y_i}}{1}\log\frac{\exp(\lambda(\mathcal S'_{i,y_i}-\delta))}
        {\exp(\lambda(\mathcal S'_{i,y_i}-\delta))+\sum_{j\ne y_i}\exp(\lambda \mathcal S'_{i,j})},
        \qquad w_c \propto 1/S_c

    where :math:`\mathcal S'_{i,j}` is the relaxed similarity of sample i to
    class j's centres and :math:`S_c` the semantic scale of class c in the
    memory (:class:`~pml_dsb.memory.SemanticScaleMemory`). Until the memory
    reaches stage 3 the loss is exactly PML's ``SoftTripleLoss``.

    Parameters: every ``SoftTripleLoss`` parameter (``num_classes``,
    ``embedding_size``, ``centers_per_class=10``, ``la=20``, ``gamma=0.1``,
    ``margin=0.01``, reducer, regularizers...), plus ``memory_size``,
    ``warmup_epochs=5``, ``normalize="mean"``, ``memory``, ``update_memory``
    (see :class:`~pml_dsb.losses.DSBWeightingMixin`).

    Default distance: ``CosineSimilarity``. Default reducer: ``MeanReducer``.
    Reducer input: ``loss``, element-wise (weighted), and the parent's
    ``weight_reg_loss`` when a weight regularizer is set (not weighted).
    The loss has parameters: put ``loss.parameters()`` in an optimizer (for
    PML trainers, ``optimizers["metric_loss_optimizer"]``).
    """
