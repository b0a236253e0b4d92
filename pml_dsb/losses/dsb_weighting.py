r"""The one place where DSB re-weights per-sample losses.

:func:`weight_losses_by_class` multiplies PML's unreduced losses by
:math:`w_{y}` of each sample's label before PML's reducer reduces them (the
default ``MeanReducer`` then takes the plain mean). :class:`DSBWeightingMixin`
puts a :class:`~pml_dsb.memory.SemanticScaleMemory` in front of any PML loss
whose ``compute_loss`` returns element, pair or triplet losses, so that

.. code-block:: python

    class DSBArcFaceLoss(DSBWeightingMixin, ArcFaceLoss):
        pass

is a complete DSB loss. :func:`dsb_class_weights` gives the same weights for
``torch.nn.CrossEntropyLoss(weight=...)`` (the paper's DSB-CE).
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Optional

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction, MarginLoss, ProxyAnchorLoss

from ..distributed.gather import check_batch_collectively, last_occurrences, should_gather
from ..functional.semantic_scale import check_flag, describe
from ..memory.semantic_scale_memory import SemanticScaleMemory, _raiser

__all__ = ["DSBWeightingMixin", "weight_losses_by_class", "dsb_class_weights", "with_dsb_weighting"]

# which index tensor of a PML loss entry carries the sample whose label weights it
_ANCHOR_OF = {
    "element": lambda idx: idx,
    "pos_pair": lambda idx: idx[0],
    "neg_pair": lambda idx: idx[0],
    "triplet": lambda idx: idx[0],
}


def weight_losses_by_class(
    loss_dict: dict, labels: torch.Tensor, class_weights: torch.Tensor, names=None, element_indices: str = "samples"
) -> dict:
    """Multiply the unreduced losses of a PML loss dict by ``class_weights[label]``.

    Element losses are weighted by their sample's label, pair and triplet
    losses by their anchor's label (as PML's ``ClassWeightedReducer`` does).
    ``element_indices="classes"``: element losses are indexed by class
    instead (one loss per class or proxy, as ``ProxyAnchorLoss`` returns),
    and each is weighted by its own class. ``names`` restricts the entries
    (default: all). The dict is changed in place and returned.

    >>> import torch
    >>> d = {"loss": {"losses": torch.ones(3), "indices": torch.arange(3), "reduction_type": "element"}}
    >>> weight_losses_by_class(d, torch.tensor([0, 1, 1]), torch.tensor([2.0, 0.5]))["loss"]["losses"]
    tensor([2.0000, 0.5000, 0.5000])
    """
    if names is not None and not isinstance(names, str):
        names = list(names)  # a generator would be used up by the check below
    _check_class_weighting(loss_dict, labels, class_weights, names)
    return _weight_losses_by_class(loss_dict, labels, class_weights, names, element_indices)


def _check_class_weighting(loss_dict, labels, class_weights, names) -> None:
    """The public function's checks (the DSB losses pass the memory's own, checked, tensors)."""
    if not isinstance(class_weights, torch.Tensor) or class_weights.dim() != 1 or not class_weights.is_floating_point():
        raise TypeError(f"class_weights must be a 1-D floating tensor, got {describe(class_weights)}")
    if not bool(torch.isfinite(class_weights).all()):
        raise ValueError(f"class_weights must be finite, got {class_weights.tolist()}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be a 1-D integer tensor, got {describe(labels)}")
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < len(class_weights):
        raise ValueError(  # -1 would silently take the last class's weight
            f"labels must lie in [0, {len(class_weights)}) (class_weights has one weight per class), got values from "
            f"{int(labels.min())} to {int(labels.max())}"
        )
    if isinstance(names, str) or (names is not None and any(name not in loss_dict for name in names)):
        raise ValueError(f"names must be a sequence of keys of the loss dict {sorted(loss_dict)}, got {names!r}")


def _weight_losses_by_class(loss_dict, labels, class_weights, names, element_indices, largest=None) -> dict:
    """``largest``: the largest magnitude of ``class_weights``, if the caller has
    it; else read once (a host sync) where a loss needs it."""
    if element_indices not in ("samples", "classes"):
        raise ValueError(f"element_indices must be 'samples' or 'classes', got {element_indices!r}")
    for name in loss_dict if names is None else names:
        entry = loss_dict[name]
        kind, losses = entry["reduction_type"], entry["losses"]
        if not torch.is_tensor(losses) or losses.numel() == 0:
            continue  # PML's zero loss (e.g. MarginLoss's beta_reg_loss when nu = 0): nothing to weight
        if kind not in _ANCHOR_OF:
            raise ValueError(
                f"loss {name!r} has reduction_type {kind!r}; only per-sample losses "
                f"({sorted(_ANCHOR_OF)}) can be re-weighted by class"
            )
        if largest is None:
            largest = float(class_weights.abs().max())
        _check_cast_weights(largest, losses.dtype, f"the losses of {name!r}")
        weights = class_weights.to(device=losses.device, dtype=losses.dtype)
        if kind == "element" and element_indices == "classes":
            entry["losses"] = losses * _along_first_dim(weights[entry["indices"]], losses, name)
            continue
        anchors = _ANCHOR_OF[kind](entry["indices"])
        if kind == "element" and (anchors.shape[0] != losses.shape[0] or int(anchors.max()) >= labels.shape[0]):
            raise ValueError(
                f"loss {name!r} has {losses.shape[0]} element losses indexed by {anchors.shape[0]} values up "
                f"to {int(anchors.max())}, not by samples of the batch of {labels.shape[0]}; for losses "
                f"indexed by class pass element_indices='classes'"
            )
        entry["losses"] = losses * _along_first_dim(weights[labels[anchors]], losses, name)
    return loss_dict


def _check_cast_weights(largest: float, dtype: torch.dtype, what: str) -> None:
    """Raise if finite weights up to ``largest`` would overflow a cast to
    ``dtype`` (raw 1/S of a tight class beyond float16's 65504 became inf: NaN losses)."""
    if dtype.is_floating_point and largest > torch.finfo(dtype).max:
        raise ValueError(
            f"class weights up to {largest:.6g} overflow {dtype} ({what}); compute in "
            f"float32 or wider, or use normalize='mean'"
        )


def _along_first_dim(weights: torch.Tensor, losses: torch.Tensor, name: str) -> torch.Tensor:
    """``weights`` (one per element) shaped to scale ``losses`` along its first
    dimension: some PML losses return a (N, 1) column (MultiSimilarityLoss,
    CircleLoss, LiftedStructureLoss, ...), which a (N,) vector would broadcast
    into an (N, N) matrix."""
    if weights.shape[0] != losses.shape[0]:
        raise ValueError(f"loss {name!r} has {losses.shape[0]} losses but {weights.shape[0]} element indices")
    return weights.reshape(-1, *[1] * (losses.dim() - 1))


def dsb_class_weights(
    memory: SemanticScaleMemory,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-class weights for ``torch.nn.CrossEntropyLoss(weight=...)`` (DSB-CE).

    The memory's :meth:`~SemanticScaleMemory.weights` in stage 3, ones before.
    Enqueue the batch first. Note that ``CrossEntropyLoss`` with
    ``reduction="mean"`` divides by the sum of the batch's weights; for the
    plain mean of weighted losses (as the DSB losses reduce), use
    ``reduction="none"`` and ``.mean()``.
    """
    if not isinstance(memory, SemanticScaleMemory):
        hint = " (a DSB loss's is at loss.memory)" if isinstance(getattr(memory, "memory", None), SemanticScaleMemory) else ""
        raise TypeError(f"memory must be a SemanticScaleMemory, got {type(memory).__name__}{hint}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (weights are fractions), got {dtype!r}")
    if memory.stage == 3:
        weights = memory.weights()
    else:
        weights = torch.ones(memory.num_classes, dtype=torch.float64)
    _check_cast_weights(float(weights.abs().max()), dtype, f"dtype={dtype}")
    return weights.to(device=device or memory.class_counts.device, dtype=dtype)


def check_indices_tuple(indices_tuple, batch: int, references: int, what: str = "ref_emb") -> None:
    """A miner's indices_tuple, checked before PML uses it: anchors index the
    batch of ``batch`` rows, the other entries ``what`` of ``references`` rows
    (a negative index would silently count from the end, one past the end
    raised IndexError from inside PML)."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4) or not all(
        isinstance(t, torch.Tensor) and t.dim() == 1 and not t.is_floating_point() and t.dtype != torch.bool
        and not t.is_complex() for t in indices_tuple
    ):
        raise TypeError(
            "indices_tuple must be a tuple of 3 (anchors, positives, negatives) or 4 (anchors, positives, "
            "anchors, negatives) 1-D integer tensors"
        )
    if len({len(t) for t in indices_tuple[:2]}) > 1 or len({len(t) for t in indices_tuple[-2:]}) > 1:
        raise ValueError(f"indices_tuple's tensors differ in length: {[len(t) for t in indices_tuple]}")
    anchors = (0, 2) if len(indices_tuple) == 4 else (0,)
    for position, t in enumerate(indices_tuple):
        bound, where = (batch, "the batch") if position in anchors else (references, what)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= bound):
            raise ValueError(
                f"indices_tuple[{position}] holds indices from {int(t.min())} to {int(t.max())}; it indexes "
                f"{where}, whose {bound} rows take indices 0..{bound - 1}"
            )


