r"""A cross-batch memory of embeddings that supplies per-class semantic scales.

The memory is a ring buffer of the latest ``memory_size`` (M) detached,
L2-normalised embeddings with their labels, like PML's ``CrossBatchMemory``.
Its stage follows the number of samples enqueued (docs/DEFINITIONS.md):

1. fewer than M enqueued: the memory fills, losses stay unweighted;
2. fewer than ``warmup_epochs * M``: oldest entries are replaced first in,
   first out, losses stay unweighted;
3. afterwards the scales of every class come from the memory after each
   enqueue, and losses are weighted by :math:`1/S`.

Cost: a refresh recomputes only the classes whose samples were enqueued or
dequeued since the last one (they are marked stale), from per-class float64
statistics kept up to date at each enqueue; nothing scans the whole memory,
so the cost does not grow with M. The statistics are built, in one pass over
the memory, at the first :meth:`scales` call (in DSB training: the first
weighted iteration) and kept up to date from then on; before that, in the
unweighted stages 1 and 2, an enqueue only writes the ring buffer. A class that has never held more than
``gram_size`` samples keeps the Gram matrix of its samples (each new sample
adds one row, m*d work) and its scale is a Cholesky factorisation in the
m x m space; a larger class switches for good to running first and second
moments (d and d x d, float64: each sample adds or removes an outer product)
and a d x d factorisation. No refresh ever re-reads a class's samples.

Index-addressed memories go further, on CPU and for class matrices of at
least ``low_rank_min_size`` (128) rows. Once a class's count stops changing
(each sample overwrites its own slot), its matrix changes by a low-rank term
per batch: rank 2 per replaced sample in the Gram form, 2r + 1 for r samples
in the moment form. After one exact refresh at an unchanged count the class
keeps the inverse and log det of its matrix, and each enqueue updates both
with the Woodbury identity and the matrix determinant lemma, O(r n^2) for an
n x n matrix instead of an O(n^3) factorisation; an exact refresh replaces
them every ``exact_refresh_every`` updates and whenever the count changes.
(In a first-in-first-out memory the count of a touched class mostly changes,
which rescales the whole matrix, so no low-rank update exists there.)

Sampling caveat: first in, first out holds the last M samples enqueued. That
is "the latest embedding of every training sample" only at the end of an epoch
of a sampler that visits each sample once per epoch, with M the training-set
size; in between, samples drawn late in the previous epoch and early in this
one are held twice and others not at all. A class-balanced sampler fills the
memory with its own class mix instead. Pass dataset indices to :meth:`enqueue` to get an
index-addressed memory (one slot per sample), the faithful form for any sampler.

All state, counters included, lives in registered buffers: ``state_dict()``,
``load_state_dict()`` and ``.to(device)`` carry everything. Casts of the
module's dtype (``.double()``, ``.half()``, ``.to(dtype)``, also through a
loss that holds the memory) leave its buffers' dtypes as they are: embeddings
are stored in float32 and statistics kept in float64 whatever the model trains in.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import MutableMapping
from typing import Optional

import torch

from ..distributed.gather import check_batch_collectively, gather_batch, should_gather
from ..functional.semantic_scale import check_flag, check_int, class_semantic_scales, unit_rows, unnormalized_norm_limit
from ..functional.weights import _dsb_weights, check_eps, check_normalize, dsb_weights
from ._class_statistics import ClassStatistics, _rank_within_groups
from ._low_rank import LowRankCaches

logger = logging.getLogger(__name__)


__all__ = ["SemanticScaleMemory"]

#: Scales (bits) that the running statistics put below this are recomputed from
#: the class's stored rows (see SemanticScaleMemory._exact_if_near_zero): far
#: above their rounding, far below the scale of any class with real spread.
_EXACT_BELOW = 1e-4


def _is_integer_tensor(x: torch.Tensor) -> bool:
    return not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)


def _raiser(error: Optional[BaseException]):
    """A batch check that raises ``error`` (found before the collective call), or passes."""

    def check(*_):
        if error is not None:
            raise error

    return check


class _UnrecordedBuffers(MutableMapping):
    """The memory's ``_buffers``: torch's mapping of buffer names to tensors,
    held in a mapping that is not a ``dict``.

    PML's ``HookContainer`` hands each loss to record-keeper with
    ``recursive_types=[torch.nn.Module, dict]``: it walks every ``dict``
    attribute of every submodule and records each tensor in it, as a Python
    list when it has more than one element (an empty one raises). For this
    memory that is its whole state, M x d embeddings and per-class d x d
    matrices, at every logged iteration: seconds, gigabytes, and a crash on
    the empty pools. torch itself only needs a mutable mapping here; the
    memory's own figures reach the records through the DSB losses'
    recordable attributes.
    """

    def __init__(self, items=()):
        self._items = dict(items)

    def __getitem__(self, name):
        return self._items[name]

    def __contains__(self, name):  # Module.__getattr__ asks first: no try/except round (the mixin's)
        return name in self._items

    def __setitem__(self, name, value):
        self._items[name] = value

    def __delitem__(self, name):
        del self._items[name]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def __repr__(self):
        return f"{type(self).__name__}({self._items!r})"

    def copy(self) -> "_UnrecordedBuffers":  # torch's DataParallel replicas copy it
        return _UnrecordedBuffers(self._items)

    def discard(self, name) -> None:  # Module.__setattr__ so drops a name from non-dict containers
        self._items.pop(name, None)


def _autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, also on torch < 2.4, whose
    ``is_autocast_enabled()`` takes no argument and asks about CUDA only."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _plain_mode(func):
    """Run ``func`` with CPU and CUDA autocast disabled and outside inference
    mode: the memory's statistics are computed in float32/float64 whatever the
    caller's autocast says, and the buffers it creates (grown pools, the first
    build) must be ordinary tensors, or every later in-place update outside
    ``torch.inference_mode`` would fail half-way through an enqueue."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            for device_type in ("cpu", "cuda"):
                if _autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return func(*args, **kwargs)

    return wrapper


