r"""PML's ``DistributedLossWrapper``, made exact for DSB losses.

Two ways to train a DSB loss on several ranks:

* **Call the loss directly** on each rank's own batch (inside a
  ``DistributedDataParallel`` loop). The memory (``distributed=None``, the
  default) gathers every rank's batch and enqueues the global batch; each
  rank's loss covers its own rows, weighted with the global scales. Average
  the loss's own parameters' gradients with
  :func:`~pml_dsb.distributed.ddp.average_gradients`.
* **Wrap the loss** so that every rank computes it on the global batch, as
  PML's ``DistributedLossWrapper`` does. The memory must then *not* gather
  again (it would enqueue every sample ``world_size`` times): build it with
  ``distributed=False``. PML's wrapper puts each rank's own rows first, so a
  first-in-first-out memory sees a different order on each rank and, when a
  global batch straddles the ring's end, the ranks' memories can differ by
  the samples of that batch. PML's wrapper also gives the loss's own
  parameters ``world_size`` times their gradient. With ``efficient=True``
  PML's wrapper passes each rank's own rows as the queries (the gathered ones
  as ``ref_emb``): keep the default ``distributed=None`` there, so that the
  memory gathers the queries. :class:`DistributedDSBLossWrapper` gathers in
  rank order instead (every rank's memory is identical, and equal to one
  process fed the concatenated batches), gives the loss's parameters the
  one-process gradient, accepts uneven batch sizes and rejects a bad batch
  on every rank alike.
"""
from __future__ import annotations

import torch
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

from .gather import gather_batch, is_distributed

__all__ = ["DistributedDSBLossWrapper"]


class DistributedDSBLossWrapper(DistributedLossWrapper):
    r"""``DistributedLossWrapper`` for losses with a :class:`~pml_dsb.memory.SemanticScaleMemory`.

    Each rank computes the loss of the global batch and returns it: the value
    a single process would get on the concatenated batches (PML's wrapper
    returns ``world_size`` times it). Gradients reach only this rank's rows,
    scaled by ``world_size`` as in PML's wrapper, so that DDP's average over
    ranks gives the model the one-process gradient; the loss's own
    parameters get the one-process gradient on every rank (PML's wrapper
    gives them ``world_size`` times it), so they stay in step without
    ``average_gradients``, and averaging them changes nothing. Unlike PML's wrapper the
    global batch is in rank order on every rank, batch sizes may differ, and a
    batch rejected on one rank raises the same
    :class:`~pml_dsb.distributed.BatchRejectedError` on every rank before the
    loss runs. Rows travel in the widest of the ranks' embedding dtypes, and
    every rank computes the loss in it.

    The wrapped loss's memory is switched to ``distributed=False`` (the batch
    it receives is already global); a memory built with ``distributed=True``
    is refused. Collective: every rank calls the wrapper each iteration.
    ``indices_tuple``, ``ref_emb``, ``ref_labels`` and ``enqueue_mask`` are
    not supported (PML's classification losses take none of them).

    Args:
        loss: a DSB loss (``DSBSoftTripleLoss``, ``DSBNormalizedSoftmaxLoss``,
            any ``DSBWeightingMixin`` loss) with its memory at ``loss.memory``.
    """

    def __init__(self, loss):
        from ..memory.semantic_scale_memory import SemanticScaleMemory  # the memory imports this package

        memory = getattr(loss, "memory", None)
        if not isinstance(memory, SemanticScaleMemory):
            raise TypeError(
                f"loss must be a DSB loss with a SemanticScaleMemory at .memory, got {type(loss).__name__}; "
                "use PML's DistributedLossWrapper for other losses"
            )
        if memory.distributed is True:
            raise ValueError(
                "loss.memory was built with distributed=True, so it would gather the already gathered "
                "batch again; build it with distributed=None or False"
            )
        super().__init__(loss, efficient=False)
        memory.distributed = False
        # every rank's memory takes the same global batches: reads on some ranks
        # only must leave it as it is (see SemanticScaleMemory.scales)
        memory._replicated_by_wrapper = True

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, enqueue_mask=None):
        unsupported = {"indices_tuple": indices_tuple, "ref_emb": ref_emb, "ref_labels": ref_labels,
                       "enqueue_mask": enqueue_mask}
        given = [name for name, value in unsupported.items() if value is not None]
        if not is_distributed() or torch.distributed.get_world_size() == 1:
            if given:  # as with several ranks, not silently ignored or passed on
                raise ValueError(f"DistributedDSBLossWrapper does not support {given}")
            return self.loss(embeddings, labels)
        memory = self.loss.memory
        enqueues = self.loss.update_memory and torch.is_grad_enabled()

        def check(emb, lab, _):  # inside the collective check: a bad call on one rank raises on all
            if given:
                raise ValueError(f"DistributedDSBLossWrapper does not support {given}")
            # as the wrapped loss will check it: a batch it only reads is not checked
            # against the memory's size or addressing
            memory.validate_batch(emb, lab, enqueue=enqueues)

        # the ranks agree on enqueueing too: a rank under no_grad() alone would
        # leave its memory behind the others'
        batch = gather_batch(
            embeddings, labels, check=check, drop_duplicate_indices=False, widest_dtype=True, enqueues=enqueues
        )
        # every rank computes in the widest dtype of the ranks' rows, on the same
        # values: its own rows are an exact cast of what the others received
        rows = batch.embeddings.to(device=embeddings.device)
        end = batch.offset + embeddings.shape[0]
        # this rank's rows carry world_size x their gradient (DDP averages it
        # back); the loss itself is not scaled, so its parameters' gradient is
        # the one-process one
        own = _ScaleGradient.apply(embeddings.to(rows.dtype), torch.distributed.get_world_size())
        all_emb = torch.cat([rows[: batch.offset], own, rows[end:]])
        all_labels = batch.labels.to(labels.device)
        return self.loss(all_emb, all_labels)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``factor`` backward."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None
