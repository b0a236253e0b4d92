"""Typed benchmark configs: dataclasses loaded from TOML, unknown keys rejected.

A config file describes one benchmark: which dataset, model, training
schedule, loss hyper-parameters, evaluation and runtime settings, which
methods and which seeds. Differences between datasets live in config files
(``benchmarks/configs/*.toml``, and the built-in
``pml_dsb/runner/configs/digits_lt.toml``), never in copied scripts.

Layout of a file (every section and key is optional except ``[dataset]``
``name``; missing keys take the defaults of the dataclasses below)::

    name = "digits_lt_if50"                  # run folder name under --out
    methods = ["NSM", "CB-NSM", "DSB-NSM", "ST", "CB-ST", "DSB-ST"]
    seeds = [0, 1, 2]

    [dataset]       # DatasetConfig
    [model]         # ModelConfig
    [training]      # TrainingConfig
    [softtriple]    # SoftTripleConfig
    [normsoftmax]   # NormSoftmaxConfig
    [class_balanced]  # ClassBalancedConfig
    [dsb]           # DSBConfig
    [evaluation]    # EvaluationConfig
    [runtime]       # RuntimeConfig

Every key is type-checked (an ``int`` where a ``float`` is expected is
accepted; ``true`` where an ``int`` is expected is not) and a key that no
dataclass declares raises :class:`ConfigError` naming the key, its section
and the file, with the allowed keys.

>>> cfg = config_from_dict({"dataset": {"name": "digits_lt", "imbalance_factor": 10}})
>>> cfg.dataset.imbalance_factor, cfg.methods[0], cfg.softtriple.la
(10.0, 'NSM', 20.0)
>>> config_from_dict({"dataset": {"name": "digits_lt"}, "training": {"lrr": 1.0}})
Traceback (most recent call last):
...
pml_dsb.runner.config.ConfigError: <dict>: unknown key 'lrr' in [training]; did you mean 'lr'? Allowed keys: batch_size, drop_last, epochs, loss_lr, lr, lr_schedule, m_per_class, momentum, num_workers, optimizer, sampler, weight_decay
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, Optional, Union

from ..evaluation._checks import MAX_FAISS_SEED

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "ConfigError",
    "DatasetConfig",
    "ModelConfig",
    "TrainingConfig",
    "SoftTripleConfig",
    "NormSoftmaxConfig",
    "ClassBalancedConfig",
    "DSBConfig",
    "EvaluationConfig",
    "RuntimeConfig",
    "BenchConfig",
    "DATASET_NAMES",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "default_config_path",
    "apply_overrides",
]

DATASET_NAMES = ("digits_lt", "cub200", "cars196", "cifar100_lt")
#: Datasets whose test classes are the training classes (per-class counts,
#: many/medium/few groups); the others test retrieval on unseen classes.
CLOSED_SET_DATASETS = ("digits_lt", "cifar100_lt")


class ConfigError(ValueError):
    """A config file or dict that does not describe a valid benchmark."""


#: numpy.random.seed takes 0 .. 2**32 - 1
MAX_SEED = 2**32 - 1


def _positive_int(section: str, name: str, value: int, low: int = 1) -> None:
    if value < low:
        raise ConfigError(f"[{section}] {name} must be >= {low}, got {value!r}")


def _positive_float(section: str, name: str, value: float, strict: bool = True) -> None:
    if not math.isfinite(value) or value < 0 or (strict and value == 0):
        raise ConfigError(f"[{section}] {name} must be a finite number {'>' if strict else '>='} 0, got {value!r}")


@dataclass(frozen=True)
class DatasetConfig:
    """``[dataset]``: which data, where.

    Attributes:
        name: one of ``digits_lt``, ``cub200``, ``cars196``, ``cifar100_lt``.
        root: folder holding the data (``CUB_200_2011/``, ``cars_annos.mat``,
            ``cifar-100-python/``); relative paths are relative to the current
            directory; ``--data-root`` overrides it. Unused by ``digits_lt``.
        imbalance_factor: head count / tail count of the long-tailed training
            set (``digits_lt``, ``cifar100_lt``; required for ``cifar100_lt``,
            default 1 = balanced for ``digits_lt``).
        split_seed: which bundled images form digits-LT's train/test split
            (``DigitsLT(seed=...)``); not a training seed.
        image_size: network input size for the image datasets (default: the
            dataset's transform default, 224 for CUB/Cars, 32 for CIFAR).
    """

    name: str
    root: Optional[str] = None
    imbalance_factor: Optional[float] = None
    split_seed: int = 0
    image_size: Optional[int] = None

    def __post_init__(self):
        if self.name not in DATASET_NAMES:
            raise ConfigError(f"[dataset] name must be one of {DATASET_NAMES}, got {self.name!r}")
        if self.imbalance_factor is not None:
            if self.name not in CLOSED_SET_DATASETS:
                raise ConfigError(
                    f"[dataset] imbalance_factor applies to {CLOSED_SET_DATASETS} only, "
                    f"not to {self.name!r}"
                )
            if not math.isfinite(self.imbalance_factor) or self.imbalance_factor < 1:
                raise ConfigError(f"[dataset] imbalance_factor must be >= 1, got {self.imbalance_factor!r}")
        elif self.name == "cifar100_lt":
            raise ConfigError("[dataset] imbalance_factor is required for cifar100_lt")
        _positive_int("dataset", "split_seed", self.split_seed, 0)
        if self.image_size is not None:
            _positive_int("dataset", "image_size", self.image_size)

    def unused_settings(self) -> list[str]:
        """Settings this dataset ignores: refused for a new run (run folders
        written before they were refused still load)."""
        unused = []
        if self.split_seed and self.name != "digits_lt":
            unused.append(f"[dataset] split_seed applies to digits_lt only (the others have fixed standard "
                          f"splits), not to {self.name!r}")
        if self.image_size is not None and self.name == "digits_lt":
            unused.append("[dataset] image_size applies to the image datasets (cub200, cars196, cifar100_lt), "
                          "not to digits_lt, whose 8x8 digits are fed as 64 values")
        return unused

    @property
    def closed_set(self) -> bool:
        """True when the test classes are the training classes."""
        return self.name in CLOSED_SET_DATASETS

    @property
    def long_tailed(self) -> bool:
        return self.imbalance_factor is not None and self.imbalance_factor > 1


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the embedding network (``pml_dsb.models.build_model``).

    Attributes:
        name: ``digits_cnn``, ``resnet18`` or ``resnet50``.
        embedding_size: output dimension (the paper: 64 and 512).
        pretrained: ``false``, ``true`` (torch hub cache) or a weights file.
        width: channels of ``digits_cnn``'s first convolution (its default if unset).
    """

    name: str = "digits_cnn"
    embedding_size: int = 64
    pretrained: Union[bool, str] = False
    width: Optional[int] = None

    def __post_init__(self):
        from ..models.build_model import MODEL_NAMES

        if self.name not in MODEL_NAMES:
            why = ""
            if str(self.name).lower().replace("-", "").replace("_", "") == "bninception":
                why = " (BN-Inception, the paper's backbone: torchvision has no definition and none is bundled)"
            raise ConfigError(f"[model] name must be one of {MODEL_NAMES}, got {self.name!r}{why}")
        _positive_int("model", "embedding_size", self.embedding_size)
        if self.width is not None:
            _positive_int("model", "width", self.width)
            if self.name != "digits_cnn":
                raise ConfigError(f"[model] width applies to digits_cnn only, not to {self.name!r}")


@dataclass(frozen=True)
class TrainingConfig:
    """``[training]``: one schedule for every method.

    Attributes:
        epochs: passes over the training set.
        batch_size: samples per iteration.
        optimizer: ``adam``, ``adamw`` or ``sgd``, used for both the model and
            the loss parameters (class proxies / centres).
        lr: learning rate of the model.
        loss_lr: learning rate of the loss parameters.
        weight_decay: of the model's optimizer (the loss's has none).
        momentum: SGD momentum.
        lr_schedule: ``constant`` or ``cosine`` (over ``epochs``, per epoch).
        sampler: ``random`` (each sample once per epoch) or ``m_per_class``
            (PML's ``MPerClassSampler``, ``m_per_class`` per class per batch,
            an epoch of the training set's size rounded down to whole batches).
        drop_last: drop the last incomplete batch.
        num_workers: DataLoader worker processes.
    """

    epochs: int = 30
    batch_size: int = 64
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    loss_lr: float = 1e-2
    weight_decay: float = 0.0
    momentum: float = 0.9
    lr_schedule: Literal["constant", "cosine"] = "constant"
    sampler: Literal["random", "m_per_class"] = "random"
    m_per_class: int = 4
    drop_last: bool = False
    num_workers: int = 0

    def __post_init__(self):
        _positive_int("training", "epochs", self.epochs)
        _positive_int("training", "batch_size", self.batch_size, 2)
        _positive_float("training", "lr", self.lr)
        _positive_float("training", "loss_lr", self.loss_lr)
        _positive_float("training", "weight_decay", self.weight_decay, strict=False)
        _positive_float("training", "momentum", self.momentum, strict=False)
        _positive_int("training", "m_per_class", self.m_per_class)
        _positive_int("training", "num_workers", self.num_workers, 0)
        if self.sampler == "m_per_class" and self.batch_size % self.m_per_class:
            raise ConfigError(
                f"[training] batch_size={self.batch_size} must be a multiple of m_per_class={self.m_per_class}"
            )


@dataclass(frozen=True)
class SoftTripleConfig:
    """``[softtriple]``: PML ``SoftTripleLoss`` (ST, CB-ST, DSB-ST). Paper: la=20,
    gamma=0.1, margin=0.01, 10 centres per class."""

    la: float = 20.0
    gamma: float = 0.1
    margin: float = 0.01
    centers_per_class: int = 10

    def __post_init__(self):
        _positive_float("softtriple", "la", self.la)
        _positive_float("softtriple", "gamma", self.gamma)
        _positive_float("softtriple", "margin", self.margin, strict=False)
        _positive_int("softtriple", "centers_per_class", self.centers_per_class)


@dataclass(frozen=True)
class NormSoftmaxConfig:
    """``[normsoftmax]``: PML ``NormalizedSoftmaxLoss`` (NSM, CB-NSM, DSB-NSM). Paper: 0.05."""

    temperature: float = 0.05

    def __post_init__(self):
        _positive_float("normsoftmax", "temperature", self.temperature)


@dataclass(frozen=True)
class ClassBalancedConfig:
    """``[class_balanced]``: CB weights ``(1 - beta) / (1 - beta ** n_c)``. Default 0.9999."""

    beta: float = 0.9999

    def __post_init__(self):
        if not 0 <= self.beta < 1:
            raise ConfigError(f"[class_balanced] beta must be in [0, 1), got {self.beta!r}")


@dataclass(frozen=True)
class DSBConfig:
    """``[dsb]``: the DSB memory (DSB-NSM, DSB-ST).

    Attributes:
        warmup_epochs: n (paper: 5); weighting starts once ``n * M``
            samples are enqueued (docs/DEFINITIONS.md), from the last batch of
            epoch n on (later with an index-addressed memory and
            ``drop_last`` or the m-per-class sampler, whose epochs enqueue
            fewer than M = the training-set size).
        memory_size: M; 0 (default) = the training-set size (the paper's)
            for an index-addressed memory, what one epoch enqueues for a
            first-in-first-out one (less with ``drop_last`` or the
            m-per-class sampler).
        normalize: ``mean`` (weights average 1) or ``none`` (raw ``1/S``).
        index_addressed: pass dataset indices to the loss, so that the memory
            holds one slot per training sample (needs ``memory_size`` = the
            training-set size), its latest embedding; ``false``: first in,
            first out, the paper's Algorithm 2, which holds the last M draws:
            with the ``random`` sampler the same samples as the index-addressed
            memory at the end of each epoch only (in between, some samples of
            late last epoch and early this one twice, others not at all).
    """

    warmup_epochs: int = 5
    memory_size: int = 0
    normalize: Literal["mean", "none"] = "mean"
    index_addressed: bool = True

    def __post_init__(self):
        _positive_int("dsb", "warmup_epochs", self.warmup_epochs, 0)
        _positive_int("dsb", "memory_size", self.memory_size, 0)


@dataclass(frozen=True)
class EvaluationConfig:
    """``[evaluation]``: every epoch on the test split (leave-one-out retrieval).

    Attributes:
        recall_ks: the K of Recall@K (must include 1 and 2 for the tables).
        nmi: compute NMI (faiss k-means, ``nredo`` restarts, seed ``nmi_seed``).
        batch_size: images per forward pass when embedding a split.
    """

    recall_ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    nmi: bool = True
    nmi_seed: int = 0
    nredo: int = 10
    batch_size: int = 256

    def __post_init__(self):
        if not self.recall_ks or 1 not in self.recall_ks or 2 not in self.recall_ks:
            raise ConfigError(f"[evaluation] recall_ks must include 1 and 2, got {self.recall_ks!r}")
        for k in self.recall_ks:
            _positive_int("evaluation", "recall_ks", k)
        if len(set(self.recall_ks)) != len(self.recall_ks):
            raise ConfigError(f"[evaluation] recall_ks must not repeat a value, got {self.recall_ks!r}")
        _positive_int("evaluation", "nmi_seed", self.nmi_seed, 0)
        if self.nmi_seed > MAX_FAISS_SEED:
            raise ConfigError(f"[evaluation] nmi_seed must be <= {MAX_FAISS_SEED} (faiss's k-means seed is a C int), "
                              f"got {self.nmi_seed!r}")
        _positive_int("evaluation", "nredo", self.nredo)
        _positive_int("evaluation", "batch_size", self.batch_size)


@dataclass(frozen=True)
class RuntimeConfig:
    """``[runtime]``: process settings the entry point applies once.

    Attributes:
        num_threads: ``torch.set_num_threads`` and faiss's OpenMP threads
            (0: leave the libraries' defaults); ``--threads`` overrides it.
        deterministic: ``torch.use_deterministic_algorithms(True,
            warn_only=True)`` (and the cuBLAS workspace setting on CUDA): an
            operation without a deterministic implementation warns, it does
            not raise.
    """

    num_threads: int = 1
    deterministic: bool = True

    def __post_init__(self):
        _positive_int("runtime", "num_threads", self.num_threads, 0)


_SECTIONS = {
    "dataset": DatasetConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "softtriple": SoftTripleConfig,
    "normsoftmax": NormSoftmaxConfig,
    "class_balanced": ClassBalancedConfig,
    "dsb": DSBConfig,
    "evaluation": EvaluationConfig,
    "runtime": RuntimeConfig,
}


@dataclass(frozen=True)
class BenchConfig:
    """A whole benchmark: top-level ``name``, ``methods``, ``seeds`` and the sections."""

    dataset: DatasetConfig
    name: str = "bench"
    methods: list[str] = field(default_factory=lambda: ["NSM", "CB-NSM", "DSB-NSM", "ST", "CB-ST", "DSB-ST"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    softtriple: SoftTripleConfig = field(default_factory=SoftTripleConfig)
    normsoftmax: NormSoftmaxConfig = field(default_factory=NormSoftmaxConfig)
    class_balanced: ClassBalancedConfig = field(default_factory=ClassBalancedConfig)
    dsb: DSBConfig = field(default_factory=DSBConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self):
        from .methods import canonical_method

        if not self.name or any(c in self.name for c in "/\\") or self.name in (".", ".."):
            raise ConfigError(f"name must be a non-empty folder name without '/', got {self.name!r}")
        if not self.methods:
            raise ConfigError("methods must list at least one method")
        try:
            methods = [canonical_method(m) for m in self.methods]
        except ValueError as err:
            raise ConfigError(f"methods: {err}") from None
        if len(set(methods)) != len(methods):
            raise ConfigError(f"methods lists a method twice: {self.methods!r}")
        object.__setattr__(self, "methods", methods)
        if not self.seeds:
            raise ConfigError("seeds must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds lists a seed twice: {self.seeds!r}")
        for s in self.seeds:
            if not 0 <= s <= MAX_SEED:
                raise ConfigError(f"seeds must be integers in [0, {MAX_SEED}] (numpy's seed range), got {s!r}")


# ----------------------------------------------------------------- loading
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "absent"
    return getattr(tp, "__name__", str(tp))


def _check_value(value: Any, tp: Any) -> tuple[bool, Any]:
    """(matches, converted value) for a TOML value against a field's type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return (isinstance(value, str) and value in typing.get_args(tp)), value
    if origin is Union:
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            ok, converted = _check_value(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            return False, value
        out = []
        for item in value:
            ok, converted = _check_value(item, item_type)
            if not ok:
                return False, value
            out.append(converted)
        return True, out
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported config field type {tp!r}")  # a bug in this module


def _build(cls: type, data: Any, where: str, source: str, nested: dict[str, type] | None = None):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ";"
        place = f"in {where}" if where != "the top level" else "at the top level"
        raise ConfigError(
            f"{source}: unknown key {key!r} {place}{hint} Allowed keys: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        if nested and name in nested:
            kwargs[name] = _build(nested[name], value, f"[{name}]", source)
            continue
        ok, converted = _check_value(value, hints[name])
        if not ok:
            raise ConfigError(
                f"{source}: {where} {name} must be {_type_name(hints[name])}, got {value!r} "
                f"({type(value).__name__})"
            )
        kwargs[name] = converted
    missing = [
        f.name for f in dataclasses.fields(cls)
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: {where} needs {', '.join(repr(m) for m in missing)}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def config_from_dict(data: dict, source: str = "<dict>") -> BenchConfig:
    """Build a :class:`BenchConfig` from a parsed TOML dict; ``source`` names it in errors."""
    return _build(BenchConfig, data, "the top level", source, nested=_SECTIONS)


def load_config(path: Union[str, os.PathLike]) -> BenchConfig:
    """Read a TOML config file into a :class:`BenchConfig`.

    Raises:
        FileNotFoundError: no such file.
        ConfigError: TOML syntax error, unknown key, wrong type or value
            (the message names the file, the section and the key).
    """
    path = os.fspath(path)
    with open(path, "rb") as fh:
        try:
            data = tomllib.load(fh)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:  # TOML is UTF-8
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
    return config_from_dict(data, source=path)


def default_config_path() -> str:
    """Path of the built-in digits-LT config shipped inside the package."""
    return str(resources.files("pml_dsb.runner") / "configs" / "digits_lt.toml")


def config_to_dict(config: BenchConfig) -> dict:
    """The config as plain TOML-able data (``None`` values left out)."""

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if v is not None}
        return obj

    return strip(dataclasses.asdict(config))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_config(config: BenchConfig, header: str = "") -> str:
    """The resolved config as TOML text that :func:`load_config` reads back equal.

    >>> cfg = config_from_dict({"dataset": {"name": "digits_lt"}, "seeds": [3]})
    >>> config_from_dict(tomllib.loads(dump_config(cfg))) == cfg
    True
    """
    data = config_to_dict(config)
    lines = [f"# {line}" for line in header.splitlines()]
    for key, value in data.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append("")
            lines.append(f"[{key}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
    return "\n".join(lines) + "\n"


def apply_overrides(
    config: BenchConfig,
    *,
    epochs: Optional[int] = None,
    seeds: Optional[list[int]] = None,
    methods: Optional[list[str]] = None,
    data_root: Optional[str] = None,
    num_threads: Optional[int] = None,
    name: Optional[str] = None,
) -> BenchConfig:
    """A copy of ``config`` with the command line's overrides (None: keep),
    checked as a config file's values are (``ConfigError`` naming the key)."""
    overrides = {
        ("training", "epochs"): epochs,
        ("seeds",): None if seeds is None else list(seeds),
        ("methods",): None if methods is None else list(methods),
        ("dataset", "root"): None if data_root is None else os.fspath(data_root),
        ("runtime", "num_threads"): num_threads,
        ("name",): name,
    }
    if all(value is None for value in overrides.values()):
        return config
    data = config_to_dict(config)
    for path, value in overrides.items():
        if value is not None:
            section = data.setdefault(path[0], {}) if len(path) == 2 else data
            section[path[-1]] = value
    return config_from_dict(data, source="the overrides")