class SemanticScaleMemory(LowRankCaches, ClassStatistics, torch.nn.Module):
    r"""Ring-buffer memory of embeddings with per-class semantic scales.

    Args:
        num_classes: C, number of classes (labels in ``[0, C)``), at least 2.
        embedding_size: d, the embedding dimension.
        memory_size: M, the number of embeddings kept; the paper uses the
            training-set size.
        warmup_epochs: n; the loss is weighted once ``n * M`` samples have
            been enqueued, and never before the memory is full
            (n = 0 and n = 1 both weight from the M-th sample on).
        normalize: ``"mean"`` (weights average 1 over classes with a scale)
            or ``None`` (raw :math:`1/S`).
        eps: scales at or below this count as "no scale yet".
        l2_normalize: store L2-normalised embeddings (default, as the
            definition of semantic scale says); otherwise they are stored as
            given, in float32, and every refresh is exact (no low-rank updates,
            whose rounding grows with the spread of norms). Rows of norm beyond
            ``unnormalized_norm_limit(embedding_size, singular_values=False)``
            (2966 at d = 512) are not stored (``ValueError``; a batch only
            read, by a validation loss, may exceed it): float64 rounding in the running
            statistics would then swallow a class's unit eigenvalues in
            ``I + (d/m)·Zc·Zcᵀ`` (drifting scales, then a failed factorisation).
        scale_dtype: precision of the scale computation (float64 default).
            float32 is faster in a first-in-first-out memory (1.2-1.3x per DSB
            step at the d = 512 shapes of benchmarks/bench_dsb_step.py), about
            as fast in an index-addressed one (0.89-1.01x the float64 step:
            its Gram-form classes are refactorised, not updated in low rank,
            whose float64 algebra would carry float32 products' rounding as
            spread), and agrees within ~1e-6 relative for
            well-spread classes, but loses accuracy as a class's spread shrinks:
            6 unit rows at d = 16, each at distance 0.1, 0.03, 0.01, 0.0035 from
            a common unit vector, gave 1.6e-6, 1.4e-5, 2.5e-4, 3.1e-3 relative
            (medians of 20 draws, benchmarks/bench_float32_tight_classes.py);
            scales below 1e-4 bits (here from distance 0.003 down) are
            recomputed from the class's stored rows in float64 and are exact
            again. So does a spread of norms with
            ``l2_normalize=False`` (8 rows at d = 6, half of norm ~2.5, half
            ~250: 2.5e-5). A class of identical samples still gets 0. Check it
            on your data with :func:`pml_dsb.class_semantic_scales` in float64
            before using it.
        gram_size: classes up to this many samples are kept in Gram form,
            larger ones as d x d moments (default ``max(2, embedding_size // 2)``,
            where both forms cost about the same; never more than
            ``memory_size``, which no class exceeds). Memory: ``num_classes *
            gram_size**2`` plus ``d**2`` per large class, float64, and as much
            again for the inverses once an index-addressed memory keeps them.
        exact_refresh_every: in an index-addressed memory, a class's scale is
            updated in low rank (exactly up to rounding, see above) at most this
            many times before an exact refresh (default 64).
        distributed: gather every rank's batch before enqueueing, so that all
            ranks hold the same memory, stage and scales (M counts global
            samples). ``None`` (default): when ``torch.distributed`` is
            initialised with more than one rank; ``False``: never (use it when
            the batch is already global, as under PML's
            ``DistributedLossWrapper``); ``True``: always. When gathering,
            :meth:`validate_batch` and :meth:`enqueue` are collective: every
            rank must call them (through the loss) each iteration, see
            :mod:`pml_dsb.distributed.gather`.

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

    #: Set by DistributedDSBLossWrapper, which hands every rank the same global
    #: batches (the memory itself then does not gather): see :meth:`scales`.
    _replicated_by_wrapper = False

    def _replicated(self) -> bool:
        """Whether several ranks hold this same memory now (it gathers, or a
        DistributedDSBLossWrapper gathers for it)."""
        if not should_gather(None):  # one process (distributed=True with one rank included)
            return False
        return should_gather(self.distributed) or self._replicated_by_wrapper

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
        gram_size: Optional[int] = None,
        distributed: Optional[bool] = None,
        exact_refresh_every: int = 64,
    ):
        super().__init__()
        object.__setattr__(self, "_buffers", _UnrecordedBuffers())
        num_classes = check_int("num_classes", num_classes, 2)
        embedding_size = check_int("embedding_size", embedding_size, 1)
        memory_size = check_int("memory_size", memory_size, 1)
        warmup_epochs = check_int("warmup_epochs", warmup_epochs, 0)
        exact_refresh_every = check_int("exact_refresh_every", exact_refresh_every, 1)
        check_normalize(normalize)
        check_eps(eps)
        l2_normalize = check_flag("l2_normalize", l2_normalize)
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
        if gram_size is None:
            gram_size = max(2, embedding_size // 2)
        gram_size = check_int("gram_size", gram_size, 2)
        self.gram_size = min(gram_size, memory_size)
        if not (distributed is None or isinstance(distributed, bool)):
            raise ValueError(f"distributed must be None (auto), True or False, got {distributed!r}")
        self.distributed = distributed
        self.exact_refresh_every = exact_refresh_every
        self._addressing_unknown = False  # True after loading a state saved without its addressing

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
        # Gram form: gram[c, i, j] = z_i . z_j for the samples at positions i, j
        # of class c's slot list (valid where class_slots >= 0)
        self.register_buffer("gram", torch.zeros(num_classes, self.gram_size, self.gram_size, dtype=torch.float64))
        # moment form, for classes that outgrew gram_size: row moment_index[c] of
        # moment_sum (sum of z) and moment_outer (sum of z z^T); -1 = Gram form
        self.register_buffer("moment_index", torch.full((num_classes,), -1, dtype=torch.long))
        self.register_buffer("moment_sum", torch.zeros(0, embedding_size, dtype=torch.float64))
        self.register_buffer("moment_outer", torch.zeros(0, embedding_size, embedding_size, dtype=torch.float64))
        # low-rank path (index-addressed memories): inverse and log det of each
        # class's matrix (beta*I + centred Gram or scatter), valid while
        # cache_valid; inverses are allocated on first use, a Gram-form class's
        # at row gram_inverse_index[c] (-1: none yet), a moment-form class's at
        # its moment_index
        self.register_buffer("gram_inverse", torch.zeros(0, self.gram_size, self.gram_size, dtype=torch.float64))
        self.register_buffer("gram_inverse_index", torch.full((num_classes,), -1, dtype=torch.long))
        self.register_buffer("moment_inverse", torch.zeros(0, embedding_size, embedding_size, dtype=torch.float64))
        self.register_buffer("cache_logdet", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("cache_valid", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("cache_updates", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("exact_count", torch.full((num_classes,), -1, dtype=torch.long))
        self.register_buffer("index_addressed", torch.zeros((), dtype=torch.bool))
        # False until the first scales() call: enqueues until then write only the
        # ring buffer and the class counts (see _build_statistics)
        self.register_buffer("statistics_built", torch.zeros((), dtype=torch.bool))
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
        if n >= max(self.warmup_epochs, 1) * self.memory_size:
            return 3
        return 1 if n < self.memory_size else 2

    @_plain_mode
    def reset(self) -> None:
        """Empty the memory and its counters."""
        self.embedding_memory.zero_()
        for buf in (self.label_memory, self.slot_position, self.class_slots, self.moment_index, self.exact_count,
                    self.gram_inverse_index):
            buf.fill_(-1)
        self.gram.zero_()
        for name in ("moment_sum", "moment_outer", "gram_inverse", "moment_inverse"):
            pool = getattr(self, name)  # new storage: a [:0] view would keep the old one alive
            setattr(self, name, pool.new_empty((0, *pool.shape[1:])))
        for buf in (self.class_counts, self.cached_scales, self.queue_idx, self.enqueued_count,
                    self.cache_logdet, self.cache_updates):
            buf.zero_()
        for buf in (self.stale, self.cache_valid, self.index_addressed, self.statistics_built):
            buf.zero_()
        self._addressing_unknown = False

    def _apply(self, fn, recurse=True):
        """Device moves apply, dtype casts do not (see the module docstring):
        a buffer that ``fn`` would re-type is moved as it is instead."""

        def move_only(tensor):
            out = fn(tensor)
            return out if out.dtype == tensor.dtype else tensor.to(device=out.device)

        return super()._apply(move_only, recurse)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"memory_size={self.memory_size}, warmup_epochs={self.warmup_epochs}, "
            f"normalize={self.normalize!r}"
        )

    # state added after the first release: a checkpoint without it loads with
    # no low-rank caches (the next refresh is exact and rebuilds them)
    _CACHE_STATE = ("gram_inverse", "gram_inverse_index", "moment_inverse", "cache_logdet", "cache_valid",
                    "cache_updates", "exact_count", "index_addressed")

    # buffers that grow with the largest class and the number of large classes:
    # a state dict's sizes are taken; the dimensions outside these slices must match
    _GROWING = {"class_slots": slice(0, 1), "moment_sum": slice(1, None), "moment_outer": slice(1, None),
                "gram_inverse": slice(1, None), "moment_inverse": slice(1, None)}

    def _late_state_defaults(self) -> dict:
        """Buffers added after the first release, as a memory saved without
        them gets them: no low-rank caches, and statistics built (memories kept
        them at every enqueue then)."""
        dev, classes = self.embedding_memory.device, self.num_classes
        f64 = {"dtype": torch.float64, "device": dev}
        return {
            "gram_inverse": torch.zeros(0, *self.gram.shape[1:], **f64),
            "gram_inverse_index": torch.full((classes,), -1, dtype=torch.long, device=dev),
            "moment_inverse": torch.zeros(0, *self.moment_outer.shape[1:], **f64),
            "cache_logdet": torch.zeros(classes, **f64),
            "cache_valid": torch.zeros(classes, dtype=torch.bool, device=dev),
            "cache_updates": torch.zeros(classes, dtype=torch.long, device=dev),
            "exact_count": torch.full((classes,), -1, dtype=torch.long, device=dev),
            "index_addressed": torch.zeros((), dtype=torch.bool, device=dev),
            "statistics_built": torch.ones((), dtype=torch.bool, device=dev),
        }

    def __setstate__(self, state):
        """Whole-module pickles (``torch.save(memory)``) from older releases load too."""
        super().__setstate__(state)
        if not isinstance(self._buffers, _UnrecordedBuffers):  # pickled by a release that kept a dict
            object.__setattr__(self, "_buffers", _UnrecordedBuffers(self._buffers))
        self.__dict__.setdefault("exact_refresh_every", 64)
        self.__dict__.setdefault("_addressing_unknown", "index_addressed" not in self._buffers)
        with torch.inference_mode(False):
            for name, value in self._late_state_defaults().items():
                if name not in self._buffers:
                    self.register_buffer(name, value)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._addressing_unknown:  # still unknown: saved as the older release saved it, without it
            destination.pop(prefix + "index_addressed", None)

    @_plain_mode
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if not any(prefix + name in state_dict for name in self._buffers):
            # not this memory's checkpoint (e.g. a parent loss's, loaded with
            # strict=False): nothing to fill in, the missing keys are reported
            return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        defaults = self._late_state_defaults()
        addressing_unknown = prefix + "index_addressed" not in state_dict
        if not any(prefix + name in state_dict for name in self._CACHE_STATE):
            for name in self._CACHE_STATE:
                state_dict[prefix + name] = defaults[name]
        if prefix + "statistics_built" not in state_dict:
            state_dict[prefix + "statistics_built"] = defaults["statistics_built"]
        if prefix + "index_addressed" not in state_dict:
            state_dict[prefix + "index_addressed"] = defaults["index_addressed"]
        # check everything before copying anything: torch copies the buffers
        # that fit and raises at the end, which left a half-loaded memory
        missing_keys, error_msgs = args[2], args[4]  # (local_metadata, strict, missing, unexpected, errors)
        missing = [prefix + name for name in self._buffers if prefix + name not in state_dict]
        mismatched = []
        for name, mine in self._buffers.items():
            saved = state_dict.get(prefix + name)
            if not isinstance(saved, torch.Tensor):
                continue
            fixed = self._GROWING.get(name, slice(None))
            if saved.shape[fixed] != mine.shape[fixed] or saved.dim() != mine.dim():
                mismatched.append(
                    f"size mismatch for {prefix + name}: copying a param with shape {tuple(saved.shape)} from "
                    f"checkpoint, the shape in current model is {tuple(mine.shape)}."
                )
        if missing:
            # a memory is whole or nothing (counts of one state with samples of
            # another are no memory): reported as missing, and with strict=False
            # (which torch does not pass down) the memory simply stays as it is
            missing_keys.extend(missing)
            return
        if mismatched:
            where = f" at {prefix.rstrip('.')!r}" if prefix else ""
            error_msgs.extend(mismatched)
            error_msgs.append(f"the {type(self).__name__}{where} was left unchanged (nothing loaded into it)")
            return
        # saved before the memory recorded its addressing: the next batch decides it
        self._addressing_unknown = addressing_unknown
        for name in self._GROWING:
            key, mine = prefix + name, getattr(self, name)
            if key in state_dict and state_dict[key].shape != mine.shape:
                setattr(self, name, torch.empty_like(state_dict[key], device=mine.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # caches that an older release (or a float64 memory) kept where this one
        # keeps none (see _compute_scales): refreshed exactly
        if not self.l2_normalize:
            self.cache_valid.zero_()
        elif self.scale_dtype != torch.float64:
            self.cache_valid[self.moment_index < 0] = False

    # ------------------------------------------------------------- validation
    def validate_batch(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices: Optional[torch.Tensor] = None,
        enqueue: bool = True,
    ) -> None:
        """Raise ``TypeError``/``ValueError`` for a batch :meth:`enqueue` would reject
        (``enqueue=False``: for a batch that will only be read, e.g. by a loss
        that does not enqueue; its size and the memory's addressing are then
        not checked).

        When the memory gathers across ranks (see ``distributed``) the check is
        collective: every rank must call it, and a batch rejected on any rank
        raises the same :class:`~pml_dsb.distributed.BatchRejectedError` (a
        ``ValueError``) on every rank, as does a global batch larger than the memory.
        """
        self._validate_with(None, embeddings, labels, indices, enqueue)

    def _validate_with(
        self, precheck, embeddings, labels, indices, enqueue: bool, unique_indices: bool = False
    ) -> None:
        """:meth:`validate_batch`, running ``precheck()`` (a caller's own checks of
        this rank's call) first, inside the collective verdict when gathering
        (``unique_indices``: the caller found no index repeated in ``indices``)."""

        def check(emb, lab, idx):
            if precheck is not None:
                precheck()
            self._validate_local_batch(emb, lab, idx, enqueue=enqueue, unique_indices=unique_indices and idx is indices)

        if not should_gather(self.distributed):
            check(embeddings, labels, indices)
            return
        sizes, with_indices = check_batch_collectively(check, embeddings, labels, indices, enqueues=enqueue)
        # distinct dataset indices in [0, M) always fit; a sample repeated across
        # ranks (DistributedSampler's padding) is enqueued once
        if enqueue and not with_indices and sum(sizes) > self.memory_size:
            raise ValueError(
                f"the global batch of {sum(sizes)} embeddings ({sizes} per rank) is larger than "
                f"memory_size={self.memory_size}"
            )

    def _validate_local_batch(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices: Optional[torch.Tensor] = None,
        enqueue: bool = True,
        unique_indices: bool = False,
    ) -> None:
        """The checks of :meth:`validate_batch` on this process's batch alone
        (``unique_indices``: the caller found no index repeated in ``indices``)."""
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
        if enqueue and batch > self.memory_size:
            raise ValueError(
                f"batch of {batch} embeddings is larger than memory_size={self.memory_size}"
            )
        if labels is None:
            raise ValueError("labels are required: the memory keeps the scale of each class")
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if not _is_integer_tensor(labels):
            raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.dim() != 1 or labels.shape[0] != batch:
            raise ValueError(
                f"labels must have shape ({batch},) to match embeddings, got {tuple(labels.shape)}"
            )
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0 or hi >= self.num_classes:
            raise ValueError(
                f"labels must lie in [0, num_classes={self.num_classes}), got values in [{lo}, {hi}]"
            )
        # the largest magnitude is finite iff every value is (a NaN propagates):
        # 5-10x faster on CPU than isfinite(...).all() (162 against 31 us at 64 x 512)
        largest = float(embeddings.detach().abs().amax())  # one host read (torch.isfinite is 4 operations)
        if not math.isfinite(largest):
            bad = int((~torch.isfinite(embeddings)).any(1).sum())
            raise ValueError(
                f"embeddings contain NaN or Inf in {bad} of {batch} rows; the memory was not changed"
            )
        if not self.l2_normalize and not enqueue and largest > torch.finfo(torch.float32).max:
            raise ValueError(
                f"embeddings reach magnitude {largest:.3g}, beyond float32's range (l2_normalize=False)"
            )
        if not self.l2_normalize and enqueue:
            # the trace of (d/m)·Zc·Zcᵀ is at most d times the largest squared norm
            norm = float(embeddings.detach().double().norm(dim=1).max())
            limit = unnormalized_norm_limit(self.embedding_size, singular_values=False)
            if norm > limit:
                raise ValueError(
                    f"embeddings reach norm {norm:.4g}; with l2_normalize=False the memory's scales stay "
                    f"accurate for norms up to {limit:.4g} at embedding_size={self.embedding_size} (float64 "
                    f"rounding of I + (d/m)·Zc·Zcᵀ beyond): scale them down or keep l2_normalize=True; "
                    f"the memory was not changed"
                )
        if indices is not None:
            if not isinstance(indices, torch.Tensor) or not _is_integer_tensor(indices):
                got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
                raise TypeError(f"indices must be an integer torch.Tensor of dataset indices, got {got}")
            if indices.dim() != 1 or indices.shape[0] != batch:
                raise ValueError(
                    f"indices must have shape ({batch},) to match embeddings, got {tuple(indices.shape)}"
                )
            lo, hi = (int(v) for v in torch.aminmax(indices))
            if lo < 0 or hi >= self.memory_size:
                raise ValueError(
                    f"indices must lie in [0, memory_size={self.memory_size}), got values in [{lo}, {hi}]"
                )
            # the counts only for the message: one unique (no host sync) when nothing repeats
            if not unique_indices and torch.unique(indices).numel() < indices.numel():
                values, counts = torch.unique(indices, return_counts=True)
                raise ValueError(
                    f"indices contain duplicates {values[counts > 1].tolist()}; each sample needs its own slot"
                )
        # the count only when the addressing differs: one host sync per batch on a GPU, not two
        if enqueue and not self._addressing_unknown and bool(self.index_addressed) != (indices is not None) \
                and int(self.enqueued_count) > 0:
            # a slot would then hold a sample of one addressing and be overwritten by the other's
            raise ValueError(
                "the memory was filled with dataset indices; this batch has none: pass the indices with every "
                "batch, or reset() the memory" if bool(self.index_addressed) else
                "the memory was filled first in, first out (without dataset indices); this batch has indices: "
                "pass them from the first batch on, or reset() the memory"
            )

    # ---------------------------------------------------------------- enqueue
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

        Bad input raises before anything changes. An error that torch raises
        half-way through the update (out of memory, an interrupt) puts the
        samples, counts and counters back as they were; the class statistics are
        then rebuilt from them at the next :meth:`scales`. When the memory gathers
        (see ``distributed``) this is collective: every rank calls it, the
        global batch (all ranks' batches in rank order; a dataset index
        repeated across ranks kept once, its last copy) is enqueued on every rank, and a batch
        rejected on any rank raises on every rank.
        """
        self._enqueue(embeddings, labels, indices, validated=False)

    @torch.no_grad()
    @_plain_mode
    def _enqueue(
        self, embeddings: torch.Tensor, labels: torch.Tensor, indices: Optional[torch.Tensor], validated: bool
    ) -> None:
        """:meth:`enqueue`; ``validated``: the caller has just passed this very
        batch through :meth:`validate_batch` (as the DSB losses do), so a
        single process skips the second check."""
        device = self.embedding_memory.device
        if should_gather(self.distributed):
            # collective: the ranks agree on the verdict, then each gets the global
            # batch; each rank sends the rows as it would store them (a float32 copy
            # of the input would round wider inputs before their normalisation)
            try:
                self._validate_local_batch(embeddings, labels, indices)
                rows, error = self._stored_rows(embeddings), None
            except Exception as err:  # reaches the other ranks through the check
                rows, error = embeddings, err
            emb, labels, indices, _, _ = gather_batch(rows, labels, indices, check=_raiser(error), enqueues=True)
            self._validate_local_batch(emb, labels, indices)  # same global batch, same verdict everywhere
            emb = emb.to(device=device)
        else:
            if not validated:
                self.validate_batch(embeddings, labels, indices)
            emb = self._stored_rows(embeddings)
        labels = labels.detach().to(device=device, dtype=torch.long)
        batch = emb.shape[0]
        if indices is None:
            slots = (self.queue_idx + torch.arange(batch, device=device)) % self.memory_size
        else:
            slots = indices.detach().to(device=device, dtype=torch.long)

        undo = self._undo_record(slots)
        try:
            if not bool(self.statistics_built):
                self._store(slots, emb, labels)
            else:
                self._store_and_update(slots, emb, labels)
            if indices is None:
                self.queue_idx.copy_((self.queue_idx + batch) % self.memory_size)
            self.index_addressed.fill_(indices is not None)
            vars(self)["_addressing_unknown"] = False  # a plain attribute: no nn.Module.__setattr__ checks
            self.enqueued_count += batch
        except BaseException:  # torch's own errors (out of memory) and interrupts, after the checks
            self._roll_back(slots, undo)
            raise
        if self.stage == 3 and self._replicated():
            self._refresh()  # every rank here, at the same point of the same history (see scales)

    def _reject_collectively(self, error: BaseException) -> None:
        """For a caller that failed where an enqueue was due (a loss whose parent
        rejected the batch): when gathering, the other ranks are in their
        enqueue's check; joining it with ``error`` makes every rank raise the
        same :class:`~pml_dsb.distributed.BatchRejectedError`. Otherwise nothing."""
        if should_gather(self.distributed):
            check_batch_collectively(_raiser(error), None, None)

    def _undo_record(self, slots: torch.Tensor) -> tuple:
        """What :meth:`_roll_back` needs to put the memory back as it is now:
        the rows and labels that ``slots`` hold and the counters (copies)."""
        counters = tuple(c.clone() for c in (self.queue_idx, self.enqueued_count, self.index_addressed))
        rows, labels = self.embedding_memory.index_select(0, slots), self.label_memory.index_select(0, slots)
        return rows, labels, counters, self._addressing_unknown

    def _roll_back(self, slots: torch.Tensor, undo: tuple) -> None:
        """Undo an enqueue that failed after its checks, half-way through its
        updates (an error raised by torch itself, such as running out of memory
        while a pool grows, or an interrupt): the memory holds its earlier
        samples, counts and counters again, and its statistics, of which any part
        may have been updated, are rebuilt from them at the next :meth:`scales`
        (equal to the statistics it had up to rounding)."""
        rows, labels, counters, addressing_unknown = undo
        self.embedding_memory[slots] = rows
        self.label_memory[slots] = labels
        filled = self.label_memory[self.label_memory >= 0]
        self.class_counts.copy_(torch.bincount(filled, minlength=self.num_classes))
        for counter, value in zip((self.queue_idx, self.enqueued_count, self.index_addressed), counters):
            counter.copy_(value)
        vars(self)["_addressing_unknown"] = addressing_unknown
        self.statistics_built.fill_(False)
        logger.warning("an enqueue failed half-way; the memory was put back as it was before it, and its "
                       "class statistics will be rebuilt from its contents at the next scales()")

    def _stored_rows(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The batch as the memory stores it: detached, on its device, L2-normalised
        (unless ``l2_normalize=False``), float32."""
        emb = embeddings.detach().to(device=self.embedding_memory.device)
        if self.l2_normalize:
            emb = unit_rows(emb.double())  # in float64: any float32/64 row's norm
        return emb.float()

    def _store(self, slots: torch.Tensor, emb: torch.Tensor, labels: torch.Tensor) -> None:
        """Write the batch into its slots and count it; no statistics yet."""
        old = self.label_memory[slots]
        old = old[old >= 0]
        self.class_counts.index_add_(0, old, -torch.ones_like(old))
        self.embedding_memory[slots] = emb
        self.label_memory[slots] = labels
        self.class_counts.index_add_(0, labels, torch.ones_like(labels))

    def _store_and_update(self, slots: torch.Tensor, emb: torch.Tensor, labels: torch.Tensor) -> None:
        """Write the batch and update the class statistics and low-rank caches."""
        if self._overwrites_in_place(slots, labels):
            self._overwrite_and_update(slots, emb, labels)
            return
        counts_before, large_before = self.class_counts.clone(), self.moment_index >= 0
        removed = self._remove(slots)
        grouped = torch.unique(labels, return_inverse=True, return_counts=True)
        if not bool(large_before.all()):  # else every class has its moments already: none to promote
            self._promote_large_classes(labels, grouped)
        self.embedding_memory[slots] = emb
        self.label_memory[slots] = labels
        positions = self._allocate_positions(labels, grouped)
        self.class_slots[labels, positions] = slots
        self.slot_position[slots] = positions
        self.class_counts.index_add_(0, labels, torch.ones_like(labels))
        self.stale[labels] = True
        self._update_classes(removed, emb, labels, positions, counts_before, large_before)

    def _update_classes(
        self, removed, emb, labels, positions, counts_before, large_before, refill: bool = False
    ) -> None:
        """The statistics and low-rank caches after the bookkeeping of an enqueue
        (``counts_before``, ``large_before``: class counts and forms before it;
        ``refill``: see :meth:`_update_statistics`)."""
        plan = self._plan_low_rank(removed[0], labels, positions, counts_before, large_before)
        self._update_statistics(removed, emb, labels, positions, refill)
        if plan is not None:
            self._apply_low_rank(plan, removed, emb, labels, positions)

    def _overwrites_in_place(self, slots: torch.Tensor, labels: torch.Tensor) -> bool:
        """Whether every slot holds a sample of its new sample's class, and no
        Gram-form class among them has a free position inside its slot list
        (the general path refills those, and a Gram-form class takes low-rank
        updates only without them)."""
        if not bool((self.label_memory[slots] == labels).all()):
            return False
        gram = labels[self.moment_index[labels] < 0]
        return not gram.numel() or bool((self._class_width(gram) == self.class_counts[gram]).all())

    def _overwrite_and_update(self, slots: torch.Tensor, emb: torch.Tensor, labels: torch.Tensor) -> None:
        """:meth:`_store_and_update` for a batch that :meth:`_overwrites_in_place`
        (an index-addressed memory, once full): counts, forms,
        slot lists and positions stay as they are, and each new sample takes its
        predecessor's position, so none of the bookkeeping of a general enqueue
        is needed (about 10% of a CUB-sized index-addressed step on CPU)."""
        positions = self.slot_position[slots]
        large = self.moment_index >= 0
        removed = (labels, positions, self.embedding_memory[slots], large[labels])  # indexing copies
        self.embedding_memory[slots] = emb
        self.stale[labels] = True
        self._update_classes(removed, emb, labels, positions, self.class_counts, large, refill=True)

    def _remove(self, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Free the filled ``slots``; return their labels, positions, embeddings and form."""
        old = self.label_memory[slots]
        filled = old >= 0
        if not bool(filled.all()):
            slots, old = slots[filled], old[filled]
        positions = self.slot_position[slots]
        # the form is read now: a class promoted later in this enqueue builds its
        # moments from what remains, so its removed samples must not count twice
        # (advanced indexing copies the rows: no clone needed)
        removed = (old, positions, self.embedding_memory[slots], self.moment_index[old] >= 0)
        if slots.numel():
            self.class_slots[old, positions] = -1
            self.class_counts.index_add_(0, old, torch.full_like(old, -1))
            self.stale[old] = True
            self.label_memory[slots] = -1
            self.slot_position[slots] = -1
        return removed

    def _allocate_positions(self, labels: torch.Tensor, grouped: Optional[tuple] = None) -> torch.Tensor:
        """A free position in its class's slot list for every new sample
        (``grouped``: ``torch.unique(labels, return_inverse=True, return_counts=True)`` if known)."""
        if grouped is None:
            grouped = torch.unique(labels, return_inverse=True, return_counts=True)
        classes, inverse, new_counts = grouped
        needed = int((self.class_counts[classes] + new_counts).max())
        if needed > self.class_slots.shape[1]:
            self._grow_capacity(needed)
        cumulative_free = (self.class_slots[classes] < 0).cumsum(1)
        rank = _rank_within_groups(inverse, new_counts)
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
    @_plain_mode
    def scales(self) -> torch.Tensor:
        """(C,) float64 semantic scales of the memory's contents, in bits.

        Recomputes only the classes touched since the last call; 0 for a class
        with fewer than two samples. The first call builds the per-class
        statistics that later calls update.

        A memory that every rank holds alike (it gathers, or a
        :class:`~pml_dsb.distributed.DistributedDSBLossWrapper` gathers for
        it) keeps its statistics up to date in :meth:`enqueue` instead, from
        stage 3 on, at the same point on every rank; a read with nothing to
        update returns them, any other read (before stage 3, or after a
        restore before the next enqueue) computes the scales from the
        contents and keeps nothing. So a read on some ranks only (logging on
        rank 0) leaves every rank's memory the same: statistics built or
        refreshed at different times differ in rounding.
        """
        if self._replicated() and (not bool(self.statistics_built) or bool(self.stale.any())):
            rows, labels = self.contents()
            return class_semantic_scales(rows, labels, self.num_classes, normalize=False)
        return self._refresh()

    def _refresh(self) -> torch.Tensor:
        """:meth:`scales`, building the statistics first if need be and
        updating the stale classes."""
        if not bool(self.statistics_built):
            self._build_statistics()
        stale = torch.nonzero(self.stale).flatten()
        if stale.numel():
            values = self._compute_scales(stale).to(torch.float64)
            self.cached_scales[stale] = self._exact_if_near_zero(stale, values)
            self.stale.zero_()  # = self.stale[stale] = False: stale holds every True position
        return self.cached_scales.clone()

    def _exact_if_near_zero(self, classes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``values`` with the scales below :data:`_EXACT_BELOW` recomputed from
        the classes' stored rows, centred explicitly. The running statistics
        centre by cancellation (sum of z z^T less s s^T / m), whose rounding
        enters S linearly: a class of identical samples kept S ~ 1e-12 to
        3e-7 (float32 products, rows of norm in the thousands, a moment-form
        class emptied and refilled), above eps, and took nearly all the
        weight. Centred rows carry their rounding squared: S ~ 0."""
        if not len(values) or float(values.amin()) >= _EXACT_BELOW:  # none near zero: no masks
            return values
        near_zero = (values < _EXACT_BELOW) & (self.class_counts[classes] >= 2)
        if not bool(near_zero.any()):
            return values
        few = classes[near_zero]
        slots = self.class_slots[few]
        filled = slots >= 0
        labels = torch.arange(len(few), device=few.device).unsqueeze(1).expand_as(slots)[filled]
        rows = self.embedding_memory[slots[filled]]
        values = values.clone()
        values[near_zero] = class_semantic_scales(rows, labels, len(few), normalize=False)
        return values

    def weights(self, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(C,) float64 DSB weights :math:`1/S_c` (see :func:`pml_dsb.functional.dsb_weights`).

        ``scales``: the result of :meth:`scales` if the caller already has it.
        """
        return dsb_weights(self.scales() if scales is None else scales, self.class_counts, self.normalize, self.eps)

    def _weights_of_own_scales(self, scales: torch.Tensor) -> torch.Tensor:
        """:meth:`weights` of ``scales`` that :meth:`scales` just returned: the
        checks of :func:`~pml_dsb.functional.dsb_weights` that its own (C,)
        float64 scales and whole counts pass by construction are skipped (a
        subclass that overrides :meth:`weights` gets its own)."""
        if type(self).weights is not SemanticScaleMemory.weights:
            return self.weights(scales)
        return _dsb_weights(scales, self.class_counts, self.normalize, self.eps)

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored (embeddings, labels), unfilled slots left out."""
        filled = self.label_memory >= 0
        return self.embedding_memory[filled], self.label_memory[filled]
