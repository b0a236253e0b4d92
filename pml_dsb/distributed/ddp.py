r"""Helpers for training under ``torchrun`` with ``DistributedDataParallel``.

A training loop (the benchmark runner's, or yours) needs little more than::

    ctx = init_from_env()                       # reads torchrun's variables
    sampler = distributed_sampler(train_set, seed=seed)   # None on one process
    model = wrap_model(model.to(ctx.device), ctx)
    loss = DSBSoftTripleLoss(..., memory_size=len(train_set)).to(ctx.device)
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for x, y in loader:                     # every rank, every iteration
            l = loss(model(x), y)               # the memory gathers all ranks' batches
            l.backward()
            average_gradients(loss.parameters())  # the loss's own parameters
            optimizer.step(); optimizer.zero_grad()
    if ctx.is_main:
        ...                                     # evaluate / write results once
    destroy()

``DistributedDataParallel`` averages the gradients of the model it wraps; a
DSB loss's own parameters (SoftTriple centres, NormSoftmax class weights) are
outside it, so average them with :func:`average_gradients` after
``backward()`` (or put model and loss in one module and wrap that). With equal
per-rank batches both give the gradient of the global batch's mean loss, as
one process would.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import torch
import torch.distributed as dist

from .gather import is_distributed

__all__ = [
    "free_port",
    "local_rank_env",
    "DistributedContext",
    "init_from_env",
    "current_context",
    "destroy",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "distributed_sampler",
    "ShardedBatchSampler",
    "any_rank",
    "all_gather_objects",
    "wrap_model",
    "average_gradients",
    "broadcast_object",
    "barrier",
]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: evaluates and writes results."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a local process group's MASTER_PORT."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_rank_env(rank: int, world_size: int, port: int) -> dict:
    """The environment of rank ``rank`` of a one-machine CPU world (what torchrun
    would set), one thread per process, CUDA hidden; for tests and benchmarks."""
    return dict(
        os.environ,
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )


def _default_device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def init_from_env(
    backend: Optional[str] = None,
    timeout: datetime.timedelta = datetime.timedelta(minutes=30),
    env: Optional[Mapping[str, str]] = None,
) -> DistributedContext:
    """Initialise the default process group from ``torchrun``'s environment.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` (from ``env``, default ``os.environ``). Without
    ``WORLD_SIZE`` or with ``WORLD_SIZE=1`` nothing is initialised and a
    one-process context is returned, so the same script runs with or without
    ``torchrun``. ``backend`` defaults to ``"nccl"`` when CUDA is available,
    else ``"gloo"``; with CUDA the process's device is ``cuda:LOCAL_RANK``.
    ``timeout`` bounds every collective call (a rank that stops calling
    collectives makes the others fail after it instead of hanging forever).
    An already initialised process group is reused.

    >>> ctx = init_from_env(env={})      # no torchrun: one process, nothing initialised
    >>> ctx.rank, ctx.world_size, ctx.is_main, ctx.enabled
    (0, 1, True, False)
    """
    env = os.environ if env is None else env
    if is_distributed():
        return current_context()
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        local = int(env.get("LOCAL_RANK", "0"))
        return DistributedContext(0, 1, local, _default_device(local))
    missing = [name for name in _TORCHRUN_VARS if name not in env]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world} but {missing} are not set: start the script with "
            "torchrun --nproc_per_node=N, or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        )
    rank = int(env["RANK"])
    local = int(env.get("LOCAL_RANK", rank))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
        rank=rank,
        world_size=world,
        timeout=timeout,
    )
    return DistributedContext(rank, world, local, _default_device(local))


def current_context() -> DistributedContext:
    """The context of the process group already initialised (or of one process), initialising nothing."""
    rank, world = get_rank(), get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank if world > 1 else 0))
    return DistributedContext(rank, world, local, _default_device(local))


def destroy() -> None:
    """Destroy the default process group if one is initialised."""
    if is_distributed():
        dist.destroy_process_group()


def get_rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """The number of processes, 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and without a process group)."""
    return get_rank() == 0


def distributed_sampler(dataset, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
    """A ``DistributedSampler`` over ``dataset`` when more than one process runs, else ``None``.

    Every rank gets the same number of batches (the contract of the gathering
    memory). With ``drop_last=False`` the sampler repeats a few samples to
    even the shards out; an index-addressed memory keeps such a sample once
    (:func:`~pml_dsb.distributed.gather.gather_batch`), a first-in-first-out
    memory enqueues it twice. Call ``sampler.set_epoch(epoch)`` every epoch.

    >>> distributed_sampler(list(range(10))) is None   # one process
    True
    """
    if get_world_size() <= 1:
        return None
    from torch.utils.data.distributed import DistributedSampler

    return DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)


class ShardedBatchSampler:
    """Each rank's slice of every batch of a one-process batch sampler.

    Every rank builds the *same* batch sampler (same seed: a shuffled
    ``BatchSampler``, or PML's ``MPerClassSampler`` wrapped in one) and takes
    its contiguous slice of each global batch, ranks in order, sizes differing
    by at most one. The memory concatenates the slices in rank order, so the
    global batch a gathering memory enqueues is exactly the batch one process
    would have drawn: a distributed run walks the one-process run's sample
    order, and a checkpoint's sampler state is the same on every rank. A
    global batch with fewer samples than ranks is skipped on every rank.
    Use it as ``DataLoader(dataset, batch_sampler=ShardedBatchSampler(...))``.

    >>> from torch.utils.data import BatchSampler, SequentialSampler
    >>> batches = BatchSampler(SequentialSampler(range(7)), batch_size=5, drop_last=False)
    >>> [list(ShardedBatchSampler(batches, rank=r, world_size=2)) for r in (0, 1)]
    [[[0, 1, 2], [5]], [[3, 4], [6]]]
    """

    def __init__(self, batch_sampler, rank: Optional[int] = None, world_size: Optional[int] = None):
        self.batch_sampler = batch_sampler
        self.rank = get_rank() if rank is None else int(rank)
        self.world_size = get_world_size() if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must lie in [0, world_size={self.world_size}), got {self.rank}")

    def __iter__(self):
        world, rank = self.world_size, self.rank
        for batch in self.batch_sampler:
            batch = list(batch)
            if len(batch) < world:
                continue
            base, extra = divmod(len(batch), world)
            start = rank * base + min(rank, extra)
            yield batch[start : start + base + (rank < extra)]

    def __len__(self) -> int:
        return len(self.batch_sampler)  # an upper bound when a last batch is skipped


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank if ``flag`` is true on any (collective; ``flag`` on one process).

    For decisions that must agree, e.g. stopping when the loss is not finite
    on some rank: raising on that rank alone leaves the others blocked in the
    next collective (DDP's gradient all-reduce).
    """
    if get_world_size() <= 1:
        return bool(flag)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


def all_gather_objects(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` on one process).

    E.g. every rank's RNG state for a checkpoint written by rank 0 alone.
    """
    if get_world_size() <= 1:
        return [obj]
    out: list = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_model(module: torch.nn.Module, ctx: Optional[DistributedContext] = None, **ddp_kwargs: Any) -> torch.nn.Module:
    """``DistributedDataParallel(module)`` when more than one process runs, else ``module``.

    ``module`` must already be on ``ctx.device``; with CUDA the DDP model is
    pinned to it (``device_ids=[local_rank]``).
    """
    ctx = ctx if ctx is not None else current_context()
    if not ctx.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    if ctx.device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [ctx.device.index])
    return DistributedDataParallel(module, **ddp_kwargs)


@torch.no_grad()
def average_gradients(parameters: Iterable[torch.nn.Parameter], group=None) -> None:
    """Average ``.grad`` over the ranks, in place (a no-op on one process).

    Collective: every rank must call it with the same parameters in the same
    order. A parameter without a gradient counts as a zero gradient (and gets
    one), so ranks never disagree on what is reduced.
    """
    if not is_distributed():
        return
    world = dist.get_world_size(group)
    if world <= 1:
        return
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    flat /= world
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (the object itself on one process)."""
    if get_world_size() <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (a no-op on one process)."""
    if get_world_size() > 1:
        dist.barrier()