def _stored_positions(embeddings, labels, indices) -> tuple[Optional[torch.Tensor], bool]:
    """The rows of a batch that an index-addressed memory stores when its
    dataset ``indices`` repeat (a sampler that draws with replacement, such as
    PML's ``MPerClassSampler`` for a class smaller than m): one slot takes one
    sample, the batch's last copy. None when nothing repeats, or when the
    batch is malformed (the memory's checks then say how). Also whether the
    indices were found free of repeats (the memory then need not look again)."""
    if not (
        isinstance(indices, torch.Tensor) and indices.dim() == 1 and indices.numel() > 1
        and not indices.is_floating_point() and not indices.is_complex() and indices.dtype != torch.bool
        and isinstance(embeddings, torch.Tensor) and embeddings.dim() >= 1 and len(embeddings) == len(indices)
        and isinstance(labels, torch.Tensor) and labels.shape == indices.shape
    ):
        return None, False
    if torch.unique(indices).numel() == indices.numel():
        return None, True
    return last_occurrences(indices), False


def _validate_storing(memory: SemanticScaleMemory, precheck, embeddings, labels, indices) -> Optional[torch.Tensor]:
    """``memory``'s checks of a batch it will store, with repeated dataset
    indices allowed (see :func:`_stored_positions`): every row is then checked
    as read, the stored ones as stored. Returns the stored positions (None: all)."""
    keep, unique = _stored_positions(embeddings, labels, indices)
    if keep is None:  # indices free of repeats: the memory need not look for them again
        memory._validate_with(precheck, embeddings, labels, indices, enqueue=True, unique_indices=unique)
        return None

    def check_every_row():
        if precheck is not None:
            precheck()
        memory._validate_local_batch(embeddings, labels, None, enqueue=False)

    rows = keep.to(embeddings.device)
    memory._validate_with(check_every_row, embeddings[rows], labels[keep.to(labels.device)], indices[keep],
                          enqueue=True)
    return keep


