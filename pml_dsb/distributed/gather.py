r"""Collective validation and gathering of a batch across ``torch.distributed`` ranks.

:class:`~pml_dsb.memory.SemanticScaleMemory` uses these functions so that
every rank enqueues the same *global* batch, the concatenation of all ranks'
batches in rank order, and therefore holds the same memory, the same stage
counter and the same scales (M counts global samples).

Contract (collective calls): when the memory gathers, every rank must call
the loss (or ``validate_batch`` / ``enqueue``) the same number of times, in
the same order, with batch sizes that may differ but must be at least 1.
Each call makes the same collective calls on every rank, whatever the data:

1. one ``all_gather`` of a small status vector: whether the rank's batch
   passed its local checks, its batch size, whether it carries dataset
   indices, and an order-free fingerprint of its contents;
2. if any rank's batch failed: one ``all_gather_object`` of the error
   messages, after which *every* rank raises the same
   :class:`BatchRejectedError` (a ``ValueError``), chained to the local error
   on the ranks where it happened; nothing is enqueued on any rank;
3. otherwise (gathering only, not for a bare validation): one ``all_gather``
   of the batches, padded to the largest batch size and trimmed after.

So no rank ever waits in a gather that another skips, as long as every rank
reaches the call; a rank that stops calling the loss (an uneven number of
iterations, an exception raised only on one rank between two calls) blocks
the others until the process group's timeout, as with
``DistributedDataParallel`` itself. Use ``DistributedSampler`` (equal number
of batches per rank) and let an exception raised by a collective call end the
iteration on every rank alike.

Rows are exchanged as float32 (the memory stores float32; each rank sends
its rows as it stores them) or in the widest dtype of the ranks' rows
(:class:`~pml_dsb.distributed.DistributedDSBLossWrapper`), labels and indices
as int64, all bit-exact.
"""
from __future__ import annotations

import functools
import logging
import warnings
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist

from ..functional.semantic_scale import describe

logger = logging.getLogger(__name__)

__all__ = [
    "BatchRejectedError",
    "GlobalBatch",
    "is_distributed",
    "should_gather",
    "check_batch_collectively",
    "gather_batch",
]

# the status vector exchanged before any data (see check_batch_collectively):
# (failed, batch size, has indices, label fingerprint, embedding fingerprint,
# embedding dtype code, embedding dim, enqueues: 1, 0 or -1 for not given)

# embedding dtypes by code (-1: none of these, e.g. a rejected batch)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class BatchRejectedError(ValueError):
    """A batch rejected on at least one rank, raised on every rank with the same message.

    Attributes:
        bad_ranks: the ranks whose batch failed their checks.
    """

    def __init__(self, message: str, bad_ranks: list[int]):
        super().__init__(message)
        self.bad_ranks = list(bad_ranks)


