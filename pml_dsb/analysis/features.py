"""Where the analysed vectors come from: raw inputs of a dataset, or a trained model.

- :func:`load_dataset` builds one of the package's datasets by its CLI name.
- :func:`raw_features` flattens a dataset's inputs (pixels) into (N, D) vectors.
- :func:`embed_dataset` runs a model over a dataset (eval mode, no gradients).
- :func:`checkpoint_features` rebuilds a benchmark run's trained model and
  train set from a ``best.pt`` through the runner (``pml_dsb.runner.load_run``)
  and embeds that set.
"""
from __future__ import annotations

import itertools
import logging
import os
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)

__all__ = [
    "DATASET_NAMES",
    "load_dataset",
    "raw_features",
    "embed_dataset",
    "find_run_folder",
    "checkpoint_features",
]

#: Dataset names accepted by :func:`load_dataset` (and ``--dataset``).
DATASET_NAMES = ("digits-lt", "cifar100-lt", "cub200", "cars196")


def load_dataset(
    name: str,
    split: str = "train",
    root: Optional[Union[str, os.PathLike]] = None,
    imbalance_factor: Optional[float] = None,
    seed: Optional[int] = None,
):
    """The dataset ``name`` (one of :data:`DATASET_NAMES`) with its deterministic
    (test-time) transform, so that raw features do not depend on augmentation.

    ``root`` is required for every dataset but ``digits-lt``; ``imbalance_factor``
    applies to the long-tailed ones (default 10); ``seed`` is digits-LT's split
    seed (default 0); the other datasets have fixed splits and refuse one.

    >>> ds = load_dataset("digits-lt", imbalance_factor=50)
    >>> len(ds), ds.num_classes
    (347, 10)
    """
    from pml_dsb import datasets
    from pml_dsb.datasets import default_transform

    name = str(name).replace("_", "-")
    if name not in DATASET_NAMES:
        raise ValueError(f"dataset must be one of {DATASET_NAMES}, got {name!r}")
    if imbalance_factor is not None and name not in ("digits-lt", "cifar100-lt"):
        raise ValueError(f"imbalance_factor applies to the long-tailed datasets, not to {name!r} (got {imbalance_factor})")
    if seed is not None and name != "digits-lt":
        raise ValueError(f"a split seed applies to digits-lt only; {name!r} has a fixed split (got {seed})")
    factor = 10.0 if imbalance_factor is None else imbalance_factor
    if name == "digits-lt":
        return datasets.DigitsLT(imbalance_factor=factor, split=split, seed=0 if seed is None else seed)
    if root is None:
        raise ValueError(f"dataset {name!r} needs a data root (--root DIR); nothing is downloaded")
    transform = default_transform(name.replace("-", ""), "test")
    if name == "cifar100-lt":
        return datasets.CIFAR100LT(root, factor, split=split, transform=transform)
    if name == "cub200":
        return datasets.CUB200(root, split=split, transform=transform)
    return datasets.Cars196(root, split=split, transform=transform)


def _labels(dataset, seen=None) -> np.ndarray:
    """``dataset.labels``, else the labels its items gave (``seen``: a list of
    label batches, e.g. from a ``TensorDataset``)."""
    labels = getattr(dataset, "labels", None)
    if labels is None and seen:
        labels = torch.cat([torch.as_tensor(y).reshape(-1) for y in seen])
    if labels is None:
        raise ValueError(f"{type(dataset).__name__} has no `labels` attribute and yields no labels: its items "
                         "must be (input, label) pairs")
    return np.asarray(labels, dtype=np.int64)