class _MemoryDefault:
    """Default of ``warmup_epochs``/``normalize``: the memory's own when one is
    given, else the memory's constructor default."""

    def __repr__(self) -> str:
        return "<memory's>"


_MEMORY_DEFAULT = _MemoryDefault()


class DSBWeightingMixin:
    r"""Turns a PML classification loss into its DSB form.

    Put it first among the bases: ``class DSBX(DSBWeightingMixin, X)``, where X
    is a PML loss taking ``(num_classes, embedding_size, ...)``. Each call
    enqueues the batch (detached) into ``self.memory``; in stage 3 every
    sample's loss is multiplied by :math:`w_{y}` before the reducer. Before
    stage 3 the loss is exactly the parent's. Regularisation losses of the
    parent are never weighted (see ``dsb_unweighted_losses``). A parent whose
    losses come already reduced (``HistogramLoss``, ``PNPLoss``, ...) has
    nothing to weight: the first call that gives a loss (not PML's plain zero
    loss for a batch without pairs or triplets) raises ``TypeError`` before its
    batch is stored (with a gathering memory the other ranks raise
    :class:`~pml_dsb.distributed.BatchRejectedError`).

    Args (in addition to the parent's):
        memory_size: M for a new memory (the training-set size in the paper).
        warmup_epochs: n, default 5.
        normalize: ``"mean"`` (default) or ``None``, see :func:`pml_dsb.functional.dsb_weights`.
        memory: a ready :class:`SemanticScaleMemory` to use (and share) instead;
            ``memory_size``, ``warmup_epochs`` and ``normalize``, if given too,
            must equal the memory's.
        update_memory: enqueue each batch (default). When several losses share
            one memory and see the same batch, let only one of them enqueue.
            Under ``torch.no_grad()`` (or inference mode) the memory is also
            left as it is: a validation loss reads the current weights without
            storing validation samples. ``eval()`` mode does not matter (PML's
            trainers put a loss listed in ``freeze_these`` in eval mode).
            When the memory gathers across ranks, a batch refused on one rank
            (by the memory's checks or the parent's) raises on every rank; a
            loss that does not enqueue makes one more small collective call
            per call to share its parent's verdict.

    ``forward`` also takes ``sample_indices``: dataset indices of the batch,
    making the memory index-addressed (one slot per sample). Under PML's
    trainers, which cannot pass them, :class:`~pml_dsb.losses.SampleIndicesGetter`
    announces them through :meth:`expect_sample_indices`. An index repeated
    in a batch (a sampler that draws with replacement) is stored once, its
    last copy; the loss covers every row.

    Parameters are never re-typed in ``forward`` (PML's ``cast_types`` rewrites
    ``.data``): the loss is computed in the widest of the embeddings', the
    ``ref_emb``'s and the parameters' dtypes. Lower-precision embeddings
    (autocast) and ``ref_emb`` are cast up to it; for float64 embeddings the parameters take part
    through a float64 cast (gradients flow back to them). With float32
    parameters this is the parent's arithmetic; the parent itself re-types
    its parameters to the embeddings' dtype, so after ``loss.double()`` with
    float32 embeddings the two differ (float64 here, float32 there).
    Parameters on another device than the embeddings raise an error asking
    for ``loss.to(device)``.

    Recorded attributes (PML record-keeper / ``HookContainer``): ``dsb_stage``,
    ``dsb_num_enqueued``, ``dsb_fill_level``, and in stage 3
    ``dsb_mean_scale``, ``dsb_min_scale``, ``dsb_max_scale`` (over the classes
    that have a scale), ``dsb_min_weight``, ``dsb_max_weight``. Before stage
    3 all five are NaN; in stage 3 while no class has a scale, the scales are
    NaN and the weights 1 (what every class gets then). Every column is there
    from the first logged iteration, which record-keeper's CSV files need.

    The batch is enqueued inside :meth:`compute_loss`, after the parent's
    losses and before PML's reducer and embedding regularizer run: an error
    raised by those (a misconfigured reducer) leaves the batch stored.

    Under ``torch.compile`` the forward runs as it is (not traced): the
    memory's work is host code that depends on the data.
    """

    #: Sub-losses (keys of the parent's loss dict) left unweighted: those
    #: that regularise the parent's own parameters rather than score samples.
    #: PML's ``regularization_loss_names()`` are never weighted either.
    dsb_unweighted_losses = ("beta_reg_loss",)  # MarginLoss's penalty on its learned betas

    #: Which of ``num_classes`` and ``embedding_size`` the parent's constructor
    #: gets. None (default): those it names, except ``MarginLoss``'s own
    #: optional ``num_classes``, which would turn PML's one learned beta into
    #: one per class (set ``("num_classes",)`` for that).
    dsb_parent_gets: Optional[tuple] = None

    #: What the parent's "element" losses are indexed by: "samples" (one loss
    #: per sample of the batch) or "classes" (one per class or proxy, as
    #: ``ProxyAnchorLoss`` returns; see :func:`weight_losses_by_class`).
    dsb_element_indices = "samples"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        chosen = any("dsb_element_indices" in k.__dict__ for k in cls.__mro__[: cls.__mro__.index(DSBWeightingMixin)])
        if issubclass(cls, ProxyAnchorLoss) and not chosen:
            cls.dsb_element_indices = "classes"  # one loss per proxy, indexed by class

    _DSB_RECORDS = (
        "dsb_stage",
        "dsb_num_enqueued",
        "dsb_fill_level",
        "dsb_mean_scale",
        "dsb_min_scale",
        "dsb_max_scale",
        "dsb_min_weight",
        "dsb_max_weight",
    )

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *args,
        memory_size: Optional[int] = None,
        warmup_epochs: int = _MEMORY_DEFAULT,
        normalize: Optional[str] = _MEMORY_DEFAULT,
        memory: Optional[SemanticScaleMemory] = None,
        update_memory: bool = True,
        **kwargs,
    ):
        if memory is None:
            if memory_size is None:
                raise ValueError(
                    "memory_size is required (the number of training samples in the paper) "
                    "unless a ready memory= is given"
                )
            options = {"warmup_epochs": warmup_epochs, "normalize": normalize}
            memory = SemanticScaleMemory(
                num_classes, embedding_size, memory_size,
                **{k: v for k, v in options.items() if v is not _MEMORY_DEFAULT},
            )
        elif not isinstance(memory, SemanticScaleMemory):
            raise TypeError(f"memory must be a SemanticScaleMemory, got {type(memory).__name__}")
        elif (memory.num_classes, memory.embedding_size) != (num_classes, embedding_size):
            raise ValueError(
                f"memory has num_classes={memory.num_classes}, embedding_size={memory.embedding_size}; "
                f"the loss was given num_classes={num_classes}, embedding_size={embedding_size}"
            )
        else:
            given = {"memory_size": (memory_size, None), "warmup_epochs": (warmup_epochs, _MEMORY_DEFAULT),
                     "normalize": (normalize, _MEMORY_DEFAULT)}
            for name, (value, unset) in given.items():
                if value is not unset and value != getattr(memory, name):
                    raise ValueError(f"{name}={value!r} conflicts with memory.{name}={getattr(memory, name)!r}")
        # the memory needs both; the parent gets those it names (pair and
        # triplet losses none); with extra positional arguments, those that
        # lead its positional parameters go first, in its order
        takes = _parent_takes(type(self)) if self.dsb_parent_gets is None else tuple(self.dsb_parent_gets)
        given = {"num_classes": num_classes, "embedding_size": embedding_size}
        lead = _leading_sizes(type(self)) if args else ()
        if not set(lead) <= set(takes):
            lead = ()
        # by keyword where possible: some parents read them from **kwargs (SubCenterArcFaceLoss)
        super().__init__(*[given[name] for name in lead], *args,
                         **{name: given[name] for name in takes if name not in lead}, **kwargs)
        self.num_classes = num_classes
        self.embedding_size = embedding_size  # PML records it but never sets it
        self.memory = memory
        self.update_memory = check_flag("update_memory", update_memory)
        self._sample_indices = None
        self._stored_rows = None  # while forward() runs: the rows stored when dataset indices repeat
        self._pending_sample_indices = None  # from expect_sample_indices(), for the next call
        self._validated = None  # the embeddings forward() checked, while it runs
        self._enqueue_due = False  # while forward() runs: the memory's enqueue is still to come
        self._enqueues = None  # while forward() runs: whether this call enqueues
        for name in self._DSB_RECORDS:
            setattr(self, name, math.nan)
        self.add_to_recordable_attributes(list_of_names=list(self._DSB_RECORDS), is_stat=False)

    # the memory's work is data-dependent host code (LAPACK per class, counts read
    # back): torch.compile runs the DSB loss as it is, rather than tracing into it
    @torch.compiler.disable
    def forward(
        self,
        embeddings,
        labels=None,
        indices_tuple=None,
        ref_emb=None,
        ref_labels=None,
        sample_indices: Optional[torch.Tensor] = None,
    ):
        """The parent's loss, each sample's (or anchor's) loss weighted by its
        class in stage 3. The batch is checked first (a bad one raises and
        changes nothing), then enqueued into the memory unless ``update_memory``
        is false or gradients are off. ``sample_indices``: the batch's (B,)
        dataset indices, for an index-addressed memory (one slot per sample;
        a repeated index stores its last copy)."""
        # indices announced by expect_sample_indices() serve this call only, even a failing one
        pending = getattr(self, "_pending_sample_indices", None)  # absent from older pickles
        # plain attributes (no parameter, buffer or module has these names): set in
        # the instance's dict, without nn.Module.__setattr__'s checks (~2 us each)
        vars(self)["_pending_sample_indices"] = None
        conflict = None
        if indices_tuple is not None and isinstance(embeddings, torch.Tensor) and embeddings.dim() == 2:
            try:  # through the collective check below, as any other bad input
                refs = ref_emb if isinstance(ref_emb, torch.Tensor) and ref_emb.dim() == 2 else embeddings
                check_indices_tuple(
                    indices_tuple, len(embeddings), len(refs), "ref_emb" if refs is ref_emb else "the batch"
                )
            except (TypeError, ValueError) as err:
                conflict = err
        if pending is not None:
            if sample_indices is not None and conflict is None:
                conflict = ValueError(
                    "sample_indices were passed to this call and also announced by expect_sample_indices() "
                    "(a SampleIndicesGetter); give them one way"
                )
            else:
                sample_indices = pending
        # every check before anything changes; collective when the memory gathers,
        # so that a batch bad on one rank raises on every rank
        # not train()/eval(): PML's trainers put a loss in freeze_these in eval mode
        enqueues = self.update_memory and torch.is_grad_enabled()
        stored = None  # the rows stored when dataset indices repeat (None: all)
        if enqueues and sample_indices is not None:
            stored = _validate_storing(self.memory, _raiser(conflict), embeddings, labels, sample_indices)
        else:
            self.memory._validate_with(_raiser(conflict), embeddings, labels, None, enqueue=enqueues)
        # PML takes ref_emb/ref_labels that *are* the batch's tensors for "no
        # reference set" (each sample then is not its own pair): a cast batch
        # passes its cast on as the reference too
        given_emb, given_labels = embeddings, labels
        labels = labels.to(torch.long)  # any integer dtype (PML's parents need int64)
        if ref_labels is given_labels:
            ref_labels = labels
        params = dict(self.named_parameters(recurse=False))
        # ref_emb is the other operand of the same distances: cast with the embeddings
        ref_cast = torch.is_tensor(ref_emb) and ref_emb.is_floating_point()
        dtypes = [p.dtype for p in params.values()] + ([ref_emb.dtype] if ref_cast else [])
        dtype = functools.reduce(torch.promote_types, dtypes, embeddings.dtype)
        embeddings = embeddings.to(dtype)
        if ref_emb is given_emb:
            ref_emb = embeddings
        elif ref_cast:
            ref_emb = ref_emb.to(dtype)
        narrow = {name: p.to(dtype) for name, p in params.items() if p.dtype != dtype}
        # the parent would re-type its parameters' .data to float64 for good; this
        # call alone computes with (differentiable) float64 casts of them instead
        saved = {name: self._parameters[name] for name in narrow}
        self._parameters.update(narrow)
        vars(self).update(_sample_indices=sample_indices, _stored_rows=stored, _validated=embeddings,
                          _enqueues=enqueues, _enqueue_due=enqueues)
        # a loss that does not enqueue agrees with the other ranks after its parent ran
        reader = not enqueues and should_gather(self.memory.distributed)
        try:
            out = super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        except Exception as err:
            # the parent refused the batch (in its own checks or in compute_loss)
            # before the enqueue: the other ranks wait in their enqueue's check
            if self._enqueue_due or reader:
                self.memory._reject_collectively(err)
            raise
        finally:
            self._parameters.update(saved)
            vars(self).update(_sample_indices=None, _stored_rows=None, _validated=None, _enqueues=None,
                              _enqueue_due=False)
        if reader:  # raises if the parent refused the batch on another rank
            check_batch_collectively(None, embeddings, labels, enqueues=False)
        return out

    def __reduce_ex__(self, protocol):
        reduced = super().__reduce_ex__(protocol)
        built_from = type(self).__dict__.get("_dsb_built_from")
        if built_from is None:
            return reduced
        # a class built by with_dsb_weighting lives in no module, so pickle could
        # not look it up by name: it is rebuilt from its (importable) parent
        return (_new_built_dsb_loss, (built_from,), *reduced[2:])

    def expect_sample_indices(self, indices: torch.Tensor) -> None:
        """Announce the dataset indices of the next call's batch, for loops that
        cannot pass ``sample_indices=`` (PML's trainers call ``loss(embeddings,
        labels, indices_tuple)``: give them a :class:`~pml_dsb.losses.SampleIndicesGetter`).
        The next call alone uses them, checked as ``sample_indices`` are."""
        self._pending_sample_indices = indices

    def weight_regularization_loss(self, weights):
        # the parameters keep their dtype (see forward): under autocast PML's
        # regularizers mixed bf16 products with the float32 weights' limits
        # (RegularFace filled a bf16 diagonal with float32's lowest: overflow)
        with torch.autocast(device_type=weights.device.type, enabled=False):
            return super().weight_regularization_loss(weights)

    def cast_types(self, dtype, device):
        """Check instead of re-typing parameters' ``.data`` as PML does; the
        parent's other tensors (e.g. ``LargeMarginSoftmaxLoss``'s ``n_range``)
        are cast as the parent casts them."""
        for name, param in self.named_parameters(recurse=False):
            if param.device != torch.device(device):
                raise ValueError(
                    f"{type(self).__name__}.{name} is on {param.device} but the embeddings are on "
                    f"{device}: move the loss first with loss.to({str(device)!r})"
                )
        for name, value in list(vars(self).items()):  # parameters and buffers live elsewhere
            if isinstance(value, torch.Tensor) and not name.startswith("_"):
                # integer ones (ProxyNCALoss's proxy_labels: class ids) keep their dtype
                kind = {"dtype": dtype} if value.is_floating_point() else {}
                setattr(self, name, value.to(device=device, **kind))
        # then the parent's own casts of its other tensors (LargeMarginSoftmaxLoss
        # makes its integer n_range and cos_powers floating: under autocast a bf16
        # cosine ** int64 powers stayed bf16, the parent's went float32), with
        # empty stand-ins for the parameters whose .data it would re-type
        parent_cast = getattr(super(), "cast_types", None)  # most PML losses have none
        if parent_cast is None:
            return
        originals = {name: p for name, p in self._parameters.items() if p is not None}
        self._parameters.update({name: torch.nn.Parameter(p.new_empty(0), requires_grad=False)
                                 for name, p in originals.items()})
        try:
            parent_cast(dtype, device)
        finally:
            self._parameters.update(originals)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """The parent's loss dict, then the enqueue, then (stage 3) the class weights applied."""
        # the parent's losses first: if it rejects the input, the memory is untouched
        loss_dict = super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        names = self._weighted_loss_names(loss_dict)
        self._check_weightable(loss_dict, names)  # at every call, not first in stage 3
        enqueues = self.update_memory if self._enqueues is None else self._enqueues  # None: not via forward()
        if enqueues:
            # forward() validated this very batch before the parent saw it
            validated = embeddings is getattr(self, "_validated", None)
            vars(self)["_enqueue_due"] = False  # the enqueue makes its own collective calls, failing or not
            stored, indices = getattr(self, "_stored_rows", None), self._sample_indices
            if stored is not None and validated:  # repeated dataset indices: each one's last copy
                emb, lab = embeddings[stored.to(embeddings.device)], labels[stored.to(labels.device)]
                indices = indices[stored]
            else:
                emb, lab = embeddings, labels
            self.memory._enqueue(emb, lab, indices, validated=validated)
        # the records through setattr: subclasses may watch them (properties, __setattr__)
        records = {"dsb_stage": self.memory.stage, "dsb_num_enqueued": self.memory.num_enqueued,
                   "dsb_fill_level": self.memory.fill_level}
        records.update(dict.fromkeys(self._DSB_RECORDS[3:], math.nan))  # a restored memory may start below stage 3
        if records["dsb_stage"] == 3:
            scales = self.memory.scales()
            weights = self.memory._weights_of_own_scales(scales)
            # over the classes that have a scale (DEFINITIONS: S = 0 is "no scale yet")
            has_scale = scales[(self.memory.class_counts >= 2) & (scales > self.memory.eps)]
            # the recorded figures in one transfer (one host sync on a GPU, not five)
            figures = [*torch.aminmax(weights.to(scales.dtype))]
            if has_scale.numel():
                figures += [has_scale.mean(), *torch.aminmax(has_scale)]
            figures = torch.stack(figures).tolist()
            largest = max(-figures[0], figures[1])  # the largest magnitude, from the smallest and largest
            _weight_losses_by_class(loss_dict, labels, weights, names, self.dsb_element_indices, largest=largest)
            if has_scale.numel():
                records.update(zip(("dsb_mean_scale", "dsb_min_scale", "dsb_max_scale"), figures[2:]))
            records.update(dsb_min_weight=figures[0], dsb_max_weight=figures[1])
        for name, value in records.items():
            setattr(self, name, value)
        return loss_dict

    def _weighted_loss_names(self, loss_dict: dict) -> list:
        """The sub-losses that stage 3 weights: those the parent returned (not
        ``_sub_loss_names()``: ``SmoothAPLoss`` names "loss" but returns
        "ap_loss"), regularisers excluded."""
        skip = set(self.all_regularization_loss_names()) | set(self.dsb_unweighted_losses)
        return [name for name in loss_dict if name not in skip]

    def _check_weightable(self, loss_dict: dict, names: list) -> None:
        """Raise ``TypeError`` for a parent whose losses come already reduced
        (``HistogramLoss``, ``ManifoldLoss``, ``PNPLoss``, ...): no per-sample
        loss to weight. PML's zero loss (a plain ``0``) passes."""
        for name in names:
            entry = loss_dict[name]
            if torch.is_tensor(entry["losses"]) and entry["reduction_type"] not in _ANCHOR_OF:
                raise TypeError(
                    f"{type(self).__name__} cannot weight loss {name!r}: its parent returns it with "
                    f"reduction_type {entry['reduction_type']!r}, not per sample, pair or triplet "
                    f"({sorted(_ANCHOR_OF)}); this batch was not stored"
                )


