"""Datasets, models and data loaders from a config: the runner's factories.

Kept apart from the training loop so that the analysis command
(:func:`pml_dsb.runner.load_run`) rebuilds exactly what a run trained on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..datasets.indexed import IndexedDataset
from .config import BenchConfig, ConfigError, DatasetConfig, ModelConfig, TrainingConfig

logger = logging.getLogger(__name__)

__all__ = [
    "IndexedDataset",
    "RunData",
    "build_dataset",
    "build_run_data",
    "build_embedding_model",
    "build_train_loader",
    "train_sampler",
    "build_eval_loader",
]

_TRANSFORM_NAMES = {"digits_lt": "digitslt", "cub200": "cub200", "cars196": "cars196", "cifar100_lt": "cifar100lt"}


def build_dataset(config: DatasetConfig, split: str, augment: Optional[bool] = None):
    """The ``split`` of the configured dataset, with its default transform.

    ``augment`` (default: ``split == "train"``) selects the training transform
    (random crops and flips) or the deterministic test one; the train split
    is embedded for semantic scales with ``augment=False``.
    """
    from .. import datasets
    from ..datasets import default_transform

    if augment is None:
        augment = split == "train"
    name = config.name
    if name == "digits_lt":
        return datasets.DigitsLT(
            imbalance_factor=config.imbalance_factor or 1.0, split=split, seed=config.split_seed
        )
    if config.root is None:
        raise ValueError(
            f"dataset {name!r} needs a data folder: set [dataset] root in the config or pass --data-root"
        )
    transform = default_transform(_TRANSFORM_NAMES[name], "train" if augment else "test", config.image_size)
    if name == "cub200":
        return datasets.CUB200(config.root, split=split, transform=transform)
    if name == "cars196":
        return datasets.Cars196(config.root, split=split, transform=transform)
    if name == "cifar100_lt":
        return datasets.CIFAR100LT(config.root, config.imbalance_factor, split=split, transform=transform)
    raise ValueError(f"unknown dataset {name!r}")  # DatasetConfig already refuses it


@dataclass
class RunData:
    """The three views of the data a run needs.

    Attributes:
        train: the training split with the training transform.
        train_eval: the training split with the test transform (for the
            semantic scales of the train features).
        test: the test split (queries and references of the retrieval).
        train_counts: training samples per class (``numpy.int64``).
    """

    train: Dataset
    train_eval: Dataset
    test: Dataset
    train_counts: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(len(self.train_counts))


def build_run_data(config: BenchConfig) -> RunData:
    """Build the train, train-for-evaluation and test datasets of ``config``."""
    train = build_dataset(config.dataset, "train", augment=True)
    # digits has no augmentation: the same object serves both views
    train_eval = train if config.dataset.name == "digits_lt" else build_dataset(config.dataset, "train", augment=False)
    test = build_dataset(config.dataset, "test", augment=False)
    return RunData(train=train, train_eval=train_eval, test=test,
                   train_counts=np.asarray(train.class_counts(), dtype=np.int64))


def build_embedding_model(config: ModelConfig) -> torch.nn.Module:
    """``pml_dsb.models.build_model`` with the ``[model]`` section."""
    from ..models import build_model

    extra = {}
    if config.width is not None:
        if config.name != "digits_cnn":
            raise ValueError(f"[model] width applies to digits_cnn only, not to {config.name!r}")
        extra["width"] = config.width
    return build_model(config.name, config.embedding_size, pretrained=config.pretrained, **extra)


def build_train_loader(
    dataset: Dataset,
    labels: np.ndarray,
    config: TrainingConfig,
    generator: torch.Generator,
    device: torch.device,
) -> DataLoader:
    """The training loader: items ``(image, label, dataset index)``.

    ``sampler = "random"``: a shuffled pass over the data per epoch, drawn
    from ``generator`` (whose state the checkpoint keeps). ``"m_per_class"``:
    PML's ``MPerClassSampler`` (``m_per_class`` samples of
    ``batch_size / m_per_class`` classes per batch, an epoch of the data's
    size rounded down to whole batches); it draws from numpy's global RNG, which the run seeds and the
    checkpoint keeps, and its shuffled class order is kept as well.

    With more than one torch.distributed process, every rank builds this
    same one-process loader (same ``generator`` seed, same numpy state) and
    takes its slice of each batch
    (:class:`~pml_dsb.distributed.ShardedBatchSampler`): the global batch is
    the one-process batch, the sampler state is the same on every rank, and
    :func:`train_sampler` still finds the one-process sampler.
    """
    from pytorch_metric_learning.samplers import MPerClassSampler

    from ..distributed.ddp import ShardedBatchSampler, get_world_size

    common = dict(
        batch_size=config.batch_size, drop_last=config.drop_last, num_workers=config.num_workers,
        generator=generator, pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    indexed = IndexedDataset(dataset)
    if config.sampler == "random":
        loader = DataLoader(indexed, shuffle=True, **common)
    else:
        # PML only asserts it (gone under python -O: batches of repeated samples)
        check_m_per_class(config, len(np.unique(np.asarray(labels))))
        length = max(len(dataset) - len(dataset) % config.batch_size, config.batch_size)
        sampler = MPerClassSampler(labels, m=config.m_per_class, batch_size=config.batch_size,
                                   length_before_new_iter=length)
        loader = DataLoader(indexed, sampler=sampler, **common)
    if get_world_size() <= 1:
        return loader
    # the same batches as one process, each rank its slice; the generator is drawn from in
    # the same order (the loader's base seed, then the shuffle)
    return DataLoader(indexed, batch_sampler=ShardedBatchSampler(loader.batch_sampler),
                      num_workers=config.num_workers, generator=generator, pin_memory=device.type == "cuda",
                      persistent_workers=False)


def check_m_per_class(config: TrainingConfig, num_classes: int) -> None:
    """``ConfigError`` unless the m-per-class sampler can fill a batch."""
    if config.sampler == "m_per_class" and config.m_per_class * num_classes < config.batch_size:
        raise ConfigError(
            f"[training] sampler = 'm_per_class' fills a batch of {config.batch_size} from m_per_class = "
            f"{config.m_per_class} samples of each of {num_classes} classes: at most "
            f"{config.m_per_class * num_classes}; raise m_per_class or lower batch_size"
        )


def samples_per_epoch(num_samples: int, config, world_size: int = 1) -> int:
    """How many samples one epoch of :func:`build_train_loader` yields, over
    all ranks (its ``config``: the ``[training]`` section): the training-set
    size, less the incomplete last batch with ``drop_last`` or when it has
    fewer samples than ranks (:class:`~pml_dsb.distributed.ShardedBatchSampler`
    skips it); the m-per-class sampler's length (the set's size rounded down
    to whole batches)."""
    batch = config.batch_size
    if config.sampler != "random":
        whole = max(num_samples - num_samples % batch, batch)
        return whole if batch >= world_size else 0
    full, last = num_samples - num_samples % batch, num_samples % batch
    if batch < world_size:
        full = 0
    return full + (last if not config.drop_last and last >= world_size else 0)


def train_sampler(loader: DataLoader):
    """The one-process sampler of a :func:`build_train_loader` loader (under
    the rank's :class:`~pml_dsb.distributed.ShardedBatchSampler` when sharded)."""
    from ..distributed.ddp import ShardedBatchSampler

    batches = loader.batch_sampler
    if isinstance(batches, ShardedBatchSampler):
        return batches.batch_sampler.sampler
    return loader.sampler


def build_eval_loader(dataset: Dataset, batch_size: int, device: torch.device) -> DataLoader:
    """Items in dataset order, no shuffling: for embedding a whole split."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                      pin_memory=device.type == "cuda")