class GlobalBatch(NamedTuple):
    """All ranks' batches concatenated in rank order (detached).

    ``embeddings`` float32 (or see ``widest_dtype``) (N, d), ``labels`` int64 (N,), ``indices`` int64
    (N,) or None; ``sizes`` the batch size of each rank (before duplicate
    dataset indices across ranks are dropped) and ``offset`` where this rank's
    rows start.
    """

    embeddings: torch.Tensor
    labels: torch.Tensor
    indices: Optional[torch.Tensor]
    sizes: list[int]
    offset: int


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and initialised."""
    return dist.is_available() and dist.is_initialized()


def should_gather(setting: Optional[bool], group=None) -> bool:
    """Whether a memory with ``distributed=setting`` gathers across ranks now.

    ``None`` (auto): when ``torch.distributed`` is initialised and the world
    has more than one rank. ``False``: never (one process, or a batch already
    gathered, as PML's ``DistributedLossWrapper`` hands over). ``True``:
    always; ``torch.distributed`` must then be initialised.

    >>> should_gather(None), should_gather(False)   # not initialised here
    (False, False)
    """
    if setting is None:
        return is_distributed() and dist.get_world_size(group) > 1
    if setting is False:
        return False
    if setting is True:
        if not is_distributed():
            raise RuntimeError(
                "distributed=True but torch.distributed is not initialised: call "
                "torch.distributed.init_process_group first, or use distributed=None "
                "(gather only when initialised with more than one rank)"
            )
        return True
    raise ValueError(f"distributed must be None, True or False, got {setting!r}")


def _comm_device(group) -> torch.device:
    """Where the backend wants collective tensors: CUDA for NCCL, else CPU."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _fingerprint(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """Order-free, exact fingerprint of a batch: sums of the label values and of
    the float32 bit patterns of the embeddings (same for any row order)."""
    bits = embeddings.detach().to(torch.float32).contiguous().view(torch.int32)
    return int(labels.detach().to(torch.long).sum()), int(bits.to(torch.long).sum())


def _check_shapes(embeddings, labels, indices) -> None:
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        raise ValueError(f"embeddings must be a (batch, size) tensor, got {describe(embeddings)}")
    batch = embeddings.shape[0]
    for name, value in (("labels", labels), ("indices", indices)):
        if name == "indices" and value is None:
            continue
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or len(value) != batch:
            raise ValueError(f"{name} must be a ({batch},) tensor, one per embedding, got {describe(value)}")
        if value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name} must be integers, got dtype {value.dtype}")


def check_batch_collectively(
    check: Optional[Callable[..., None]],
    embeddings,
    labels,
    indices=None,
    group=None,
    enqueues: Optional[bool] = None,
) -> tuple[list[int], bool]:
    """Run ``check(embeddings, labels, indices)`` here and agree on the verdict with every rank.

    Collective: every rank of ``group`` must call it. Returns each rank's
    batch size and whether the batches carry dataset indices. If the batch of
    any rank fails its check (any exception), or ranks disagree on passing
    indices, or on ``enqueues`` (whether the call stores the batch or only
    reads it: ``torch.no_grad()`` or ``update_memory=False`` on some ranks
    only, whose next collective calls would differ; None: no say), every
    rank raises the same :class:`BatchRejectedError`.

    Also warns when every rank holds exactly the same batch (same size and
    fingerprint): either the data is not sharded across ranks, or the batch
    was already gathered (PML's ``DistributedLossWrapper``) and the memory
    should be built with ``distributed=False``.
    """
    sizes, with_indices, _ = _agree(check, embeddings, labels, indices, group, enqueues)
    return sizes, with_indices


def _agree(check, embeddings, labels, indices, group, enqueues=None) -> tuple[list[int], bool, list]:
    """:func:`check_batch_collectively`, also returning each rank's embedding dtype."""
    error: Optional[BaseException] = None
    try:
        if check is not None:
            check(embeddings, labels, indices)
        _check_shapes(embeddings, labels, indices)  # what the exchange relies on, whatever ``check`` is
        batch, dim = int(embeddings.shape[0]), int(embeddings.shape[1])
        fp_labels, fp_emb = _fingerprint(embeddings, labels)
        dtype_code = _FLOAT_DTYPES.index(embeddings.dtype) if embeddings.dtype in _FLOAT_DTYPES else -1
    except Exception as err:  # every failure must reach the other ranks
        error, batch, dim, fp_labels, fp_emb, dtype_code = err, 0, 0, 0, 0, -1

    world = dist.get_world_size(group)
    device = _comm_device(group)
    status = torch.tensor(
        [int(error is not None), batch, int(indices is not None), fp_labels, fp_emb, dtype_code, dim,
         -1 if enqueues is None else int(enqueues)],
        dtype=torch.long,
        device=device,
    )
    table = [torch.empty_like(status) for _ in range(world)]
    dist.all_gather(table, status, group=group)
    table = torch.stack(table).cpu()

    bad = torch.nonzero(table[:, 0]).flatten().tolist()
    if bad:
        local = None if error is None else f"{type(error).__name__}: {error}"
        messages: list = [None] * world
        dist.all_gather_object(messages, local, group=group)
        detail = "; ".join(f"rank {r}: {messages[r]}" for r in bad)
        raise BatchRejectedError(
            f"batch rejected on {len(bad)} of {world} ranks ({detail}); "
            "no rank changed its memory",
            bad,
        ) from error
    dims = table[:, 6].tolist()
    if len(set(dims)) > 1:
        raise BatchRejectedError(
            f"the ranks' embeddings have different sizes {dims} (in rank order); no rank changed its memory",
            [r for r, size in enumerate(dims) if size != dims[0]],
        )
    modes = table[:, 7].tolist()
    if len({m for m in modes if m >= 0}) > 1:
        stores = [r for r, m in enumerate(modes) if m == 1]
        raise BatchRejectedError(
            f"ranks {stores} store this batch in their memory and ranks "
            f"{[r for r, m in enumerate(modes) if m == 0]} only read it (torch.no_grad() or "
            "update_memory=False on some ranks only): every rank must do the same; no rank changed its memory",
            [r for r, m in enumerate(modes) if m == 0],
        )
    with_indices = table[:, 2].tolist()
    if len(set(with_indices)) > 1:
        given = [r for r, flag in enumerate(with_indices) if flag]
        raise BatchRejectedError(
            f"sample indices were passed on ranks {given} but not on the others; "
            "pass dataset indices on every rank or on none; no rank changed its memory",
            [r for r, flag in enumerate(with_indices) if not flag],
        )
    if world > 1 and bool((table[:, 1:5] == table[0, 1:5]).all()):
        warnings.warn(
            f"all {world} ranks passed the same batch to a gathering SemanticScaleMemory: "
            "if the loss is wrapped in PML's DistributedLossWrapper (which gathers already), "
            "build the memory with distributed=False or use "
            "pml_dsb.distributed.DistributedDSBLossWrapper; otherwise shard the data "
            "across ranks (DistributedSampler)",
            RuntimeWarning,
            stacklevel=3,
        )
    dtypes = [_FLOAT_DTYPES[c] if c >= 0 else None for c in table[:, 5].tolist()]
    return table[:, 1].tolist(), bool(with_indices[0]), dtypes


def gather_batch(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    indices: Optional[torch.Tensor] = None,
    *,
    check: Optional[Callable[..., None]] = None,
    group=None,
    drop_duplicate_indices: bool = True,
    widest_dtype: bool = False,
    enqueues: Optional[bool] = None,
) -> GlobalBatch:
    """Every rank's batch, concatenated in rank order, on every rank.

    Collective (see the module's contract). First the verdict of
    ``check`` is agreed on (:func:`check_batch_collectively`), so a batch
    rejected on one rank raises the same :class:`BatchRejectedError` on all;
    then the detached rows are exchanged, padded to the largest batch and
    trimmed, so batch sizes may differ across ranks.

    With dataset ``indices``, a sample that appears on two ranks (as
    ``DistributedSampler`` pads the last batches by repeating samples) is kept
    once, its last copy in rank order (as one process keeps the last copy of
    an index repeated in a batch), when ``drop_duplicate_indices``.

    Rows travel as float32, or with ``widest_dtype`` in the widest of the
    ranks' floating dtypes (float64 as such, narrower ones as float32, exact),
    and come back in it: then every rank holds the same values, its own rows
    included (an exact cast of them).

    ``enqueues``: whether this call stores the batch, agreed on as
    :func:`check_batch_collectively` does.

    Returns a :class:`GlobalBatch` on the collective device (CPU for gloo).
    """
    sizes, with_indices, dtypes = _agree(check, embeddings, labels, indices, group, enqueues)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device = _comm_device(group)
    batch, dim = sizes[rank], embeddings.shape[1]
    known = [d for d in dtypes if d is not None] or [torch.float32]  # None: a float8 or such
    common = functools.reduce(torch.promote_types, known) if widest_dtype else torch.float32
    carrier = torch.float64 if common == torch.float64 else torch.float32
    width = dim * (carrier.itemsize // 4)  # int32 columns per row

    # one int32 payload per row: the row's float32 (or float64) bits, then the
    # int64 label (and index) as two int32 each; an exact copy whatever the values
    parts = [
        embeddings.detach().to(device=device, dtype=carrier).contiguous().view(torch.int32),
        labels.detach().to(device=device, dtype=torch.long).contiguous().reshape(batch, 1).view(torch.int32),
    ]
    if with_indices:
        index_column = indices.detach().to(device=device, dtype=torch.long).contiguous().reshape(batch, 1)
        parts.append(index_column.view(torch.int32))
    payload = torch.zeros(max(sizes), sum(p.shape[1] for p in parts), dtype=torch.int32, device=device)
    payload[:batch] = torch.cat(parts, dim=1)
    received = [torch.empty_like(payload) for _ in range(world)]
    dist.all_gather(received, payload, group=group)
    rows = torch.cat([block[:size] for block, size in zip(received, sizes)])

    emb = rows[:, :width].contiguous().view(carrier).to(common)
    lab = rows[:, width : width + 2].contiguous().view(torch.long).reshape(-1)
    idx = rows[:, width + 2 : width + 4].contiguous().view(torch.long).reshape(-1) if with_indices else None
    if idx is not None and drop_duplicate_indices:
        keep = torch.zeros(len(idx), dtype=torch.bool, device=idx.device)
        keep[last_occurrences(idx)] = True
        if not bool(keep.all()):
            logger.debug("dropped %d samples repeated across ranks", int((~keep).sum()))
            emb, lab, idx = emb[keep], lab[keep], idx[keep]
    return GlobalBatch(emb, lab, idx, sizes, sum(sizes[:rank]))


def last_occurrences(indices: torch.Tensor) -> torch.Tensor:
    """Positions of the last occurrence of each distinct value, in increasing order.

    >>> last_occurrences(torch.tensor([4, 7, 4, 2])).tolist()
    [1, 2, 3]
    """
    n = indices.numel()
    _, inverse = torch.unique(indices, return_inverse=True)
    last = torch.full((int(inverse.max()) + 1,), -1, dtype=torch.long)
    last = last.scatter_reduce(0, inverse.cpu(), torch.arange(n), reduce="amax")
    return last.sort().values.to(indices.device)
