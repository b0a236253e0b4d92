"""PML trainer hooks that evaluate with Recall@K / NMI and log with record-keeper.

:func:`make_retrieval_hooks` assembles, in one call, what PML's examples build
by hand:

* a ``testers.GlobalEmbeddingSpaceTester`` whose accuracy calculator is a
  :class:`~pml_dsb.evaluation.RetrievalAccuracyCalculator`;
* a real ``record_keeper.RecordKeeper`` writing one CSV file per record group
  and an SQLite database ``logs.db`` under ``<folder>/logs``, plus a
  tensorboard ``SummaryWriter`` under ``<folder>/tensorboard`` when
  tensorboard is installed;
* PML's ``logging_presets.HookContainer`` with ``recall_at_1`` as the primary
  metric, saving the latest and the best models under ``<folder>/models``.

It returns a :class:`RetrievalHooks` whose ``end_of_epoch_hook`` and
``end_of_iteration_hook`` go straight into a PML trainer::

    hooks = make_retrieval_hooks({"val": val_set}, "runs/cub")
    trainer = trainers.MetricLossOnly(..., end_of_iteration_hook=hooks.end_of_iteration_hook,
                                      end_of_epoch_hook=hooks.end_of_epoch_hook)
    trainer.train(num_epochs=10)
    hooks.accuracy_history()   # {"epoch": [...], "recall_at_1_level0": [...], ...}

record-keeper is required and tensorboard optional; a missing one that is
needed raises ``ModuleNotFoundError`` naming the pip command.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pytorch_metric_learning import testers
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import logging_presets
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from pml_dsb import _optional

from . import _checks
from .retrieval_accuracy_calculator import RetrievalAccuracyCalculator

__all__ = ["RetrievalHooks", "make_retrieval_hooks"]

logger = logging.getLogger(__name__)


@dataclass
class RetrievalHooks:
    """Everything :func:`make_retrieval_hooks` built, for the trainer and after it.

    Attributes:
        end_of_epoch_hook: pass to the PML trainer; tests every
            ``test_interval`` epochs, logs, saves models, returns False to
            stop when ``patience`` ran out.
        end_of_iteration_hook: pass to the PML trainer; logs losses every
            ``log_freq`` iterations.
        tester, accuracy_calculator, hook_container, record_keeper,
        record_writer, tensorboard_writer: the PML / record-keeper objects.
        log_folder, model_folder, tensorboard_folder: where things are written.
    """

    end_of_epoch_hook: Callable[[Any], bool]
    end_of_iteration_hook: Callable[[Any], None]
    tester: testers.GlobalEmbeddingSpaceTester
    accuracy_calculator: AccuracyCalculator
    hook_container: logging_presets.HookContainer
    record_keeper: Any
    record_writer: Any
    tensorboard_writer: Any | None
    log_folder: str
    model_folder: str
    tensorboard_folder: str | None
    validation_split_name: str = field(default="val")

    def accuracy_history(self, split_name: str | None = None) -> dict:
        """Every logged accuracy column of ``split_name`` (default: the
        validation split) as ``{column: [value per tested epoch]}``, read back
        from the SQLite log; {} before the first test."""
        split = self.validation_split_name if split_name is None else split_name
        return self.hook_container.get_accuracy_history(self.tester, split, return_all_metrics=True)

    def best_epoch_and_accuracy(self, split_name: str | None = None) -> tuple[int | None, float]:
        """(best epoch, its primary metric) so far; (None, 0) before any test."""
        split = self.validation_split_name if split_name is None else split_name
        return self.hook_container.get_best_epoch_and_accuracy(self.tester, split)

    def close(self) -> None:
        """Flush and close the tensorboard writer (CSV/SQLite are written per test)."""
        if self.tensorboard_writer is not None:
            self.tensorboard_writer.flush()
            self.tensorboard_writer.close()


def _tensorboard_writer(tensorboard: bool | None, folder: str):
    if tensorboard is False:
        return None
    if tensorboard is None:
        try:
            module = _optional.require("torch.utils.tensorboard", "tensorboard logging")
        except ModuleNotFoundError:
            logger.info("tensorboard is not installed: logging to CSV and SQLite only")
            return None
    else:
        module = _optional.require("torch.utils.tensorboard", "tensorboard logging")
    return module.SummaryWriter(log_dir=folder)


def _reference_splits(dataset_dict: Mapping[str, Any], splits_to_eval, validation_split_name: str) -> dict:
    """{query split: its reference splits} as PML's tester will evaluate them."""
    if splits_to_eval is None:
        return {name: [name] for name in dataset_dict}
    pairs = {}
    for item in splits_to_eval if isinstance(splits_to_eval, (list, tuple)) else [None]:
        ok = isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], (list, tuple))
        if not ok or not all(name in dataset_dict for name in [item[0], *item[1]]) or item[0] in pairs:
            raise ValueError(
                f"splits_to_eval must be a list of (query split, [reference splits]) pairs, each query once, "
                f"naming splits of dataset_dict {sorted(dataset_dict)}; got {splits_to_eval!r}"
            )
        # PML's tester puts a query split that is also a reference split first
        # (at its first test; the hooks set them so before it, for a resumed run)
        query, refs = item[0], list(item[1])
        pairs[query] = [query, *(r for r in refs if r != query)] if query in refs else refs
    if validation_split_name not in pairs:
        raise ValueError(
            f"splits_to_eval never evaluates validation_split_name={validation_split_name!r} (its query splits: "
            f"{sorted(pairs)}); the best model could not be chosen"
        )
    return pairs


