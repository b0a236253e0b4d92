"""Distributed DSB step on CPU: 2 gloo processes against 1 process, same global batch.

Each iteration is a DSB-SoftTriple step (forward + backward, the memory's
enqueue and scale refresh included) on random data. One process takes the
global batch of B samples; with ``--world 2`` each rank takes B/2 and the
memory gathers the global batch (collective validation + one all_gather) so
both ranks enqueue the same B samples. The script prints the wall time of the
timed iterations for both, their ratio (2 processes / 1 process), and the
per-iteration cost of the collectives alone (validation exchange + gather of
a B/2 batch per rank), measured in the 2-process run. Every process uses one
thread (``torch.set_num_threads(1)``).

    OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py                 # defaults below
    OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py --iters 300 --batch 64 --dim 64

On a 2-core machine the two ranks share the cores with everything else that
runs, so compare figures measured side by side in one invocation.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch

# this checkout's package, not an installed one (an editable install of another clone)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_environment import run_settings  # noqa: E402


def _data(args, step: int, rank: int, world: int):
    g = torch.Generator().manual_seed(args.seed * 100003 + step)
    emb = torch.randn(args.batch, args.dim, generator=g)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g)
    part = args.batch // world
    lo = rank * part
    hi = args.batch if rank == world - 1 else lo + part
    return emb[lo:hi], labels[lo:hi]


def _loss(args):
    from pml_dsb import DSBSoftTripleLoss

    torch.manual_seed(args.seed)
    # warm-up 0: weighted (stage 3) as soon as the memory is full (filled below), the costlier path
    return DSBSoftTripleLoss(args.classes, args.dim, memory_size=args.memory, warmup_epochs=0)


def _timed_loop(args, rank: int, world: int) -> dict:
    import torch.distributed as dist

    loss = _loss(args)
    # fill the memory once so every timed step replaces samples (steady state)
    filler = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for size in _fill_sizes(args.memory, args.batch, args.world):
            emb = torch.randn(size, args.dim, generator=filler)
            labels = torch.randint(0, args.classes, (size,), generator=filler)
            _enqueue_share(loss.memory, emb, labels, rank, world)
    loss.memory.scales()
    batches = [_data(args, step, rank, world) for step in range(args.warmup + args.iters)]

    def step(emb, labels):
        emb = emb.clone().requires_grad_(True)
        loss(emb, labels).backward()

    for emb, labels in batches[: args.warmup]:
        step(emb, labels)
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    for emb, labels in batches[args.warmup :]:
        step(emb, labels)
    wall = time.perf_counter() - t0
    out = {"wall_s": wall, "enqueued": loss.memory.num_enqueued, "stage": loss.memory.stage}
    if world > 1:
        # the collectives alone: the loss's validation exchange + the memory's gather
        from pml_dsb.distributed import check_batch_collectively, gather_batch

        dist.barrier()
        t0 = time.perf_counter()
        for emb, labels in batches[args.warmup :]:
            check_batch_collectively(None, emb, labels)
            gather_batch(emb, labels)
        out["collectives_s"] = time.perf_counter() - t0
        walls = [None] * world
        dist.all_gather_object(walls, out)
        out = {
            "wall_s": max(w["wall_s"] for w in walls),
            "collectives_s": max(w["collectives_s"] for w in walls),
            "enqueued": walls[0]["enqueued"],
            "stage": walls[0]["stage"],
        }
    return out


def _fill_sizes(memory: int, batch: int, world: int) -> list[int]:
    """Global batches that fill the memory exactly, the same for one process
    and for ``world`` (each rank needs a row of each): a last batch smaller
    than ``world`` joins the one before (it was skipped by the distributed run
    only, and the two runs' memories differed).

    >>> _fill_sizes(129, 64, 2), _fill_sizes(130, 64, 2)
    ([64, 65], [64, 64, 2])
    """
    sizes, rest = [batch] * (memory // batch), memory % batch
    if rest and sizes and rest < world:
        sizes[-1] += rest
    elif rest:
        sizes.append(rest)
    return sizes


def _enqueue_share(memory, emb, labels, rank, world):
    part = len(emb) // world
    lo = rank * part
    hi = len(emb) if rank == world - 1 else lo + part
    memory.enqueue(emb[lo:hi], labels[lo:hi])


def _worker(args) -> None:
    from pml_dsb.distributed import destroy, init_from_env

    torch.set_num_threads(1)
    ctx = init_from_env(backend="gloo", timeout=datetime.timedelta(seconds=120))
    result = _timed_loop(args, ctx.rank, ctx.world_size)
    if ctx.is_main:
        print("RESULT " + json.dumps(result), flush=True)
    destroy()


def _run_world(args, world: int) -> dict:
    from pml_dsb.distributed import free_port, local_rank_env

    port = free_port()
    argv = [sys.executable, os.path.abspath(__file__), "--worker"] + _forward(args)
    procs = []
    for rank in range(world):
        env = local_rank_env(rank, world, port)
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=args.timeout)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("a rank failed:\n" + "\n".join(outputs))
    line = next(x for x in outputs[0].splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _forward(args) -> list[str]:
    return [
        f"--iters={args.iters}", f"--warmup={args.warmup}", f"--batch={args.batch}", f"--dim={args.dim}",
        f"--classes={args.classes}", f"--memory={args.memory}", f"--seed={args.seed}",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=300, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=20, help="untimed iterations first")
    parser.add_argument("--batch", type=int, default=64, help="global batch size B")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--memory", type=int, default=5864, help="memory size M (CUB's training set)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world", type=int, default=2, help="processes of the distributed run")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before the run is abandoned")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if args.world < 2:  # the comparison is against one process
        parser.error(f"--world must be at least 2, got {args.world}")
    if args.batch < args.world or args.memory < args.batch:  # each rank needs a row of every batch
        parser.error(f"need --world <= --batch <= --memory, got {args.world}, {args.batch}, {args.memory}")

    torch.set_num_threads(1)
    single = _timed_loop(args, 0, 1)
    multi = _run_world(args, args.world)
    assert single["enqueued"] == multi["enqueued"], (single, multi)
    figures = {
        "shape": {"B": args.batch, "d": args.dim, "C": args.classes, "M": args.memory, "iters": args.iters},
        "one_process_s": single["wall_s"],
        f"{args.world}_processes_s": multi["wall_s"],
        "ratio": multi["wall_s"] / single["wall_s"],
        "one_process_ms_per_iter": 1e3 * single["wall_s"] / args.iters,
        f"{args.world}_processes_ms_per_iter": 1e3 * multi["wall_s"] / args.iters,
        "collectives_ms_per_iter": 1e3 * multi["collectives_s"] / args.iters,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    print(f"DSB-SoftTriple step, B={args.batch} (global) d={args.dim} C={args.classes} M={args.memory}, "
          f"{args.iters} timed iterations, 1 thread per process")
    print(f"  1 process            : {figures['one_process_s']:.3f} s  "
          f"({figures['one_process_ms_per_iter']:.2f} ms/iter)")
    print(f"  {args.world} processes (gloo)  : {multi['wall_s']:.3f} s  "
          f"({figures[f'{args.world}_processes_ms_per_iter']:.2f} ms/iter)")
    print(f"  ratio {args.world}p / 1p       : {figures['ratio']:.2f}")
    print(f"  collectives alone    : {figures['collectives_ms_per_iter']:.2f} ms/iter "
          "(validation exchange + gather, per rank)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({**figures, "settings": run_settings(args)}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
