"""A whole benchmark: every (method, seed) run of a config, then the run folder.

:func:`run_benchmark` is what ``pml-dsb bench`` calls after it has applied
the process settings (:func:`configure_runtime`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from typing import Iterator, Optional, Sequence, Union

import torch

from .._device import resolve_device
from ..distributed.ddp import barrier, current_context
from .builders import build_embedding_model, build_run_data, check_m_per_class, samples_per_epoch
from .config import BenchConfig, ConfigError, RuntimeConfig, dump_config, load_config
from .results import environment_info, now_iso, summarize, write_environment, write_run_folder
from .training import check_resumable, compatibility_key, on_main, train_one

logger = logging.getLogger(__name__)

__all__ = ["run_benchmark", "configure_runtime", "RunFolderExistsError"]

# written by the end of a run, from all its results: stale once a resume starts
_SUMMARY_OUTPUTS = ("results.json", "table.md", "table.csv", "per_class.csv", "per_class_recall.png")
_RUN_OUTPUTS = ("checkpoints", *_SUMMARY_OUTPUTS, "environment.json", "config.toml")


class RunFolderExistsError(FileExistsError):
    """The run folder already holds a run and neither resume nor overwrite was asked for."""


@contextlib.contextmanager
def configure_runtime(runtime: RuntimeConfig, device: Union[str, torch.device] = "cpu") -> Iterator[None]:
    """Apply ``[runtime]`` for the duration of the block, then put the
    previous settings back: ``torch.set_num_threads`` and faiss's OpenMP
    threads (``num_threads``, 0 = leave them), and
    ``torch.use_deterministic_algorithms(True, warn_only=True)`` (with
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` on CUDA if unset)."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    faiss = None
    try:
        if runtime.num_threads:
            cores = os.cpu_count()
            if cores and runtime.num_threads > cores:
                logger.warning("[runtime] num_threads = %d exceeds this machine's %d CPU cores: threads will "
                               "contend and run slower", runtime.num_threads, cores)
            torch.set_num_threads(runtime.num_threads)
            try:
                from .. import _optional

                faiss = _optional.faiss()
                faiss.omp_set_num_threads(runtime.num_threads)
            except ModuleNotFoundError:
                faiss = None  # evaluation will raise with the install command
        if runtime.deterministic:
            if torch.device(device).type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        torch.set_num_threads(old_threads)
        if faiss is not None:
            faiss.omp_set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def _previous_outputs(run_dir: str) -> list[str]:
    return [name for name in _RUN_OUTPUTS if os.path.exists(os.path.join(run_dir, name))]


def _clear_run_folder(run_dir: str) -> None:
    """--overwrite: delete the previous run's outputs, once every check passed."""
    present = _previous_outputs(run_dir)
    for name in present:
        target = os.path.join(run_dir, name)
        shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    if present:
        logger.info("%s: removed the previous run's outputs (--overwrite)", run_dir)


def _check_run_folder(run_dir: str, config: BenchConfig, resume: bool, overwrite: bool) -> None:
    present = _previous_outputs(run_dir)
    if not present or overwrite:
        return
    if not resume:
        raise RunFolderExistsError(
            f"{run_dir!r} already holds a run ({', '.join(present)}). Pass --resume to continue it, "
            f"--overwrite to replace it, or choose another --out or --run-name."
        )
    saved = os.path.join(run_dir, "config.toml")
    if os.path.isfile(saved):
        try:
            previous = load_config(saved)
        except ConfigError as err:
            raise ConfigError(f"cannot resume: {err}") from None
        if compatibility_key(previous) != compatibility_key(config):
            old, new = compatibility_key(previous), compatibility_key(config)
            diffs = [f"[{s}] {k}: {old[s].get(k)!r} -> {new[s].get(k)!r}"
                     for s in new if isinstance(new[s], dict)
                     for k in sorted(set(old.get(s, {})) | set(new[s])) if old.get(s, {}).get(k) != new[s].get(k)]
            raise ConfigError(
                f"cannot resume {run_dir!r}: its config differs from this one in "
                f"{'; '.join(diffs) or 'its settings'}. Resume with the same config, or use another --out."
            )


def _check_against_data(config: BenchConfig, data) -> None:
    """The settings that need the dataset's sizes, checked before any training."""
    n, classes = len(data.train), len(data.train_counts)
    dsb_methods = [m for m in config.methods if m.upper().startswith("DSB")]
    tr = config.training
    if dsb_methods and config.dsb.index_addressed and config.dsb.memory_size not in (0, n):
        raise ConfigError(
            f"[dsb] index_addressed needs memory_size = the training-set size ({n}) or 0, "
            f"got {config.dsb.memory_size}; set memory_size = 0 or index_addressed = false"
        )
    if dsb_methods and not config.dsb.index_addressed and 0 < config.dsb.memory_size < tr.batch_size:
        # the memory refuses a batch larger than itself: found at the first DSB
        # batch, after the other methods had trained
        raise ConfigError(
            f"[dsb] memory_size = {config.dsb.memory_size} is smaller than [training] batch_size = "
            f"{tr.batch_size}: a first-in-first-out memory holds at least one batch; raise memory_size or set it to 0"
        )
    if samples_per_epoch(n, tr, current_context().world_size) == 0:
        raise ConfigError(
            f"[training] an epoch of {n} training samples yields no batch with batch_size = "
            f"{tr.batch_size}, drop_last = {str(tr.drop_last).lower()} and "
            f"{current_context().world_size} processes; lower batch_size"
        )
    if dsb_methods and tr.epochs <= config.dsb.warmup_epochs:
        # allowed (a warm-up-only run is a valid experiment), but rarely meant
        logger.warning(
            "%s: [training] epochs = %d <= [dsb] warmup_epochs = %d: %s",
            ", ".join(dsb_methods), tr.epochs, config.dsb.warmup_epochs,
            "the loss is weighted at one batch at most; these runs will hardly differ from their parents'"
            if tr.epochs == config.dsb.warmup_epochs
            else "the loss is never weighted; these runs will equal their parents'")
    check_m_per_class(tr, classes)
    # each test query is ranked against the other test items: found at the first
    # evaluation otherwise, after the run folder was written
    largest, neighbours = max(config.evaluation.recall_ks), len(data.test) - 1
    if largest > neighbours:
        raise ConfigError(
            f"[evaluation] recall_ks asks for k = {largest} neighbours, but each query of the {len(data.test)} "
            f"test items has {neighbours} others; lower recall_ks"
        )


def _build_data_and_model(config: BenchConfig):
    """The run's data and a model built from its config (to check against the
    data), missing data files and missing pretrained weights named together
    (the weights went unmentioned until the data was in place)."""
    missing = []
    data = model = None
    try:
        data = build_run_data(config)
    except FileNotFoundError as err:
        missing.append(err)
    try:
        with torch.random.fork_rng(devices=[]):
            model = build_embedding_model(config.model)
    except FileNotFoundError as err:
        missing.append(err)
    if len(missing) == 1:
        raise missing[0]
    if missing:
        raise FileNotFoundError("\n".join(str(err) for err in missing))
    return data, model


def _check_model_fits_data(model: torch.nn.Module, data, config: BenchConfig) -> None:
    """One test image through the model (eval mode, CPU), before the run folder
    is written: a ResNet given 1-channel 8x8 digits failed at the first
    evaluation, with torch's message and the folder already written."""
    image = data.test[0][0]
    try:
        with torch.no_grad():
            model.eval()(image.unsqueeze(0))
    except (RuntimeError, ValueError) as err:
        raise ConfigError(
            f"[model] name = {config.model.name!r} cannot embed [dataset] name = {config.dataset.name!r} "
            f"images (shape {tuple(image.shape)}): {err}"
        ) from None


def _import_optional_modules() -> None:
    """faiss (evaluation) and matplotlib (the per-class plot): a missing extra
    raises ``ModuleNotFoundError`` with its pip command before any training,
    not after it with a half-written run folder."""
    from .. import _optional

    _optional.faiss()
    _optional.matplotlib_pyplot()


def run_benchmark(
    config: BenchConfig,
    out: Union[str, os.PathLike] = "results",
    device: Union[str, torch.device] = "cpu",
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    stop_after_epoch: Optional[int] = None,
    argv: Optional[Sequence[str]] = None,
) -> Optional[str]:
    """Train every method of ``config`` with every seed and write the run folder.

    Returns the run folder ``<out>/<config.name>``, or None when
    ``stop_after_epoch`` stopped the runs early (continue with ``resume=True``).
    See :mod:`pml_dsb.runner.results` for the folder's contents.

    Under torch.distributed (``torchrun``) every rank calls it with the same
    arguments and trains every run together (see :mod:`pml_dsb.runner.training`);
    rank 0 alone checks, deletes (``overwrite``) and writes the run folder, the
    other ranks wait for it, and every rank returns the same value or raises
    the same error.

    Raises:
        RunFolderExistsError: the folder holds a run and neither ``resume`` nor
            ``overwrite`` is set.
        ConfigError: ``resume`` with a config that differs from the folder's.
        CheckpointError: ``resume`` with a run whose ``last.pt`` cannot be
            continued (other settings, more epochs than this config has, a
            cosine schedule over other epochs, another number of processes),
            before anything is written.
        ModuleNotFoundError: faiss or matplotlib is missing (the ``cpu`` and
            ``plot`` extras), before anything is written.
        ValueError: ``device`` is not one this machine has, before anything is written.
    """
    device = resolve_device(device)
    ctx = current_context()
    run_dir = os.path.join(os.fspath(out), config.name)
    unused = config.dataset.unused_settings()
    if unused:
        raise ConfigError("; ".join(unused) + "; remove it from the config")
    on_main(_check_run_folder, run_dir, config, resume, overwrite)
    started, t0 = now_iso(), time.perf_counter()
    # missing extras, data or weights, and runs that cannot be resumed, fail
    # here: before the run folder is written or (--overwrite) deleted
    _import_optional_modules()
    data, model = _build_data_and_model(config)
    _check_against_data(config, data)
    with torch.random.fork_rng(devices=[]):
        _check_model_fits_data(model, data, config)
    if resume and not overwrite:
        on_main(_check_resumable_runs, run_dir, config, ctx.world_size)
    if overwrite:
        on_main(_clear_run_folder, run_dir)
    on_main(_write_start, run_dir, config, device, argv, started)
    logger.info(
        "%s: %s, %d train / %d test images, %d methods x %d seeds, %d epochs, device %s%s",
        config.name, config.dataset.name, len(data.train), len(data.test), len(config.methods),
        len(config.seeds), config.training.epochs, device,
        f", {ctx.world_size} processes" if ctx.enabled else "",
    )
    from tqdm import tqdm

    runs: dict[str, list[dict]] = {m: [] for m in config.methods}
    stopped = False
    jobs = [(m, s) for m in config.methods for s in config.seeds]
    with tqdm(total=len(jobs), desc=config.name, unit="run", disable=not progress or not ctx.is_main,
              dynamic_ncols=True) as bar:
        for method, seed in jobs:
            bar.set_postfix_str(f"{method} seed {seed}")
            result = train_one(config, method, seed, device=device, out_dir=run_dir, progress=progress,
                               resume=resume, stop_after_epoch=stop_after_epoch, data=data)
            if result is None:
                stopped = True
            else:
                runs[method].append(result)
            bar.update(1)
    if stopped:
        barrier()
        logger.info("%s: runs stopped after epoch %s; continue with --resume", run_dir, stop_after_epoch)
        return None

    on_main(_write_end, run_dir, config, runs, data.train_counts, device, argv, started, t0)
    barrier()
    logger.info("%s: results written", run_dir)
    return run_dir


def _check_resumable_runs(run_dir: str, config: BenchConfig, world_size: int) -> None:
    for method in config.methods:
        for seed in config.seeds:
            check_resumable(config, method, seed, run_dir, world_size)


def _write_start(run_dir: str, config: BenchConfig, device: torch.device, argv, started: str) -> None:
    os.makedirs(run_dir, exist_ok=True)
    # a resumed run (perhaps with more epochs) rewrites its summary at the end:
    # until then a previous one would sit beside the new config.toml
    for name in _SUMMARY_OUTPUTS:
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            os.remove(path)
    with open(os.path.join(run_dir, "config.toml"), "w", encoding="utf-8") as fh:
        fh.write(dump_config(config, header="Resolved config of this run (pml-dsb bench)."))
    write_environment(run_dir, environment_info(config, str(device), argv, started=started, finished=None))


def _write_end(run_dir: str, config: BenchConfig, runs: dict, train_counts, device: torch.device, argv,
               started: str, t0: float) -> None:
    summary = summarize(config, runs, train_counts)
    write_run_folder(run_dir, config, summary)
    write_environment(run_dir, environment_info(
        config, str(device), argv, started=started, finished=now_iso(),
        wall_seconds=round(time.perf_counter() - t0, 3),
        train_seconds={m: [r["train_seconds"] for r in rs] for m, rs in runs.items()},
    ))
