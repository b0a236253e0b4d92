"""One training loop for every dataset and method: :func:`train_one`.

A run is one (method, seed) pair of a :class:`~pml_dsb.runner.config.BenchConfig`.
It trains the embedding model and the loss's parameters (class proxies or
centres, each with its own optimizer), evaluates Recall@K and NMI on the test
split after every epoch (leave-one-out retrieval, :func:`pml_dsb.evaluation.evaluate_embeddings`),
keeps the epoch with the best Recall@1 in ``best.pt`` and writes ``last.pt``
after every epoch: model, loss (DSB memory included), optimizers,
schedulers, RNG states, sampler state, history. ``resume=True`` continues
from ``last.pt`` and gives exactly the results of an uninterrupted run.

DSB memory: with ``[dsb] index_addressed = true`` (default) the loop itself
enqueues each batch with its dataset indices (one memory slot per training
sample; a sample repeated in a batch by a sampler that draws with
replacement is enqueued once) and the loss only reads the memory
(``update_memory = False``); otherwise the loss enqueues first in, first out.

Randomness: :func:`train_one` is a run's entry point. It seeds torch's,
numpy's and Python's global RNGs with the run's seed inside
:func:`seeded_rng`, which puts the caller's RNG states back afterwards, so
runs do not depend on their order and the caller's RNG is left untouched.
The model initialisation, the loss's parameters, the sample order and the
augmentations all follow from the seed; methods run with the same seed
share the model initialisation and the sample order (paired comparisons).

Distributed training (``torchrun``; :func:`train_one` under an initialised
process group): every rank builds the same model, loss and one-process batch
sampler and trains on its slice of each batch
(:class:`~pml_dsb.distributed.ShardedBatchSampler`), the model wrapped in
``DistributedDataParallel`` and the loss's own parameters averaged with
:func:`~pml_dsb.distributed.average_gradients`. Each rank's loss is scaled by
its share of the global batch, so the averaged gradients are those of the
global batch's mean loss (uneven last batches included), and ``train_loss``
is the global batch's. The DSB memory gathers every rank's part
(every rank enqueues every iteration), so all ranks hold the same memory.
Rank 0 alone evaluates (the metrics are broadcast, so every rank takes the
same best-epoch decision), writes the checkpoints and ``result.json``; an
exception there is raised on every rank. ``last.pt`` holds the RNG states
of all ranks (a list, one per rank; a dict on one process) and resumes only
under the same number of processes. Differences from one process with the
same global batch: BatchNorm normalises with each rank's own slice (its
running statistics are rank 0's, which DDP broadcasts), gradients are summed
in another order, a global batch with fewer samples than ranks is skipped,
and a sample drawn twice in one global batch (``m_per_class``) on two ranks
enters the memory with the lower rank's copy (one process keeps the last).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pickle
import random
import time
from typing import Any, Optional, Union

import numpy as np
import torch

from .._atomic import atomic_file
from .._device import resolve_device
from .._json import json_safe, read_json
from ..distributed.ddp import (
    all_gather_objects,
    average_gradients,
    broadcast_object,
    current_context,
    get_world_size,
    is_main_process,
    wrap_model,
)
from ..functional import class_semantic_scales
from ..distributed.gather import last_occurrences
from .builders import (
    RunData,
    build_embedding_model,
    build_eval_loader,
    build_run_data,
    build_train_loader,
    samples_per_epoch,
    train_sampler,
)
from .checkpoint import (
    FORMAT_TAG,
    FORMAT_VERSION,
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    restore_training_state,
    save_checkpoint,
)
from .config import BenchConfig, config_to_dict
from .methods import build_loss, canonical_method, is_dsb

logger = logging.getLogger(__name__)

__all__ = [
    "train_one",
    "seeded_rng",
    "run_dir_for",
    "embed",
    "evaluate_model",
    "compatibility_key",
    "write_json_atomic",
    "on_main",
]


def _tqdm(**kwargs):
    from tqdm.auto import tqdm

    return tqdm(**kwargs)


@contextlib.contextmanager
def seeded_rng(seed: int, device: Union[str, torch.device] = "cpu"):
    """Seed torch (CPU and CUDA), numpy and ``random`` with ``seed``; restore
    the previous global states on exit."""
    saved = capture_rng_state(device)
    try:
        torch.manual_seed(seed)  # also every CUDA device
        np.random.seed(seed)
        random.seed(seed)
        yield
    finally:
        restore_rng_state(saved)


def run_dir_for(out_dir: Union[str, os.PathLike], method: str, seed: int) -> str:
    """``<out_dir>/checkpoints/<method>/seed<seed>``: where a run keeps its files."""
    return os.path.join(os.fspath(out_dir), "checkpoints", canonical_method(method), f"seed{seed}")


def compatibility_key(config: BenchConfig) -> dict:
    """The part of a config that must not change when a run is resumed: all but
    the run name, methods, seeds, data folder, epochs and runtime settings."""
    data = config_to_dict(config)
    for key in ("name", "methods", "seeds", "runtime"):
        data.pop(key, None)
    data["dataset"].pop("root", None)
    data["training"].pop("epochs", None)
    return data


def on_main(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on rank 0 alone; its return value on every rank.

    Without a process group (or with one process) it is just the call. Under
    torch.distributed the other ranks wait for rank 0 (a barrier) and get its
    return value, or raise its exception (the same exception when it can be
    pickled, else a ``RuntimeError`` naming it), so that no rank is left
    waiting in a collective rank 0 never reaches.
    """
    if get_world_size() <= 1:
        return fn(*args, **kwargs)
    out, error = None, None
    if is_main_process():
        try:
            out = fn(*args, **kwargs)
        except Exception as err:  # every rank must hear of it
            error = err
    sent_out, sent_error = broadcast_object((out, _portable(error)) if is_main_process() else None)
    if error is not None:
        raise error
    if sent_error is not None:
        raise sent_error
    return out if is_main_process() else sent_out


