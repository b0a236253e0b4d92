"""The six methods of the paper's tables, built from a config and the train counts.

========== ===================================================================
method     loss
========== ===================================================================
``NSM``    PML ``NormalizedSoftmaxLoss(temperature)``
``CB-NSM`` the same with ``class_balanced_reducer(train_counts, beta)``
``DSB-NSM`` :class:`pml_dsb.DSBNormalizedSoftmaxLoss`
``ST``     PML ``SoftTripleLoss(la, gamma, margin, centers_per_class)``
``CB-ST``  the same with ``class_balanced_reducer(train_counts, beta)``
``DSB-ST`` :class:`pml_dsb.DSBSoftTripleLoss`
========== ===================================================================

Every loss has parameters (class proxies or centres) that the runner
optimises with their own optimizer. :data:`PARENTS` gives each method's plain
parent, against which its paired difference is reported.

>>> canonical_method("dsb_st"), PARENTS["CB-NSM"], is_dsb("DSB-NSM")
('DSB-ST', 'NSM', True)
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from pytorch_metric_learning.losses import NormalizedSoftmaxLoss, SoftTripleLoss

from ..losses import DSBNormalizedSoftmaxLoss, DSBSoftTripleLoss, class_balanced_reducer

__all__ = ["METHODS", "PARENTS", "canonical_method", "is_dsb", "build_loss"]

METHODS = ("NSM", "CB-NSM", "DSB-NSM", "ST", "CB-ST", "DSB-ST")
#: each re-weighted method's plain parent
PARENTS = {"CB-NSM": "NSM", "DSB-NSM": "NSM", "CB-ST": "ST", "DSB-ST": "ST"}


def canonical_method(name: str) -> str:
    """``"dsb_st"``, ``"DSB-ST"``, ``"dsb-st"`` -> ``"DSB-ST"``; unknown names raise ``ValueError``."""
    if not isinstance(name, str):
        raise ValueError(f"a method must be a string, got {name!r}")
    key = name.strip().upper().replace("_", "-")
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return key


def is_dsb(method: str) -> bool:
    """True for the methods whose loss holds a semantic-scale memory."""
    return canonical_method(method).startswith("DSB-")


def _is_whole(value, least: int) -> bool:
    """An int (or integral numpy/torch scalar) >= ``least``; not a bool or a fraction."""
    if isinstance(value, bool) or getattr(value, "dtype", None) == bool:
        return False
    try:
        return int(value) == value and value >= least
    except (TypeError, ValueError, OverflowError):
        return False


def build_loss(
    method: str,
    config,
    train_counts: Sequence[int],
    memory_size: Optional[int] = None,
    epoch_samples: Optional[int] = None,
) -> torch.nn.Module:
    """The loss of ``method`` with the hyper-parameters of ``config`` (a
    :class:`~pml_dsb.runner.config.BenchConfig`).

    Args:
        train_counts: training samples per class (length = number of classes);
            the CB weights come from them.
        memory_size: training-set size, the DSB memory's M when
            ``config.dsb.memory_size`` is 0 (default: ``sum(train_counts)``)
            and the memory is index-addressed.
        epoch_samples: what one epoch enqueues, M of a first-in-first-out
            memory when ``config.dsb.memory_size`` is 0 (default: the
            training-set size): with ``drop_last`` or the m-per-class sampler
            it is less, and a larger M would keep some samples twice.

    >>> from pml_dsb.runner.config import config_from_dict
    >>> cfg = config_from_dict({"dataset": {"name": "digits_lt"}, "model": {"embedding_size": 8}})
    >>> loss = build_loss("DSB-ST", cfg, [5, 3, 2])
    >>> type(loss).__name__, loss.memory.memory_size, loss.memory.warmup_epochs
    ('DSBSoftTripleLoss', 10, 5)
    >>> build_loss("CB-NSM", cfg, [5, 3, 2]).reducer.weights.shape
    torch.Size([3])
    """
    method = canonical_method(method)
    try:
        counts = list(train_counts)
    except TypeError:  # an int, None: one count is no class list
        counts = []
    if len(counts) < 2 or not all(_is_whole(c, 0) for c in counts):
        raise ValueError(f"train_counts must be at least 2 whole numbers >= 0 (one per class), got {train_counts!r}")
    counts = [int(c) for c in counts]
    for name, value in (("memory_size", memory_size), ("epoch_samples", epoch_samples)):
        if value is not None and not _is_whole(value, 1):
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    num_classes = len(counts)
    dim = config.model.embedding_size
    family = method.split("-")[-1]
    if family == "ST":
        st = config.softtriple
        kwargs = dict(
            num_classes=num_classes, embedding_size=dim, centers_per_class=st.centers_per_class,
            la=st.la, gamma=st.gamma, margin=st.margin,
        )
        plain, dsb = SoftTripleLoss, DSBSoftTripleLoss
    else:
        kwargs = dict(num_classes=num_classes, embedding_size=dim, temperature=config.normsoftmax.temperature)
        plain, dsb = NormalizedSoftmaxLoss, DSBNormalizedSoftmaxLoss
    if method.startswith("CB-"):
        return plain(**kwargs, reducer=class_balanced_reducer(counts, beta=config.class_balanced.beta))
    if method.startswith("DSB-"):
        total = sum(counts) if memory_size is None else int(memory_size)
        fifo_size = total if epoch_samples is None else int(epoch_samples)
        size = config.dsb.memory_size or (total if config.dsb.index_addressed else fifo_size)
        if config.dsb.index_addressed and size != total:
            raise ValueError(
                f"[dsb] index_addressed needs memory_size = the training-set size ({total}), "
                f"got {config.dsb.memory_size}; set memory_size = 0 or index_addressed = false"
            )
        return dsb(
            **kwargs, memory_size=size, warmup_epochs=config.dsb.warmup_epochs,
            normalize=None if config.dsb.normalize == "none" else "mean",
        )
    return plain(**kwargs)
