"""PML's ``CrossBatchMemory`` around a DSB pair or triplet loss."""
from __future__ import annotations

import copy

import torch
from pytorch_metric_learning.losses import CrossBatchMemory
from pytorch_metric_learning.utils import common_functions as c_f

from ..functional.semantic_scale import check_int
from .dsb_weighting import DSBWeightingMixin, _validate_storing, check_indices_tuple

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
    (the queries PML passes to the loss); a mask that queues the whole batch
    leaves no query, and the call returns PML's zero loss with the DSB memory
    as it was.

    Every row is checked (as :meth:`SemanticScaleMemory.validate_batch` checks a
    batch that is read, not stored), and the queries as the DSB memory will
    store them (their number, the memory's addressing), before PML's queue
    takes any: a bad batch raises and leaves both memories as they were.
    Dataset indices announced for the batch (a
    :class:`~pml_dsb.losses.SampleIndicesGetter`) go with its queries. When
    the DSB memory gathers across ranks, the ranks must agree on whether a
    call passes ``enqueue_mask`` and whether it has queries (the checks make
    different collective calls; a queue-only call makes none of the loss's).

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
        # PML accepted 0 (failing at the first call) and gave torch's errors for the rest
        embedding_size = check_int("embedding_size", embedding_size, 1)
        memory_size = check_int("memory_size", memory_size, 1)
        # the name PML checks: that of the first PML class under the weighting
        # (set before Module.__init__, which runs the check)
        mro = type(loss).__mro__
        object.__setattr__(self, "_checked_name", mro[mro.index(DSBWeightingMixin) + 1].__name__)
        super().__init__(loss, embedding_size, memory_size=memory_size, miner=miner, **kwargs)

    def check_loss_support(self, loss_name):
        """PML's check, on the PML class under the DSB weighting."""
        super().check_loss_support(self._checked_name)

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        # dataset indices announced for the batch (SampleIndicesGetter) serve this
        # call only, even a failing one, and go with its queries
        announced = getattr(self.loss, "_pending_sample_indices", None)  # absent from older pickles
        self.loss._pending_sample_indices = None
        # PML's wrapper writes its queue before the loss sees the batch: check first
        memory = self.loss.memory
        stores = self.loss.update_memory and torch.is_grad_enabled()
        has_queries = True

        def pml_checks():  # PML's own, which fail on one rank only, or after its queue changed
            if indices_tuple is not None and enqueue_mask is not None:
                raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
            if indices_tuple is not None:
                self._check_indices_tuple(indices_tuple, len(embeddings))
            if enqueue_mask is not None:
                self._check_enqueue_mask(enqueue_mask, len(embeddings))
                # more rows than slots would overwrite slots within one write and
                # leave PML's position short of a full queue
                if int(enqueue_mask.sum()) > self.memory_size:
                    raise ValueError(
                        f"enqueue_mask queues {int(enqueue_mask.sum())} embeddings, more than the queue's "
                        f"memory_size={self.memory_size}"
                    )
            elif isinstance(embeddings, torch.Tensor) and len(embeddings) > self.memory_size:
                raise ValueError(
                    f"batch of {len(embeddings)} embeddings is larger than the queue's memory_size={self.memory_size}"
                )

        if enqueue_mask is None and stores:
            # every row is a query the loss stores: one check covers reading and storing
            _validate_storing(memory, pml_checks, embeddings, labels, announced)
        else:
            memory._validate_with(pml_checks, embeddings, labels, None, enqueue=False)  # every row is read
            if enqueue_mask is not None:
                has_queries = not bool(enqueue_mask.all())
                if isinstance(announced, torch.Tensor) and announced.shape == labels.shape:
                    announced = announced[~enqueue_mask]
            if has_queries and stores:
                # the loss stores the queries: their size and the memory's addressing too
                _validate_storing(memory, None, embeddings[~enqueue_mask], labels[~enqueue_mask], announced)
        if indices_tuple is not None or has_queries:
            self.loss._pending_sample_indices = announced  # for the loss's call inside PML's forward
            queued = len(embeddings) if enqueue_mask is None else int(enqueue_mask.sum())
            saved, stored_before = self._queue_rows(queued), int(memory.enqueued_count)
            try:
                return super().forward(embeddings, labels, indices_tuple, enqueue_mask)
            except BaseException:
                # what PML raises after writing its queue (a miner's error, say) leaves it as it
                # was; unless the DSB memory already took the batch, which both then keep
                if int(memory.enqueued_count) == stored_before:
                    self._restore_queue_rows(*saved)
                raise
            finally:
                self.loss._pending_sample_indices = None  # also where PML raised before calling it
        # every row goes to the queue and none is a query: PML's wrapper returns
        # its zero loss; the DSB memory, which stores queries only, stays as it is
        self.reset_stats()
        labels = c_f.to_device(labels, device=embeddings.device)
        self.embedding_memory = c_f.to_device(self.embedding_memory, device=embeddings.device, dtype=embeddings.dtype)
        self.label_memory = c_f.to_device(self.label_memory, device=embeddings.device, dtype=labels.dtype)
        self.add_to_memory(embeddings, labels, len(embeddings))
        return torch.sum(embeddings[:0] * 0)

    def _queue_rows(self, count: int):
        """What ``add_to_memory`` of ``count`` rows overwrites: the queue's
        position and the rows (a batch's worth, copied)."""
        rows = (self.queue_idx + torch.arange(count, device=self.embedding_memory.device)) % self.memory_size
        return self.queue_idx, self.has_been_filled, rows, self.embedding_memory[rows], self.label_memory[rows]

    def _restore_queue_rows(self, queue_idx, filled, rows, embeddings, labels) -> None:
        self.queue_idx, self.has_been_filled = queue_idx, filled
        with torch.no_grad():
            self.embedding_memory[rows.to(self.embedding_memory.device)] = embeddings.to(self.embedding_memory)
            self.label_memory[rows.to(self.label_memory.device)] = labels.to(self.label_memory)

    def _check_indices_tuple(self, indices_tuple, batch: int) -> None:
        """PML indexes its queue with these after adding the batch to it:
        anchors index the batch, the other entries the queue as it will be."""
        filled = self.has_been_filled or self.queue_idx + batch >= self.memory_size
        check_indices_tuple(indices_tuple, batch, self.memory_size if filled else self.queue_idx + batch, "the queue")

    # PML keeps its queue's position in plain attributes: without them in the
    # state_dict a restored queue restarts empty at slot 0
    def get_extra_state(self):
        return {"queue_idx": int(self.queue_idx), "has_been_filled": bool(self.has_been_filled)}

    def set_extra_state(self, state):
        self._check_queue_state(state)
        self.queue_idx, self.has_been_filled = state["queue_idx"], state["has_been_filled"]

    def _check_queue_state(self, state) -> None:
        queue_idx = state.get("queue_idx") if isinstance(state, dict) else None
        filled = state.get("has_been_filled") if isinstance(state, dict) else None
        if not (isinstance(queue_idx, int) and 0 <= queue_idx < self.memory_size and isinstance(filled, bool)):
            raise ValueError(
                f"queue state {state!r} does not fit this DSBCrossBatchMemory (memory_size={self.memory_size})"
            )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As torch loads, except that on an error (a size mismatch, or with
        ``strict`` a missing or unexpected key) PML's queue and the DSB loss's
        memory are both put back as they were: torch loads what fits and raises
        at the end, which left the queue of one checkpoint beside the memory of
        another. With ``strict=False`` a part missing from ``state_dict`` stays
        as it is and is reported in ``missing_keys``, as torch does. The queue
        takes the checkpoint's dtypes (PML's forward gives it each batch's:
        float64 rows, int32 labels), so a restored queue continues as the
        saved one would."""
        saved = {
            key: value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
            for key, value in self.state_dict().items()
        }
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except Exception:
            # with assign, the module's tensors are now the caller's: take the copies
            # back rather than writing into the caller's state_dict
            super().load_state_dict(saved, strict=False, assign=assign)
            raise

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs):
        error_msgs = args[1]  # (unexpected_keys, error_msgs)
        # the queue's rows and its position are one state: check both before taking either
        key = prefix + torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX
        mismatched = [
            f"size mismatch for {prefix + name}: copying a param with shape {tuple(state_dict[prefix + name].shape)} "
            f"from checkpoint, the shape in current model is {tuple(getattr(self, name).shape)}."
            for name in ("embedding_memory", "label_memory")
            if isinstance(state_dict.get(prefix + name), torch.Tensor)
            and state_dict[prefix + name].shape != getattr(self, name).shape
        ]
        if key in state_dict:
            self._check_queue_state(state_dict[key])  # ValueError, as set_extra_state's
        if mismatched:
            error_msgs.extend(mismatched)
            error_msgs.append(f"the queue of the {type(self).__name__} was left unchanged (nothing loaded into it)")
            return
        # PML's forward gives the queue each batch's dtype (float64 rows, int32
        # labels): the queue takes the checkpoint's, so that nothing is rounded
        # and the restored queue continues as the saved one would
        for name in ("embedding_memory", "label_memory"):
            saved, current = state_dict.get(prefix + name), getattr(self, name)
            if (
                isinstance(saved, torch.Tensor) and saved.dtype != current.dtype
                and saved.is_floating_point() == current.is_floating_point() and saved.dtype != torch.bool
            ):
                setattr(self, name, current.to(saved.dtype))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs)
        if key in missing_keys:  # saved before the queue's position was: it restarts, as it did then
            missing_keys.remove(key)
            self.queue_idx, self.has_been_filled = 0, False

    @staticmethod
    def _check_enqueue_mask(enqueue_mask, batch: int) -> None:
        if not isinstance(enqueue_mask, torch.Tensor) or enqueue_mask.dtype != torch.bool:
            kind = enqueue_mask.dtype if isinstance(enqueue_mask, torch.Tensor) else type(enqueue_mask).__name__
            raise TypeError(f"enqueue_mask must be a bool tensor, got {kind}")
        if enqueue_mask.shape != (batch,):
            raise ValueError(
                f"enqueue_mask has shape {tuple(enqueue_mask.shape)}; expected ({batch},), one flag per embedding"
            )