def _portable(error: Optional[BaseException]) -> Optional[BaseException]:
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}")


def write_json_atomic(data: Any, path: Union[str, os.PathLike]) -> None:
    """Write strict JSON to ``path`` through a temporary file and ``os.replace``.

    An undefined value (NaN: the Recall@1 of an empty many/medium/few group,
    say) is written as null: Python reads a bare ``NaN`` token, strict JSON
    parsers (jq, JavaScript) refuse the whole file."""
    data = json_safe(data)
    with atomic_file(path) as fh:
        json.dump(data, fh, indent=1, allow_nan=False)
        fh.write("\n")


# ------------------------------------------------------------- evaluation
@torch.no_grad()
def embed(model: torch.nn.Module, dataset, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (float32, CPU) and labels of every item of ``dataset``, in
    order, with the model in eval mode (its mode is restored after)."""
    was_training = model.training
    model.eval()
    out, labels = [], []
    try:
        for images, y in build_eval_loader(dataset, batch_size, device):
            out.append(model(images.to(device)).float().cpu())
            labels.append(torch.as_tensor(y))
    finally:
        model.train(was_training)
    return torch.cat(out), torch.cat(labels).long()


def _per_class_list(per_class: dict, num_classes: int) -> list:
    return [per_class.get(c) for c in range(num_classes)]


def evaluate_model(model: torch.nn.Module, data: RunData, config: BenchConfig, device: torch.device) -> dict:
    """Recall@K, NMI, per-class Recall@1 (a list indexed by test label, None
    where a class has no evaluated query) and, for closed-set datasets, the
    many/medium/few groups, on the test split (each query against all other
    test items)."""
    from ..evaluation import evaluate_embeddings

    ev = config.evaluation
    emb, labels = embed(model, data.test, ev.batch_size, device)
    out = evaluate_embeddings(
        emb, labels, recall_ks=tuple(ev.recall_ks), nmi=ev.nmi, nmi_seed=ev.nmi_seed, nredo=ev.nredo,
        train_counts=data.train_counts if config.dataset.closed_set else None,
    )
    num_test_classes = int(labels.max()) + 1
    for k in ev.recall_ks:
        out[f"per_class_recall_at_{k}"] = _per_class_list(out[f"per_class_recall_at_{k}"], num_test_classes)
    return out


def _scalar_metrics(metrics: dict) -> dict:
    keep = {k: v for k, v in metrics.items() if k.startswith("recall_at_") or k == "NMI"}
    if "groups" in metrics:
        for group, values in metrics["groups"].items():
            keep[f"recall_at_1_{group}"] = values["recall_at_1"]
    return keep


# --------------------------------------------------------------- training
def _optimizer(kind: str, params, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    params = list(params)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _scheduler(kind: str, optimizer: torch.optim.Optimizer, epochs: int):
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=_constant)


def _constant(epoch: int) -> float:  # module level: schedulers' state stays picklable
    return 1.0


def _sampler_state(loader) -> dict:
    sampler = train_sampler(loader)
    labels = getattr(sampler, "labels", None)  # MPerClassSampler's shuffled class order
    return {"class_order": [int(c) for c in labels] if isinstance(sampler, _mper_class()) else None}


def _set_sampler_state(loader, state: dict) -> None:
    sampler = train_sampler(loader)
    if state.get("class_order") is not None and isinstance(sampler, _mper_class()):
        sampler.labels = list(state["class_order"])


def _mper_class():
    from pytorch_metric_learning.samplers import MPerClassSampler

    return MPerClassSampler


def _global_batch(value: torch.Tensor, size: int) -> tuple[bool, int, float]:
    """Whether the loss is finite on every rank, the global batch size and the
    global batch's mean loss (one all-reduce; collective)."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    local = float(value.detach())
    finite = math.isfinite(local)
    stats = torch.tensor([0.0 if finite else 1.0, float(size), local * size if finite else 0.0],
                         dtype=torch.float64, device=device)
    dist.all_reduce(stats)
    bad, total, loss_sum = stats.tolist()
    return bad == 0, int(total), loss_sum / total


def _train_epoch(model, loss_fn, loader, optimizers, device, use_indices: bool, where: str) -> dict:
    distributed = get_world_size() > 1
    model.train()
    loss_fn.train()
    total, batches = 0.0, 0
    for images, labels, indices in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        embeddings = model(images)
        if use_indices:
            # the runner enqueues (loss_fn.update_memory is False): a sampler that draws with
            # replacement (MPerClassSampler) can repeat an index in a batch, and one slot
            # takes one sample, the batch's last copy
            keep = last_occurrences(indices)
            loss_fn.memory.enqueue(embeddings.detach()[keep], labels[keep], indices[keep].to(device))
        value = loss_fn(embeddings, labels)
        if distributed:
            # every rank takes the same decision; each rank's mean loss weighs by its share
            # of the global batch, so DDP's average is the global batch's mean-loss gradient
            finite, global_size, global_loss = _global_batch(value, labels.shape[0])
            if not finite:
                raise FloatingPointError(
                    f"{where}: the loss is not finite on some rank (here {float(value)}) at batch {batches}; "
                    f"training diverged"
                )
            value = value * (labels.shape[0] * get_world_size() / global_size)
        elif not torch.isfinite(value):
            raise FloatingPointError(f"{where}: the loss is {float(value)} at batch {batches}; training diverged")
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        value.backward()
        if distributed:
            average_gradients(loss_fn.parameters())  # outside DDP: class proxies or centres
        for opt in optimizers:
            opt.step()
        total += global_loss if distributed else float(value.detach())
        batches += 1
    out = {"train_loss": total / max(batches, 1), "iterations": batches}
    memory = getattr(loss_fn, "memory", None)
    if memory is not None:
        out["dsb_stage"] = memory.stage
    return out


def train_one(
    config: BenchConfig,
    method: str,
    seed: int,
    device: Union[str, torch.device] = "cpu",
    out_dir: Union[str, os.PathLike] = "results",
    progress: bool = True,
    resume: bool = False,
    stop_after_epoch: Optional[int] = None,
    data: Optional[RunData] = None,
) -> Optional[dict]:
    """Train ``method`` with ``seed`` as ``config`` says; return its result.

    Files (under :func:`run_dir_for`): ``last.pt`` after every epoch,
    ``best.pt`` whenever Recall@1 improves (strictly), ``result.json`` at the
    end. With ``resume=True`` a finished run's ``result.json`` is returned
    as it is, and an unfinished one continues from ``last.pt`` (which must
    come from the same method, seed and settings, see
    :func:`compatibility_key`; more epochs than before are allowed).

    Args:
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:1"``...).
        out_dir: the benchmark's run folder.
        progress: show a tqdm bar over the epochs.
        stop_after_epoch: stop after this epoch as if the process had been
            killed there (testing ``resume``); the function then returns None.
        data: datasets built once by the caller (:func:`build_run_data`).

    Returns:
        A JSON-serialisable dict: ``method``, ``seed``, ``epochs``,
        ``best_epoch``, ``metrics`` (the best epoch's ``recall_at_<k>``,
        ``NMI``, ``groups``...), ``last_metrics`` and ``init_metrics`` (the
        last epoch's and the untrained network's Recall@K, NMI and group
        Recall@1), ``per_class_recall_at_1`` (list over test
        labels), ``train_semantic_scales`` (per training class, from the
        train features of the best checkpoint, in bits),
        ``test_semantic_scales`` (per test class; only for datasets tested on
        unseen classes), ``history`` (per epoch, epoch 0 = the untrained
        network), ``train_seconds`` (the training epochs, without the evaluation after each).
    """
    method = canonical_method(method)
    device = resolve_device(device)
    ctx = current_context()
    if ctx.enabled and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # DDP pins the model to one device
    ctx = dataclasses.replace(ctx, device=device)
    run_dir = run_dir_for(out_dir, method, seed)
    last_path = os.path.join(run_dir, "last.pt")
    best_path = os.path.join(run_dir, "best.pt")
    result_path = os.path.join(run_dir, "result.json")
    where = f"{method} seed {seed}"
    epochs = config.training.epochs
    key = run_compatibility_key(config, method)

    done = on_main(_finished_result, result_path, epochs, key, method, seed) if resume else None
    if done is not None:
        logger.info("%s: finished earlier, result read from %s", where, result_path)
        return done
    if data is None:
        data = build_run_data(config)

    with seeded_rng(seed, device):
        model = build_embedding_model(config.model).to(device)
        loss_fn = build_loss(method, config, data.train_counts, memory_size=len(data.train),
                             epoch_samples=samples_per_epoch(len(data.train), config.training, get_world_size())
                             ).to(device)
        tr = config.training
        opt_model = _optimizer(tr.optimizer, model.parameters(), tr.lr, tr.weight_decay, tr.momentum)
        opt_loss = _optimizer(tr.optimizer, loss_fn.parameters(), tr.loss_lr, 0.0, tr.momentum)
        optimizers = {"model": opt_model, "loss": opt_loss}
        schedulers = {name: _scheduler(tr.lr_schedule, opt, epochs) for name, opt in optimizers.items()}
        generator = torch.Generator().manual_seed(seed)
        loader = build_train_loader(data.train, np.asarray(data.train.labels), tr, generator, device)
        use_indices = is_dsb(method) and config.dsb.index_addressed
        if use_indices:
            loss_fn.update_memory = False  # _train_epoch enqueues with dataset indices
        history: list[dict] = []
        best = {"epoch": 0, "recall_at_1": -math.inf, "metrics": None}
        start = 1
        elapsed = 0.0

        if resume and os.path.isfile(last_path):
            state = _resumable_state(config, method, seed, last_path, key, ctx.world_size, device)
            restore_training_state(_rank_rng(state, ctx), model, loss_fn, optimizers, schedulers, path=last_path)
            generator.set_state(state["sampler"]["generator"])
            _set_sampler_state(loader, state["sampler"])
            history = list(state["history"])
            best = dict(state["best"])
            elapsed = float(state.get("train_seconds", 0.0))
            start = state["epoch"] + 1
            logger.info("%s: resumed from %s after epoch %d", where, last_path, state["epoch"])
        elif resume:
            logger.info("%s: no checkpoint at %s, starting afresh", where, last_path)
        # model stays the plain module: state_dicts, checkpoints and evaluation use it
        train_model = wrap_model(model, ctx)

        if start == 1:
            # the untrained network: a reference for what training adds (never the best epoch)
            history.append({"epoch": 0, **_scalar_metrics(on_main(evaluate_model, model, data, config, device))})
        bar = _tqdm(total=epochs, initial=start - 1, desc=where, disable=not progress or not ctx.is_main,
                    leave=False, unit="epoch", dynamic_ncols=True)
        try:
            for epoch in range(start, epochs + 1):
                t0 = time.perf_counter()
                if ctx.enabled and isinstance(train_sampler(loader), _mper_class()):
                    # MPerClassSampler draws from numpy's global RNG when the epoch starts:
                    # rank 0's state everywhere, so that every rank slices the same batches
                    np.random.set_state(broadcast_object(np.random.get_state()))
                stats = _train_epoch(train_model, loss_fn, loader, list(optimizers.values()), device, use_indices,
                                     f"{where}, epoch {epoch}")
                for sched in schedulers.values():
                    sched.step()
                elapsed += time.perf_counter() - t0  # training only: evaluation costs every method alike
                # rank 0's metrics on every rank: the same best-epoch decision everywhere
                metrics = on_main(evaluate_model, model, data, config, device)
                entry = {"epoch": epoch, **stats, **_scalar_metrics(metrics)}
                history.append(entry)
                if metrics["recall_at_1"] > best["recall_at_1"]:
                    best = {"epoch": epoch, "recall_at_1": metrics["recall_at_1"], "metrics": metrics}
                    on_main(save_checkpoint, _state("best", method, seed, epoch, model, loss_fn, metrics), best_path)
                rng = capture_rng_state(device)
                state = _state("last", method, seed, epoch, model, loss_fn, metrics)
                state.update(
                    optimizers={k: v.state_dict() for k, v in optimizers.items()},
                    schedulers={k: v.state_dict() for k, v in schedulers.items()},
                    rng=all_gather_objects(rng) if ctx.enabled else rng,
                    sampler={"generator": generator.get_state(), **_sampler_state(loader)},
                    history=history, best=best, config=key, finished=epoch == epochs,
                    train_seconds=elapsed,
                )
                on_main(save_checkpoint, state, last_path)
                bar.update(1)
                bar.set_postfix(R1=f"{metrics['recall_at_1']:.3f}", best=f"{best['recall_at_1']:.3f}")
                logger.debug("%s epoch %d: %s", where, epoch, entry)
                if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < epochs:
                    logger.info("%s: stopped after epoch %d (stop_after_epoch); continue with resume", where, epoch)
                    return None
        finally:
            bar.close()

        result = on_main(_final_result, model, data, config, device, method, seed, best, history, elapsed, key,
                         best_path, result_path)
        logger.info("%s: best epoch %d, R@1 %.4f (%.1f s)", where, best["epoch"], best["recall_at_1"], elapsed)
        return result


def run_compatibility_key(config: BenchConfig, method: str) -> dict:
    """:func:`compatibility_key` of one method's runs: what ``last.pt`` and
    ``result.json`` must have been written with to be resumed or reused."""
    key = compatibility_key(config)
    tr = config.training
    if is_dsb(method) and not config.dsb.index_addressed and not config.dsb.memory_size \
            and (tr.drop_last or tr.sampler != "random"):
        # M of this first-in-first-out memory is what one epoch yields (len(train)
        # before commit e8a3404): a run saved with the old M is not resumed
        key["dsb_fifo_memory_size"] = "samples per epoch"
    return key


def check_resumable(config: BenchConfig, method: str, seed: int, out_dir: Union[str, os.PathLike],
                    world_size: int = 1) -> None:
    """Raise the ``CheckpointError`` that :func:`train_one` with ``resume=True``
    would raise for this run, without training: run for every run before a
    resumed benchmark writes anything."""
    method = canonical_method(method)
    run_dir = run_dir_for(out_dir, method, seed)
    key = run_compatibility_key(config, method)
    if _finished_result(os.path.join(run_dir, "result.json"), config.training.epochs, key, method, seed) is not None:
        return
    last_path = os.path.join(run_dir, "last.pt")
    if os.path.isfile(last_path):
        state = _resumable_state(config, method, seed, last_path, key, world_size, "cpu")
        best_epoch = state["best"]["epoch"]
        if best_epoch > 0:  # the run's result is read from it at the end, after the training
            best = load_checkpoint(os.path.join(run_dir, "best.pt"), kind="best", method=method, seed=seed)
            # a best.pt past last.pt's epoch: killed between writing the two; the resume
            # trains that epoch again and rewrites it (checked again at the end)
            if best["epoch"] != best_epoch and best["epoch"] <= state["epoch"]:
                raise CheckpointError(
                    f"{os.path.join(run_dir, 'best.pt')}: of epoch {best['epoch']}, but {last_path} records "
                    f"its best epoch as {best_epoch}; delete the run's folder to train it again"
                )


def _resumable_state(config: BenchConfig, method: str, seed: int, last_path: str, key: dict, world_size: int,
                     map_location) -> dict:
    """``last.pt``, checked for a resume with ``config`` on ``world_size`` processes."""
    epochs = config.training.epochs
    state = load_checkpoint(last_path, kind="last", map_location=map_location, method=method, seed=seed)
    if state["config"] != key:
        raise CheckpointError(
            f"{last_path}: written with other settings than this config's; resume with the "
            f"original config, or start afresh in another --out folder"
        )
    if state["epoch"] > epochs:
        raise CheckpointError(
            f"{last_path}: already at epoch {state['epoch']}, beyond this config's epochs={epochs}"
        )
    planned = {s.get("T_max") for s in state["schedulers"].values()} - {None}
    if planned and planned != {epochs}:
        # a cosine schedule spans the planned epochs: an uninterrupted run over more
        # (or fewer) epochs had other learning rates all along
        raise CheckpointError(
            f"{last_path}: its lr_schedule = {config.training.lr_schedule!r} spans epochs={planned.pop()}, this "
            f"config has epochs={epochs}; resume with the original epochs, or start afresh "
            f"(only a constant schedule can be extended)"
        )
    saved = len(state["rng"]) if isinstance(state["rng"], list) else 1
    if saved != world_size:
        raise CheckpointError(
            f"{last_path}: written by {saved} process(es), but {world_size} run now; resume with "
            f"the same number of processes (torchrun --nproc_per_node={saved}"
            f"{'' if saved > 1 else ', or without torchrun'})"
        )
    return state


#: what the summary of a run folder reads from each run's result.json
_RESULT_KEYS = ("method", "seed", "best_epoch", "metrics", "last_metrics", "init_metrics", "per_class_recall_at_1",
                "train_semantic_scales", "history", "train_seconds")


def _finished_result(result_path: str, epochs: int, key: dict, method: str, seed: int) -> Optional[dict]:
    """``result.json`` of a run finished earlier with these settings, else None."""
    if not os.path.isfile(result_path):
        return None
    try:
        done = read_json(result_path)
    except (OSError, ValueError) as err:  # read_json names the file
        raise CheckpointError(f"{err}; delete it to train this run again") from None
    if not isinstance(done, dict):
        raise CheckpointError(
            f"{result_path}: not a run's result (a JSON {type(done).__name__}); delete it to train this run again"
        )
    if done.get("epochs") != epochs or done.get("compatibility_key") != key:
        return None
    # reused as it is by the summary: what it reads must be there
    missing = [k for k in _RESULT_KEYS if k not in done]
    if missing:
        raise CheckpointError(
            f"{result_path}: lacks {', '.join(missing)}; delete it to train this run again"
        )
    if (done["method"], done["seed"]) != (method, seed):
        raise CheckpointError(
            f"{result_path}: the result of {done['method']} seed {done['seed']}, expected {method} seed {seed}; "
            f"delete it to train this run again"
        )
    return done


def _rank_rng(state: dict, ctx) -> dict:
    """``state`` with this rank's RNG states: ``last.pt`` holds one dict on one
    process, a list with one per rank under torch.distributed (as many as
    ranks: checked by :func:`_resumable_state`)."""
    rng = state["rng"]
    if not isinstance(rng, list):
        return state
    return {**state, "rng": rng[ctx.rank]}


def _final_result(model, data, config, device, method, seed, best, history, elapsed, key, best_path,
                  result_path) -> dict:
    """The run's result from the best checkpoint (train-feature scales), written to ``result.json``."""
    # the best epoch's model gives the features of the semantic scales
    best_state = load_checkpoint(best_path, kind="best", map_location=device, method=method, seed=seed)
    if best_state["epoch"] != best["epoch"]:  # a stale best.pt that the resumed training did not rewrite
        raise CheckpointError(
            f"{best_path}: of epoch {best_state['epoch']}, but the run's best epoch is {best['epoch']}; "
            f"delete the run's folder to train it again"
        )
    model.load_state_dict(best_state["model"])
    features, labels = embed(model, data.train_eval, config.evaluation.batch_size, device)
    train_scales = class_semantic_scales(features, labels, data.num_classes)
    result = {
        "method": method,
        "seed": seed,
        "epochs": config.training.epochs,
        "best_epoch": best["epoch"],
        "metrics": {k: v for k, v in best["metrics"].items() if not k.startswith("per_class_")},
        "last_metrics": {k: v for k, v in history[-1].items() if k.startswith("recall_at_") or k == "NMI"},
        "init_metrics": {k: v for k, v in history[0].items() if k.startswith("recall_at_") or k == "NMI"},
        "per_class_recall_at_1": best["metrics"]["per_class_recall_at_1"],
        "train_semantic_scales": train_scales.tolist(),
        "history": history,
        "train_seconds": elapsed,
        "compatibility_key": key,
    }
    if not config.dataset.closed_set:
        test_features, test_labels = embed(model, data.test, config.evaluation.batch_size, device)
        num_test = int(test_labels.max()) + 1
        result["test_semantic_scales"] = class_semantic_scales(test_features, test_labels, num_test).tolist()
    write_json_atomic(result, result_path)
    return result


def _state(kind, method, seed, epoch, model, loss_fn, metrics) -> dict:
    return {
        "format": FORMAT_TAG,
        "version": FORMAT_VERSION,
        "kind": kind,
        "method": method,
        "seed": seed,
        "epoch": epoch,
        "model": model.state_dict(),
        "loss": loss_fn.state_dict(),
        "metrics": metrics,
    }
