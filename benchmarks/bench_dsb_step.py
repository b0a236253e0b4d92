"""DSB overhead: parent PML loss step against the DSB step, side by side.

For SoftTriple and NormSoftmax at the shapes of issue 2, prints the median
time of the parent loss step (forward + backward) and of the DSB step
(enqueue + scale refresh + weighted loss, forward + backward), measured in
alternation in one process with one thread, and their ratio. Then the refresh
time at d = 512 for growing memory sizes, the largest relative error of the
memory's scales against a float64 from-scratch computation after many
updates, and the memory's bytes.

    python benchmarks/bench_dsb_step.py            # all shapes (several minutes)
    python benchmarks/bench_dsb_step.py --quick    # small iteration counts
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from pytorch_metric_learning.losses import NormalizedSoftmaxLoss, SoftTripleLoss

from pml_dsb import DSBNormalizedSoftmaxLoss, DSBSoftTripleLoss, SemanticScaleMemory
from pml_dsb.functional import class_semantic_scales


@dataclass
class Shape:
    name: str
    batch: int
    dim: int
    counts: np.ndarray  # per-class sample counts; memory size = their sum


def balanced(total: int, classes: int) -> np.ndarray:
    counts = np.full(classes, total // classes)
    counts[: total % classes] += 1
    return counts


def cifar_lt(imbalance: float) -> np.ndarray:
    return np.array([int(500 * (1 / imbalance) ** (c / 99)) for c in range(100)])


def imagenet_lt() -> np.ndarray:
    # 1,280 down to 5 over 1,000 classes (Pareto-like), scaled to 115,846 in total
    raw = 1280 * (5 / 1280) ** (np.arange(1000) / 999) ** 0.5
    counts = np.maximum(5, np.round(raw * 115846 / raw.sum())).astype(int)
    counts[0] += 115846 - counts.sum()
    return counts


SHAPES = {
    "cub64": lambda: Shape("cub64", 64, 64, balanced(5864, 100)),
    "cub512": lambda: Shape("cub512", 64, 512, balanced(5864, 100)),
    "cifar100lt512": lambda: Shape("cifar100lt512", 64, 512, cifar_lt(100)),
    "imagenetlt512": lambda: Shape("imagenetlt512", 256, 512, imagenet_lt()),
}


def label_stream(counts: np.ndarray, batch: int, rng: np.random.Generator):
    """Batches of labels from a random sampler (a fresh permutation each epoch)."""
    labels = np.repeat(np.arange(len(counts)), counts)
    while True:
        perm = rng.permutation(labels)
        for start in range(0, len(perm) - batch + 1, batch):
            yield torch.from_numpy(perm[start : start + batch])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step(loss, emb, labels):
    emb = emb.detach().requires_grad_(True)
    value = loss(emb, labels)
    value.backward()
    return value


def bench_shape(shape: Shape, iters: int, seed: int, scale_dtype: torch.dtype = torch.float64) -> list[dict]:
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    classes, memory_size = len(shape.counts), int(shape.counts.sum())
    rows = []
    for parent_cls, dsb_cls in ((SoftTripleLoss, DSBSoftTripleLoss), (NormalizedSoftmaxLoss, DSBNormalizedSoftmaxLoss)):
        parent = parent_cls(num_classes=classes, embedding_size=shape.dim)
        memory = SemanticScaleMemory(classes, shape.dim, memory_size, warmup_epochs=1, scale_dtype=scale_dtype)
        dsb = dsb_cls(num_classes=classes, embedding_size=shape.dim, memory=memory)
        dsb.load_state_dict(parent.state_dict(), strict=False)
        stream = label_stream(shape.counts, shape.batch, rng)
        # fill the memory (stage 3 from then on) without timing
        for _ in range(math.ceil(memory_size / shape.batch)):
            dsb.memory.enqueue(torch.randn(shape.batch, shape.dim, generator=gen), next(stream))
        dsb.memory.scales()
        assert dsb.memory.stage == 3
        t_parent, t_dsb = [], []
        for i in range(iters + 3):
            labels = next(stream)
            emb = torch.randn(shape.batch, shape.dim, generator=gen)
            a = timed(lambda: step(parent, emb, labels))
            b = timed(lambda: step(dsb, emb, labels))
            if i >= 3:  # warm-up iterations left out
                t_parent.append(a)
                t_dsb.append(b)
        mp, md = statistics.median(t_parent), statistics.median(t_dsb)
        rows.append(
            {
                "shape": shape.name,
                "loss": parent_cls.__name__,
                "scale_dtype": str(scale_dtype).replace("torch.", ""),
                "parent_ms": 1e3 * mp,
                "dsb_ms": 1e3 * md,
                "ratio": md / mp,
                "memory_bytes": memory_bytes(dsb.memory),
            }
        )
        print(
            f"{shape.name:15s} {parent_cls.__name__:22s} parent {1e3 * mp:8.2f} ms   "
            f"DSB {1e3 * md:8.2f} ms   ratio {md / mp:5.2f}   memory {memory_bytes(dsb.memory) / 2**20:8.1f} MiB",
            flush=True,
        )
    return rows


def memory_bytes(memory: SemanticScaleMemory) -> int:
    return sum(b.numel() * b.element_size() for b in memory.buffers())


def bench_refresh(sizes, iters: int, seed: int, classes: int = 100, batch: int = 64, dim: int = 512) -> list[dict]:
    """enqueue + scales() time at d = 512, equal B and classes, growing M."""
    rows = []
    for memory_size in sizes:
        gen = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        memory = SemanticScaleMemory(classes, dim, memory_size, warmup_epochs=1)
        stream = label_stream(balanced(memory_size, classes), batch, rng)
        chunk = 4096  # fill fast with big batches
        labels_all = torch.from_numpy(rng.permutation(np.repeat(np.arange(classes), balanced(memory_size, classes))))
        for start in range(0, memory_size, chunk):
            lab = labels_all[start : start + chunk]
            memory.enqueue(torch.randn(len(lab), dim, generator=gen), lab)
        memory.scales()
        times = []
        for i in range(iters + 2):
            emb = torch.randn(batch, dim, generator=gen)
            labels = next(stream)
            t = timed(lambda: (memory.enqueue(emb, labels), memory.scales()))
            if i >= 2:
                times.append(t)
        med = statistics.median(times)
        rows.append({"memory_size": memory_size, "refresh_ms": 1e3 * med, "memory_bytes": memory_bytes(memory)})
        print(f"refresh d={dim} M={memory_size:7d}: {1e3 * med:8.2f} ms  ({memory_bytes(memory) / 2**20:.0f} MiB)", flush=True)
    return rows


def bench_error(updates: int, seed: int, shape: Shape) -> dict:
    """Largest relative error of the memory's scales (float64 and float32
    paths) against a float64 from-scratch computation over its contents, on
    clustered embeddings (class mean + noise, as after training)."""
    classes, memory_size = len(shape.counts), int(shape.counts.sum())
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    centres = torch.randn(classes, shape.dim, generator=gen)
    memories = {
        dtype: SemanticScaleMemory(classes, shape.dim, memory_size, warmup_epochs=1, scale_dtype=dtype)
        for dtype in (torch.float64, torch.float32)
    }
    stream = label_stream(shape.counts, shape.batch, rng)
    worst = {str(dtype).replace("torch.", ""): 0.0 for dtype in memories}
    checks = 10
    for i in range(updates):
        labels = next(stream)
        emb = centres[labels] + 0.5 * torch.randn(len(labels), shape.dim, generator=gen)
        for memory in memories.values():
            memory.enqueue(emb, labels)
            memory.scales()  # refreshed every iteration, as in training
        if (i + 1) % max(1, updates // checks) == 0:
            for dtype, memory in memories.items():
                stored, lab = memory.contents()
                ref = class_semantic_scales(stored.double(), lab, classes, normalize=False)
                rel = ((memory.scales() - ref).abs() / ref.abs().clamp(min=1e-12)).max().item()
                key = str(dtype).replace("torch.", "")
                worst[key] = max(worst[key], rel)
    print(
        f"largest relative scale error after {updates} updates ({shape.name}): "
        + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()),
        flush=True,
    )
    return {"updates": updates, "shape": shape.name, **worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few iterations, small refresh sizes")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per shape")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--scale-dtype", choices=("float64", "float32"), default="float64",
        help="precision of the memory's statistics products and factorisations (default float64)",
    )
    parser.add_argument("--steps-only", action="store_true", help="skip the refresh and error measurements")
    parser.add_argument("--out", default="results/bench_dsb_step.json", help="where to write the figures")
    args = parser.parse_args()
    # one thread everywhere: torch (MKL) and scipy's LAPACK (OpenBLAS) alike
    torch.set_num_threads(1)
    threadpool_limits(1)
    torch.manual_seed(args.seed)
    iters = args.iters or (5 if args.quick else 30)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, iterations {iters}")
    results = {"steps": [], "refresh": [], "error": None}
    for name in args.shapes.split(","):
        results["steps"] += bench_shape(SHAPES[name](), iters, args.seed, getattr(torch, args.scale_dtype))
    if not args.steps_only:
        sizes = (5864, 20000) if args.quick else (5864, 115846, 437513)
        results["refresh"] = bench_refresh(sizes, iters, args.seed)
        results["error"] = bench_error(2000 if args.quick else 20000, args.seed, SHAPES["cub64"]())
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
