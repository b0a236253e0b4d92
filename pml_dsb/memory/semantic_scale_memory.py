r"""A cross-batch memory of embeddings that supplies per-class semantic scales.

The memory is a ring buffer of the latest ``memory_size`` (M) detached,
L2-normalised embeddings with their labels, like PML's ``CrossBatchMemory``.
Its stage follows the number of samples enqueued (DEFINITIONS.md):

1. fewer than M enqueued: the memory fills, losses stay unweighted;
2. fewer than ``warmup_epochs * M``: oldest entries are replaced first in,
   first out, losses stay unweighted;
3. afterwards the scales of every class come from the memory after each
   enqueue, and losses are weighted by :math:`1/S`.

Cost: each class keeps the list of its slots, so a refresh touches only the
classes whose samples were enqueued or dequeued since the last one (they are
marked stale) and gathers only their samples; nothing scans the whole memory,
so the cost does not grow with M. Scales of stale classes are recomputed from
scratch from the stored embeddings (no running sums, so no drift).

Sampling caveat: first in, first out equals "the latest embedding of every
training sample" only when the sampler visits each sample once per epoch and
M equals the training-set size. A class-balanced sampler fills the memory with
its own class mix instead. Pass dataset indices to :meth:`enqueue` to get an
index-addressed memory (one slot per sample), the faithful form for any sampler.

All state, counters included, lives in registered buffers: ``state_dict()``,
``load_state_dict()`` and ``.to(device)`` carry everything.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..functional.semantic_scale import padded_class_scales, size_buckets
from ..functional.weights import check_normalize, dsb_weights

logger = logging.getLogger(__name__)

__all__ = ["SemanticScaleMemory"]


def _is_integer_tensor(x: torch.Tensor) -> bool:
    return not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)


class SemanticScaleMemory(torch.nn.Module):
    r"""Ring-buffer memory of embeddings with per-class semantic scales.

    Args:
        num_classes: C, number of classes (labels in ``[0, C)``), at least 2.
        embedding_size: d, the embedding dimension.
        memory_size: M, the number of embeddings kept; the paper uses the
            training-set size.
        warmup_epochs: n; the loss is weighted once ``n * M`` samples have
            been enqueued (n = 0 weights from the first batch on).
        normalize: ``"mean"`` (weights average 1 over classes with a scale)
            or ``None`` (raw :math:`1/S`).
        eps: scales at or below this count as "no scale yet".
        l2_normalize: store L2-normalised embeddings (default, as the
            definition of semantic scale says).
        scale_dtype: precision of the scale computation (float64 default).

    Example:
        >>> import torch
        >>> mem = SemanticScaleMemory(num_classes=3, embedding_size=4, memory_size=6, warmup_epochs=1)
        >>> g = torch.Generator().manual_seed(0)
        >>> mem.enqueue(torch.randn(6, 4, generator=g), torch.tensor([0, 0, 1, 1, 1, 2]))
        >>> mem.stage, mem.num_enqueued, mem.class_counts.tolist()
        (3, 6, [2, 3, 1])
        >>> mem.weights()[2] == mem.weights().max()   # class 2 has one sample: largest weight
        tensor(True)
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        memory_size: int,
        warmup_epochs: int = 5,
        normalize: Optional[str] = "mean",
        eps: float = 1e-12,
        l2_normalize: bool = True,
        scale_dtype: torch.dtype = torch.float64,
    ):
        super().__init__()
        for name, value, low in (
            ("num_classes", num_classes, 2),
            ("embedding_size", embedding_size, 1),
            ("memory_size", memory_size, 1),
            ("warmup_epochs", warmup_epochs, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        check_normalize(normalize)
        if scale_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"scale_dtype must be torch.float32 or torch.float64, got {scale_dtype}")
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.memory_size = memory_size
        self.warmup_epochs = warmup_epochs
        self.normalize = normalize
        self.eps = eps
        self.l2_normalize = l2_normalize
        self.scale_dtype = scale_dtype

        capacity = min(memory_size, max(16, 2 * math.ceil(memory_size / num_classes)))
        self.register_buffer("embedding_memory", torch.zeros(memory_size, embedding_size))
        self.register_buffer("label_memory", torch.full((memory_size,), -1, dtype=torch.long))
        # slot_position[s]: where slot s sits in class_slots[label_memory[s]]
        self.register_buffer("slot_position", torch.full((memory_size,), -1, dtype=torch.long))
        # class_slots[c]: the slots holding class c, -1 for free positions
        self.register_buffer("class_slots", torch.full((num_classes, capacity), -1, dtype=torch.long))
        self.register_buffer("class_counts", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("cached_scales", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("stale", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("queue_idx", torch.zeros((), dtype=torch.long))
        self.register_buffer("enqueued_count", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ state
    @property
    def num_enqueued(self) -> int:
        """Samples enqueued since creation (or the last :meth:`reset`)."""
        return int(self.enqueued_count)

    @property
    def num_filled(self) -> int:
        """Slots that hold a sample."""
        return int(self.class_counts.sum())

    @property
    def fill_level(self) -> float:
        """Fraction of the memory's slots that hold a sample."""
        return self.num_filled / self.memory_size

    @property
    def stage(self) -> int:
        """1 while filling, 2 while warming up, 3 once weighting applies."""
        n = self.num_enqueued
        if n >= self.warmup_epochs * self.memory_size:
            return 3
        return 1 if n < self.memory_size else 2

    def reset(self) -> None:
        """Empty the memory and its counters."""
        self.embedding_memory.zero_()
        for buf in (self.label_memory, self.slot_position, self.class_slots):
            buf.fill_(-1)
        for buf in (self.class_counts, self.cached_scales, self.queue_idx, self.enqueued_count):
            buf.zero_()
        self.stale.zero_()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"memory_size={self.memory_size}, warmup_epochs={self.warmup_epochs}, "
            f"normalize={self.normalize!r}"
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # class_slots grows with the largest class; take the saved capacity.
        key = prefix + "class_slots"
        if key in state_dict and state_dict[key].shape[0] == self.num_classes:
            self.class_slots = torch.empty_like(state_dict[key], device=self.class_slots.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------- validation
    def validate_batch(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices: Optional[torch.Tensor] = None,
    ) -> None:
        """Raise ``TypeError``/``ValueError`` for a batch :meth:`enqueue` would reject."""
        if not isinstance(embeddings, torch.Tensor):
            raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
        if not embeddings.is_floating_point():
            raise TypeError(f"embeddings must be floating point, got dtype {embeddings.dtype}")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must have shape (batch, embedding_size={self.embedding_size}), "
                f"got {tuple(embeddings.shape)}"
            )
        batch = embeddings.shape[0]
        if batch == 0:
            raise ValueError("embeddings is an empty batch (0 rows); expected at least one sample")
        if batch > self.memory_size:
            raise ValueError(
                f"batch of {batch} embeddings is larger than memory_size={self.memory_size}"
            )
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if not _is_integer_tensor(labels):
            raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.dim() != 1 or labels.shape[0] != batch:
            raise ValueError(
                f"labels must have shape ({batch},) to match embeddings, got {tuple(labels.shape)}"
            )
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= self.num_classes:
            raise ValueError(
                f"labels must lie in [0, num_classes={self.num_classes}), got values in [{lo}, {hi}]"
            )
        if not bool(torch.isfinite(embeddings).all()):
            bad = int((~torch.isfinite(embeddings)).any(1).sum())
            raise ValueError(
                f"embeddings contain NaN or Inf in {bad} of {batch} rows; the memory was not changed"
            )
        if indices is not None:
            if not isinstance(indices, torch.Tensor) or not _is_integer_tensor(indices):
                raise TypeError("indices must be an integer torch.Tensor of dataset indices")
            if indices.dim() != 1 or indices.shape[0] != batch:
                raise ValueError(
                    f"indices must have shape ({batch},) to match embeddings, got {tuple(indices.shape)}"
                )
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= self.memory_size:
                raise ValueError(
                    f"indices must lie in [0, memory_size={self.memory_size}), got values in [{lo}, {hi}]"
                )
            if torch.unique(indices).numel() != batch:
                raise ValueError("indices contain duplicates; each sample needs its own slot")

    # ---------------------------------------------------------------- enqueue
    @torch.no_grad()
    def enqueue(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices: Optional[torch.Tensor] = None,
    ) -> None:
        """Store a batch (detached) and mark the classes it touches stale.

        Args:
            embeddings: (B, d) floating tensor, any device and dtype; stored as
                L2-normalised float32 on the memory's device.
            labels: (B,) integer class labels in ``[0, num_classes)``.
            indices: optional (B,) dataset indices in ``[0, memory_size)``: each
                sample then overwrites its own slot (index-addressed memory)
                instead of the oldest one.

        Bad input raises before anything changes.
        """
        self.validate_batch(embeddings, labels, indices)
        device = self.embedding_memory.device
        emb = embeddings.detach().to(device=device, dtype=torch.float32)
        if self.l2_normalize:
            emb = F.normalize(emb, dim=1)
        labels = labels.detach().to(device=device, dtype=torch.long)
        batch = emb.shape[0]
        if indices is None:
            slots = (self.queue_idx + torch.arange(batch, device=device)) % self.memory_size
        else:
            slots = indices.detach().to(device=device, dtype=torch.long)

        self._remove(slots)
        self.embedding_memory[slots] = emb
        self.label_memory[slots] = labels
        positions = self._allocate_positions(labels)
        self.class_slots[labels, positions] = slots
        self.slot_position[slots] = positions
        self.class_counts.index_add_(0, labels, torch.ones_like(labels))
        self.stale[labels] = True
        if indices is None:
            self.queue_idx.copy_((self.queue_idx + batch) % self.memory_size)
        self.enqueued_count += batch

    def _remove(self, slots: torch.Tensor) -> None:
        old = self.label_memory[slots]
        filled = old >= 0
        slots, old = slots[filled], old[filled]
        if slots.numel() == 0:
            return
        self.class_slots[old, self.slot_position[slots]] = -1
        self.class_counts.index_add_(0, old, -torch.ones_like(old))
        self.stale[old] = True
        self.label_memory[slots] = -1
        self.slot_position[slots] = -1

    def _allocate_positions(self, labels: torch.Tensor) -> torch.Tensor:
        """A free position in its class's slot list for every new sample."""
        classes, inverse, new_counts = torch.unique(labels, return_inverse=True, return_counts=True)
        needed = int((self.class_counts[classes] + new_counts).max())
        if needed > self.class_slots.shape[1]:
            self._grow_capacity(needed)
        cumulative_free = (self.class_slots[classes] < 0).cumsum(1)
        # rank of each sample among this batch's samples of its class
        order = torch.argsort(inverse, stable=True)
        first = torch.cumsum(new_counts, 0) - new_counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(labels), device=labels.device) - first[inverse[order]]
        return torch.searchsorted(
            cumulative_free[inverse], (rank + 1).unsqueeze(1)
        ).squeeze(1)

    def _grow_capacity(self, needed: int) -> None:
        old = self.class_slots
        capacity = min(self.memory_size, max(needed, 2 * old.shape[1]))
        grown = torch.full((self.num_classes, capacity), -1, dtype=old.dtype, device=old.device)
        grown[:, : old.shape[1]] = old
        self.class_slots = grown
        logger.debug("class slot capacity grown to %d", capacity)

    # --------------------------------------------------------- scales/weights
    @torch.no_grad()
    def scales(self) -> torch.Tensor:
        """(C,) float64 semantic scales of the memory's contents, in bits.

        Recomputes only the classes touched since the last call; 0 for a class
        with fewer than two samples.
        """
        stale = torch.nonzero(self.stale).flatten()
        if stale.numel():
            self.cached_scales[stale] = self._compute_scales(stale).to(torch.float64)
            self.stale[stale] = False
        return self.cached_scales.clone()

    def weights(self) -> torch.Tensor:
        """(C,) float64 DSB weights :math:`1/S_c` (see :func:`pml_dsb.functional.dsb_weights`)."""
        return dsb_weights(self.scales(), self.class_counts, self.normalize, self.eps)

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored (embeddings, labels), unfilled slots left out."""
        filled = self.label_memory >= 0
        return self.embedding_memory[filled], self.label_memory[filled]

    def _compute_scales(self, classes: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(classes), dtype=self.scale_dtype, device=classes.device)
        counts = self.class_counts[classes]
        for bucket in size_buckets(counts):
            bucket = bucket[counts[bucket] >= 2]
            if bucket.numel() == 0:
                continue
            rows = self.class_slots[classes[bucket]]
            width = int(counts[bucket].max())
            # filled positions first, in slot-list order
            order = torch.argsort((rows < 0).to(torch.int8), dim=1, stable=True)[:, :width]
            rows = torch.gather(rows, 1, order)
            mask = rows >= 0
            block = self.embedding_memory[rows.clamp(min=0)]
            out[bucket] = padded_class_scales(block, mask, normalize=False, dtype=self.scale_dtype)
        return out