def raw_features(dataset, batch_size: int = 256) -> tuple[torch.Tensor, np.ndarray]:
    """Every input of ``dataset`` flattened to one row: ``(features (N, D) float32, labels (N,))``.

    Uses ``dataset.data`` directly when it already is a tensor of inputs
    (digits-LT, no transform); otherwise iterates the dataset in order.

    >>> from pml_dsb.datasets import DigitsLT
    >>> x, y = raw_features(DigitsLT(10, "test"))
    >>> tuple(x.shape), np.bincount(y).tolist()
    ((500, 64), [50, 50, 50, 50, 50, 50, 50, 50, 50, 50])
    """
    data = getattr(dataset, "data", None)
    if isinstance(data, torch.Tensor) and getattr(dataset, "transform", None) is None:
        return data.reshape(len(data), -1).float(), _labels(dataset)
    rows, seen = [], []
    for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        rows.append(images.reshape(len(images), -1).float())
        seen.append(labels)
    return torch.cat(rows), _labels(dataset, seen)


@torch.no_grad()
def embed_dataset(
    model: torch.nn.Module,
    dataset,
    batch_size: int = 256,
    device: Optional[Union[str, torch.device]] = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Embeddings of ``dataset`` by ``model`` in eval mode: ``(features (N, E) on CPU, labels)``.

    The model's training mode is restored afterwards.

    >>> from pml_dsb.datasets import DigitsLT
    >>> from pml_dsb.models import DigitsEmbeddingNet
    >>> f, y = embed_dataset(DigitsEmbeddingNet(8), DigitsLT(10, "test"))
    >>> tuple(f.shape)
    (500, 8)
    """
    if device is None:
        # the model's own device; CPU for one with no parameters or buffers
        first = next(itertools.chain(model.parameters(), model.buffers()), None)
        device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    out, seen = [], []
    try:
        for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            out.append(model(images.to(device)).float().cpu())
            seen.append(labels)
    finally:
        model.train(was_training)
    return torch.cat(out), _labels(dataset, seen)


def find_run_folder(checkpoint: Union[str, os.PathLike]) -> str:
    """The run folder above ``<run>/checkpoints/<method>/seed<k>/best.pt``: the
    nearest ancestor of ``checkpoint`` that holds a ``config.toml``."""
    folder = os.path.dirname(os.path.abspath(os.fspath(checkpoint)))
    for _ in range(5):
        if os.path.isfile(os.path.join(folder, "config.toml")):
            return folder
        folder = os.path.dirname(folder)
    raise FileNotFoundError(
        f"no config.toml above checkpoint {os.fspath(checkpoint)!r}: expected the run-folder layout "
        "<run>/checkpoints/<method>/seed<k>/best.pt of `pml-dsb bench`"
    )


def checkpoint_features(
    checkpoint: Union[str, os.PathLike],
    data_root: Optional[Union[str, os.PathLike]] = None,
    device: str = "cpu",
    batch_size: Optional[int] = None,
) -> tuple[torch.Tensor, np.ndarray, dict]:
    """Train-set embeddings under a benchmark run's checkpoint: ``(features, labels, info)``.

    The run folder is found above the checkpoint (:func:`find_run_folder`);
    the runner (:func:`pml_dsb.runner.load_run`) rebuilds the model of the
    checkpoint's method and seed and the config's training split with its
    test-time transform, and embeds it: the features ``per_class.csv``'s
    semantic scales were computed from. ``info`` names the run, method,
    seed, dataset and epoch.
    """
    from pml_dsb.runner import load_checkpoint, load_run

    state = load_checkpoint(checkpoint, map_location=device)
    run = load_run(find_run_folder(checkpoint), data_root=data_root)
    method, seed = state["method"], int(state["seed"])
    # this file's weights, not the run's best.pt or last.pt of the same method and seed
    model = run.model_from_state(state, device, source=os.fspath(checkpoint))
    dataset = run.train_dataset(augment=False)
    features, labels = embed_dataset(model, dataset, batch_size or run.config.evaluation.batch_size, device)
    name = os.path.basename(os.fspath(checkpoint))
    info = {"source": f"checkpoint features ({name}, {state['kind']}, epoch {state['epoch']})", "run": run.path,
            "method": method, "seed": seed, "dataset": run.config.dataset.name, "split": "train",
            "imbalance_factor": run.config.dataset.imbalance_factor, "dimension": int(features.shape[1])}
    return features, labels, info
