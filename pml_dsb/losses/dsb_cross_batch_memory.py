"""PML's ``CrossBatchMemory`` around a DSB pair or triplet loss."""
from __future__ import annotations

from pytorch_metric_learning.losses import CrossBatchMemory

from .dsb_weighting import DSBWeightingMixin

__all__ = ["DSBCrossBatchMemory"]


class DSBCrossBatchMemory(CrossBatchMemory):
    """``CrossBatchMemory`` that accepts the DSB form of the losses it supports.

    PML's wrapper checks the wrapped loss's class name against its list
    (``TripletMarginLoss``, ``ContrastiveLoss``, ...), so it refuses
    ``with_dsb_weighting(TripletMarginLoss)``, named ``DSBTripletMarginLoss``.
    This one checks the PML class under the DSB weighting instead; everything
    else is PML's. Each call passes the batch as queries and PML's queue as
    references: the DSB loss enqueues the batch into its own memory and
    weights every pair or triplet by its anchor's class (a batch sample).
    With ``enqueue_mask``, the DSB memory gets the batch's unmasked rows only
    (the queries PML passes to the loss), and a mask that queues the whole
    batch leaves no query: PML's wrapper then returns 0, this one raises the
    DSB loss's empty-batch ``ValueError``.

    >>> from pytorch_metric_learning.losses import TripletMarginLoss
    >>> from pml_dsb import with_dsb_weighting
    >>> loss = with_dsb_weighting(TripletMarginLoss)(10, 64, memory_size=1000)
    >>> wrapped = DSBCrossBatchMemory(loss, embedding_size=64, memory_size=256)
    """

    def __init__(self, loss, embedding_size, memory_size=1024, miner=None, **kwargs):
        if not isinstance(loss, DSBWeightingMixin):
            raise TypeError(
                f"DSBCrossBatchMemory wraps a DSB loss (e.g. with_dsb_weighting(TripletMarginLoss)(...)), got "
                f"{type(loss).__name__}; use PML's CrossBatchMemory for other losses"
            )
        # the name PML checks: that of the first PML class under the weighting
        # (set before Module.__init__, which runs the check)
        mro = type(loss).__mro__
        object.__setattr__(self, "_checked_name", mro[mro.index(DSBWeightingMixin) + 1].__name__)
        super().__init__(loss, embedding_size, memory_size=memory_size, miner=miner, **kwargs)

    def check_loss_support(self, loss_name):
        super().check_loss_support(self._checked_name)
