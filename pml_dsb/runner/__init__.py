"""The benchmark runner behind ``pml-dsb bench``.

* :mod:`~pml_dsb.runner.config`: typed configs (:class:`BenchConfig`) from TOML.
* :mod:`~pml_dsb.runner.methods`: the losses of NSM, CB-NSM, DSB-NSM, ST, CB-ST, DSB-ST.
* :mod:`~pml_dsb.runner.training`: :func:`train_one`, one (method, seed) run.
* :mod:`~pml_dsb.runner.checkpoint`: atomic, validated checkpoints.
* :mod:`~pml_dsb.runner.results`: the run folder (its contract is that
  module's docstring), :func:`load_run` to read one back.
* :mod:`~pml_dsb.runner.bench`: :func:`run_benchmark`, every run of a config.
"""
from .bench import RunFolderExistsError, configure_runtime, run_benchmark
from .builders import RunData, build_dataset, build_embedding_model, build_run_data
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import (
    BenchConfig,
    ConfigError,
    apply_overrides,
    config_from_dict,
    default_config_path,
    dump_config,
    load_config,
)
from .methods import METHODS, PARENTS, build_loss, canonical_method
from .results import Run, load_run, load_trained_model, summarize, write_run_folder
from .training import evaluate_model, train_one

__all__ = [
    "BenchConfig",
    "ConfigError",
    "load_config",
    "config_from_dict",
    "dump_config",
    "apply_overrides",
    "default_config_path",
    "METHODS",
    "PARENTS",
    "build_loss",
    "canonical_method",
    "RunData",
    "build_dataset",
    "build_run_data",
    "build_embedding_model",
    "train_one",
    "evaluate_model",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "Run",
    "load_run",
    "load_trained_model",
    "summarize",
    "write_run_folder",
    "run_benchmark",
    "configure_runtime",
    "RunFolderExistsError",
]
