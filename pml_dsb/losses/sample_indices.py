"""Dataset indices for DSB losses under PML's trainers."""
from __future__ import annotations

from typing import Callable, Optional

from .dsb_weighting import DSBWeightingMixin

__all__ = ["SampleIndicesGetter"]


class SampleIndicesGetter:
    """A ``data_and_label_getter`` for PML's trainers that hands each batch's
    dataset indices to DSB losses, whose memories are then index-addressed (one
    slot per training sample, the paper's memory) instead of first in, first out.

    The dataset's items must end with their index, as
    :class:`~pml_dsb.datasets.IndexedDataset` returns them. Each batch's last
    field is taken off, announced to every loss (``expect_sample_indices``),
    and the rest goes through ``data_and_label_getter`` (default: the rest is
    ``(data, labels)``, as PML's default getter takes it).

    .. code-block:: python

        loss = DSBSoftTripleLoss(num_classes, embedding_size, memory_size=len(train_set))
        trainer = trainers.MetricLossOnly(
            models, optimizers, batch_size, loss_funcs={"metric_loss": loss},
            dataset=IndexedDataset(train_set), data_and_label_getter=SampleIndicesGetter(loss))

    Not with a trainer's ``"subset_batch_miner"``: it keeps a subset of the
    batch that the indices would no longer match (a batch of another size is
    refused by the loss's checks), nor around a
    :class:`~pml_dsb.distributed.DistributedDSBLossWrapper`, whose loss sees the
    global batch: across ranks, call the loss on each rank's own batch (its
    memory gathers the indices with the rows).
    """

    def __init__(self, *losses: DSBWeightingMixin, data_and_label_getter: Optional[Callable] = None):
        if not losses:
            raise ValueError("SampleIndicesGetter needs at least one DSB loss")
        for loss in losses:
            if not isinstance(loss, DSBWeightingMixin):
                raise TypeError(
                    f"SampleIndicesGetter feeds DSB losses (DSBWeightingMixin), got {type(loss).__name__}"
                )
        self.losses = losses
        self.data_and_label_getter = data_and_label_getter

    def __call__(self, batch):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            kind = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else \
                f"a {type(batch).__name__}"
            raise TypeError(
                f"SampleIndicesGetter expects batches whose last field is the dataset indices (wrap the "
                f"dataset in pml_dsb.datasets.IndexedDataset); got {kind}"
            )
        *rest, indices = batch
        if self.data_and_label_getter is not None:
            data, labels = self.data_and_label_getter(rest)
        elif len(rest) == 2:
            data, labels = rest
        else:
            raise TypeError(
                f"without data_and_label_getter, batches must be (data, labels, indices); got {len(batch)} "
                f"fields"
            )
        for loss in self.losses:
            loss.expect_sample_indices(indices)
        return data, labels