def make_retrieval_hooks(
    dataset_dict: Mapping[str, Any],
    folder: str | os.PathLike,
    *,
    recall_ks: Sequence[int] = (1, 2, 4, 8),
    accuracy_calculator: AccuracyCalculator | None = None,
    primary_metric: str = "recall_at_1",
    validation_split_name: str = "val",
    splits_to_eval: list | None = None,
    test_collate_fn: Callable | None = None,
    test_interval: int = 1,
    patience: int | None = None,
    save_models: bool = True,
    log_freq: int = 50,
    tensorboard: bool | None = None,
    batch_size: int = 256,
    dataloader_num_workers: int = 2,
    data_device: Any = None,
    record_group_name_prefix: str | None = None,
    tester_kwargs: Mapping[str, Any] | None = None,
) -> RetrievalHooks:
    """Build the tester, record-keeper and ``HookContainer``; return the hooks.

    Args:
        dataset_dict: ``{split name: dataset}`` to test (each split against
            itself unless ``splits_to_eval`` says otherwise, PML's format).
            Datasets return ``(input, label)``.
        folder: root of the outputs: ``logs/`` (CSV, ``logs.db``),
            ``models/`` (``trunk_<epoch>.pth``, ``trunk_best<epoch>.pth``, ...),
            ``tensorboard/``.
        recall_ks: K of the default calculator's ``recall_at_<k>`` metrics.
        accuracy_calculator: use this calculator instead of
            ``RetrievalAccuracyCalculator(recall_ks=recall_ks)``.
        primary_metric: metric that picks the best model (the largest value
            wins): one of the calculator's accuracies, not ``num_lone_queries``.
        validation_split_name: the split whose ``primary_metric`` picks it.
        splits_to_eval, test_collate_fn, test_interval, patience: as PML's
            ``end_of_epoch_hook``.
        save_models, log_freq, record_group_name_prefix: as PML's ``HookContainer``.
        tensorboard: True: require it; False: never; None: when installed.
        batch_size, dataloader_num_workers, data_device: the tester's
            (``data_device=None``: PML's choice, CUDA when available).
        tester_kwargs: more ``GlobalEmbeddingSpaceTester`` arguments.

    Raises:
        ModuleNotFoundError: record-keeper missing, or tensorboard with
            ``tensorboard=True``, naming the pip command.
        ValueError: ``validation_split_name`` not in ``dataset_dict`` or not a
            query split of ``splits_to_eval``, a malformed ``splits_to_eval``,
            ``primary_metric`` not computed by the calculator, bad intervals.
    """
    rk = _optional.record_keeper()
    if not isinstance(dataset_dict, Mapping) or len(dataset_dict) == 0:
        raise ValueError(
            f"dataset_dict must be a non-empty mapping split name -> dataset, got {dataset_dict!r}"
        )
    if validation_split_name not in dataset_dict:
        raise ValueError(
            f"validation_split_name={validation_split_name!r} is not a key of dataset_dict; "
            f"expected one of {sorted(dataset_dict)}"
        )
    references = _reference_splits(dataset_dict, splits_to_eval, validation_split_name)
    test_interval = _checks.check_int(test_interval, "test_interval", 1)
    if patience is not None:
        patience = _checks.check_int(patience, "patience", 0)
    log_freq = _checks.check_int(log_freq, "log_freq", 1)
    calc = RetrievalAccuracyCalculator(recall_ks=recall_ks) if accuracy_calculator is None else accuracy_calculator
    # num_lone_queries counts queries (PML's best model has the largest value): no accuracy
    accuracies = [m for m in calc.get_curr_metrics() if m != "num_lone_queries"]
    if primary_metric not in accuracies:
        why = ("counts queries left out of Recall@K, it is no accuracy" if primary_metric == "num_lone_queries"
               else "is not computed by the accuracy calculator")
        raise ValueError(f"primary_metric={primary_metric!r} {why}; expected one of {accuracies}")

    root = os.fspath(folder)
    log_folder = os.path.join(root, "logs")
    model_folder = os.path.join(root, "models")
    tensorboard_folder = os.path.join(root, "tensorboard")
    os.makedirs(log_folder, exist_ok=True)
    os.makedirs(model_folder, exist_ok=True)

    tb_writer = _tensorboard_writer(tensorboard, tensorboard_folder)
    record_writer = rk.RecordWriter(folder=log_folder)
    record_keeper = rk.RecordKeeper(
        tensorboard_writer=tb_writer,
        record_writer=record_writer,
        attributes_to_search_for=c_f.list_of_recordable_attributes_list_names(),
    )
    hook_container = logging_presets.HookContainer(
        record_keeper,
        record_group_name_prefix=record_group_name_prefix,
        primary_metric=primary_metric,
        validation_split_name=validation_split_name,
        save_models=save_models,
        log_freq=log_freq,
    )
    kwargs = dict(batch_size=batch_size, dataloader_num_workers=dataloader_num_workers, data_device=data_device)
    kwargs.update(tester_kwargs or {})
    for reserved in ("accuracy_calculator", "end_of_testing_hook"):
        if reserved in kwargs:
            raise ValueError(f"tester_kwargs must not set {reserved!r}; make_retrieval_hooks sets it")
    tester = testers.GlobalEmbeddingSpaceTester(
        accuracy_calculator=calc,
        end_of_testing_hook=hook_container.end_of_testing_hook,
        **kwargs,
    )
    # what PML's tester sets at its first test: the SQLite log's table names
    # depend on it, so the history is readable before a test (or on resume)
    tester.reference_split_names.update(references)
    end_of_epoch_hook = hook_container.end_of_epoch_hook(
        tester,
        dataset_dict,
        model_folder,
        test_interval=test_interval,
        patience=patience,
        # lists, in PML's order: its tester concatenates and reorders them in place
        # (a tuple raised TypeError at the first test; the caller's list was changed)
        splits_to_eval=None if splits_to_eval is None else [(q, list(r)) for q, r in references.items()],
        test_collate_fn=test_collate_fn,
    )
    logger.info("retrieval hooks: logs in %s, models in %s", log_folder, model_folder)
    return RetrievalHooks(
        end_of_epoch_hook=end_of_epoch_hook,
        end_of_iteration_hook=hook_container.end_of_iteration_hook,
        tester=tester,
        accuracy_calculator=calc,
        hook_container=hook_container,
        record_keeper=record_keeper,
        record_writer=record_writer,
        tensorboard_writer=tb_writer,
        log_folder=log_folder,
        model_folder=model_folder,
        tensorboard_folder=tensorboard_folder if tb_writer is not None else None,
        validation_split_name=validation_split_name,
    )