def with_dsb_weighting(loss_class: type) -> type:
    """Build the DSB form of a PML loss class, e.g. ``with_dsb_weighting(ArcFaceLoss)``.

    The new class is ``DSB<Name>``, subclassing ``(DSBWeightingMixin, loss_class)``.
    Its constructor takes ``num_classes`` and ``embedding_size`` first, also
    for losses that do not (pair and triplet losses): the memory needs them.
    ``ProxyAnchorLoss`` and its subclasses weight their per-class losses by class.
    Each parent gets one class (a second call returns the same one), and its
    instances pickle (``torch.save(loss)``, ``copy.deepcopy``) like any loss.
    """
    if not isinstance(loss_class, type) or not issubclass(loss_class, BaseMetricLossFunction):
        raise TypeError(
            f"loss_class must be a subclass of PML's BaseMetricLossFunction, got {loss_class!r}; for "
            f"torch.nn.CrossEntropyLoss use dsb_class_weights"
        )
    return _built_dsb_class(loss_class)


@functools.cache  # one class per parent: pickles and isinstance checks find the same class again
def _built_dsb_class(loss_class: type) -> type:
    namespace = {"__module__": loss_class.__module__, "_dsb_built_from": loss_class}
    return type(f"DSB{loss_class.__name__}", (DSBWeightingMixin, loss_class), namespace)


def _new_built_dsb_loss(loss_class: type):
    """An empty instance of ``with_dsb_weighting(loss_class)``, which pickle then fills."""
    cls = _built_dsb_class(loss_class)
    return cls.__new__(cls)


def _parent_constructors(cls: type):
    """The parameters of each constructor after :class:`DSBWeightingMixin` in
    ``cls``'s MRO, nearest first, with the class that defines it."""
    for k in cls.__mro__[cls.__mro__.index(DSBWeightingMixin) + 1 :]:
        if "__init__" in k.__dict__:
            yield k, list(inspect.signature(k.__dict__["__init__"]).parameters.values())[1:]  # no self


def _parent_takes(cls: type) -> tuple[str, ...]:
    """Which of ``num_classes`` and ``embedding_size`` the constructors after
    :class:`DSBWeightingMixin` in ``cls``'s MRO name, in that order; not
    ``MarginLoss``'s own optional ``num_classes`` (per-class betas)."""
    names = set()
    for k, params in _parent_constructors(cls):
        if k is MarginLoss:
            params = [p for p in params if p.default is inspect.Parameter.empty]
        names |= {p.name for p in params}
    return tuple(name for name in ("num_classes", "embedding_size") if name in names)


def _leading_sizes(cls: type) -> tuple[str, ...]:
    """The sizes (``num_classes``, ``embedding_size``) that the parent's
    positional parameters begin with, in its order: in the first constructor
    that does not just pass ``*args`` on (SubCenterArcFaceLoss passes them to
    ArcFaceLoss)."""
    for _, params in _parent_constructors(cls):
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not positional and any(p.kind == p.VAR_POSITIONAL for p in params):
            continue
        lead = []
        for name in positional:
            if name not in ("num_classes", "embedding_size"):
                break
            lead.append(name)
        return tuple(lead)
    return ()
