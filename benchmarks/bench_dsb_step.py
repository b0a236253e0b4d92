"""DSB overhead: parent PML loss step against the DSB step, side by side.

For SoftTriple and NormSoftmax at the shapes of issue 2, prints the median and
mean time of the parent loss step (forward + backward) and of the DSB step
(enqueue + scale refresh + weighted loss, forward + backward), measured in
alternation in one process with one thread, and their ratios (the mean is the
amortised cost), with issue 2's target ratio (SoftTriple 1.25x, NormSoftmax 2x)
and the time it leaves the DSB step over the parent step. Each shape runs with
both memories: ``fifo`` (the ring buffer a PML trainer gets unless a
SampleIndicesGetter passes indices) and ``index`` (``sample_indices`` passed:
one slot per training sample, the faithful form, where class counts stay fixed;
on CPU, classes whose matrix has at least 128 rows are then updated in low
rank, and "low-rank" gives the share of touched classes updated so). Then the
DSB step during warm-up (stage 2: the memory only stores the batch) and the
one-time cost of building the statistics at the first weighted iteration. Then
the refresh time at d = 512 for growing memory sizes, the largest relative
error of the memory's scales against a float64 from-scratch computation after
many updates, and the memory's bytes.

    python benchmarks/bench_dsb_step.py            # all shapes (several minutes)
    python benchmarks/bench_dsb_step.py --quick    # small iteration counts
    python benchmarks/bench_dsb_step.py --device cuda --steps-only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from pytorch_metric_learning.losses import NormalizedSoftmaxLoss, SoftTripleLoss

# this checkout's package, not an installed one (an editable install of another clone)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pml_dsb import DSBNormalizedSoftmaxLoss, DSBSoftTripleLoss, SemanticScaleMemory  # noqa: E402
# the memory's module that calls the factorisations (PartTimes times them there)
from pml_dsb.memory import _class_statistics as statistics_module  # noqa: E402

from bench_environment import run_settings  # noqa: E402


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


def imagenet_lt(total: int = 115846, classes: int = 1000, most: int = 1280, fewest: int = 5) -> np.ndarray:
    """ImageNet-LT's training counts in form: ``most`` down to ``fewest`` over
    ``classes`` classes, n_c = most * (fewest/most) ** ((c/(C-1)) ** p), with p
    chosen (by bisection) so that the counts sum to ``total``."""
    position = np.arange(classes) / (classes - 1)

    def counts(p: float) -> np.ndarray:
        return np.round(most * (fewest / most) ** (position**p)).astype(int)

    low, high = 1e-3, 10.0  # a larger p keeps counts high for longer: the sum grows with p
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if counts(mid).sum() < total else (low, mid)
    out = counts(high)
    out[classes // 2] += total - out.sum()  # rounding remainder, if any, on a middle class
    return out


#: issue 2's targets: the DSB step at most this many times the parent loss step
TARGET_RATIO = {"SoftTripleLoss": 1.25, "NormalizedSoftmaxLoss": 2.0}

SHAPES = {
    "cub64": lambda: Shape("cub64", 64, 64, balanced(5864, 100)),
    "cub512": lambda: Shape("cub512", 64, 512, balanced(5864, 100)),
    "cifar100lt512": lambda: Shape("cifar100lt512", 64, 512, cifar_lt(100)),
    "imagenetlt512": lambda: Shape("imagenetlt512", 256, 512, imagenet_lt()),
}


def label_stream(counts: np.ndarray, batch: int, rng: np.random.Generator):
    """Batches of labels from a random sampler (a fresh permutation each epoch)."""
    for _, labels in index_stream(counts, batch, rng):
        yield labels


def index_stream(counts: np.ndarray, batch: int, rng: np.random.Generator):
    """(dataset indices, labels) batches from a random sampler over a dataset
    whose sample i has label ``np.repeat(classes, counts)[i]``."""
    labels = torch.from_numpy(np.repeat(np.arange(len(counts)), counts))
    while True:
        perm = torch.from_numpy(rng.permutation(len(labels)))
        for start in range(0, len(perm) - batch + 1, batch):
            idx = perm[start : start + batch]
            yield idx, labels[idx]


def fill_memory(memory, counts, batch, indexed, rng, gen, device) -> None:
    """Fill every slot without timing (stage 3 from then on): index-addressed,
    one full permutation of the dataset, the last partial batch included."""
    size = int(counts.sum())
    labels = torch.from_numpy(np.repeat(np.arange(len(counts)), counts))
    order = torch.from_numpy(rng.permutation(size))
    for start in range(0, size, batch):
        idx = order[start : start + batch]
        emb = torch.randn(len(idx), memory.embedding_size, generator=gen, device=device)
        memory.enqueue(emb, labels[idx], idx if indexed else None)
    if memory.stage == 3:
        memory.scales()
    assert memory.num_filled == size


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class PartTimes:
    """Accumulates, inside the DSB step, the time of the memory's enqueue, of its
    scale refresh, and of the Cholesky factorisations those run (the part no
    bookkeeping change can remove: each touched class not updated in low rank
    is refactorised)."""

    def __init__(self, memory: SemanticScaleMemory, device: torch.device):
        self.totals = {"enqueue": 0.0, "refresh": 0.0, "factorise": 0.0}
        self._undo = []
        self._wrap(memory, "_enqueue", "enqueue", device)
        self._wrap(memory, "scales", "refresh", device)
        for name in ("logdet_spd", "logdet_and_inverse_spd"):
            self._wrap(statistics_module, name, "factorise", device)

    def _wrap(self, owner, name: str, key: str, device: torch.device) -> None:
        original = getattr(owner, name)

        def timed_call(*args, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            out = original(*args, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.totals[key] += time.perf_counter() - start
            return out

        setattr(owner, name, timed_call)
        self._undo.append((owner, name, original))

    def reset(self) -> None:
        self.totals = dict.fromkeys(self.totals, 0.0)

    def restore(self) -> None:
        for owner, name, original in reversed(self._undo):
            if owner is statistics_module:
                setattr(owner, name, original)
            else:
                delattr(owner, name)  # back to the class's method


def step(loss, emb, labels, **kwargs):
    emb = emb.detach().requires_grad_(True)
    value = loss(emb, labels, **kwargs)
    value.backward()
    return value


def bench_shape(
    shape: Shape,
    iters: int,
    seed: int,
    scale_dtype: torch.dtype = torch.float64,
    addressing: str = "fifo",
    device: torch.device = torch.device("cpu"),
) -> list[dict]:
    rng = np.random.default_rng(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    classes, memory_size = len(shape.counts), int(shape.counts.sum())
    indexed = addressing == "index"
    rows = []
    for parent_cls, dsb_cls in ((SoftTripleLoss, DSBSoftTripleLoss), (NormalizedSoftmaxLoss, DSBNormalizedSoftmaxLoss)):
        parent = parent_cls(num_classes=classes, embedding_size=shape.dim).to(device)
        memory = SemanticScaleMemory(classes, shape.dim, memory_size, warmup_epochs=1, scale_dtype=scale_dtype)
        dsb = dsb_cls(num_classes=classes, embedding_size=shape.dim, memory=memory).to(device)
        dsb.load_state_dict(parent.state_dict(), strict=False)
        fill_memory(dsb.memory, shape.counts, shape.batch, indexed, rng, gen, device)
        stream = index_stream(shape.counts, shape.batch, rng)
        # index-addressed: warm up until the caches are built, and time enough steps
        # that every frequently touched class also does its periodic exact refresh
        warmup, timed_iters = (10, max(iters, 80)) if indexed else (3, iters)
        t_parent, t_dsb, low_rank, touched = [], [], 0, 0
        # on a GPU the part timers' synchronisations would slow the step they time
        parts = PartTimes(dsb.memory, device) if device.type == "cpu" else None
        for i in range(timed_iters + warmup):
            if i == warmup and parts is not None:
                parts.reset()
            idx, labels = next(stream)
            idx, labels = idx.to(device), labels.to(device)
            emb = torch.randn(shape.batch, shape.dim, generator=gen, device=device)
            extra = {"sample_indices": idx} if indexed else {}
            updates = dsb.memory.cache_updates.clone()
            # alternating which step runs first: a step right after the other one
            # finds the caches filled by it (a parent step after a DSB step took
            # ~20% longer at NormSoftmax's shapes)
            if i % 2:
                a = timed(lambda: step(parent, emb, labels), device)
                b = timed(lambda: step(dsb, emb, labels, **extra), device)
            else:
                b = timed(lambda: step(dsb, emb, labels, **extra), device)
                a = timed(lambda: step(parent, emb, labels), device)
            if i >= warmup:  # warm-up iterations left out
                t_parent.append(a)
                t_dsb.append(b)
                low_rank += int((dsb.memory.cache_valid & (dsb.memory.cache_updates == updates + 1)).sum())
                touched += len(torch.unique(labels))
        part_ms = dict.fromkeys(("enqueue", "refresh", "factorise"))
        if parts is not None:
            parts.restore()
            part_ms = {k: 1e3 * v / len(t_dsb) for k, v in parts.totals.items()}  # mean per step
        mp, md = statistics.median(t_parent), statistics.median(t_dsb)
        ap, ad = statistics.fmean(t_parent), statistics.fmean(t_dsb)
        target = TARGET_RATIO[parent_cls.__name__]
        budget_ms = 1e3 * (target - 1.0) * mp  # what the DSB step may add to the parent's
        rows.append(
            {
                "shape": shape.name,
                "addressing": addressing,
                "loss": parent_cls.__name__,
                "device": str(device),
                "scale_dtype": str(scale_dtype).replace("torch.", ""),
                "parent_ms": 1e3 * mp,
                "dsb_ms": 1e3 * md,
                "ratio": md / mp,
                "parent_mean_ms": 1e3 * ap,
                "dsb_mean_ms": 1e3 * ad,
                "mean_ratio": ad / ap,
                "timed_steps": len(t_dsb),
                "low_rank_share": low_rank / touched,
                "memory_bytes": memory_bytes(dsb.memory),
                "mean_enqueue_ms": part_ms["enqueue"],
                "mean_refresh_ms": part_ms["refresh"],
                "mean_factorise_ms": part_ms["factorise"],
                "target_ratio": target,
                "overhead_budget_ms": budget_ms,
            }
        )
        print(
            f"{shape.name:14s} {addressing:5s} {parent_cls.__name__:21s} parent {1e3 * mp:7.2f} ms  "
            f"DSB {1e3 * md:7.2f} ms  ratio {md / mp:5.2f} (mean {ad / ap:5.2f})  "
            f"low-rank {100 * low_rank / touched:3.0f}%  memory {memory_bytes(dsb.memory) / 2**20:7.1f} MiB\n"
            + (f"{'':21s}mean per DSB step: enqueue {part_ms['enqueue']:7.2f} ms, refresh {part_ms['refresh']:7.2f} ms, "
               f"of which factorisations {part_ms['factorise']:7.2f} ms" if parts is not None
               else f"{'':21s}(enqueue/refresh parts timed on the CPU only)")
            + f"; target {target:.2f}x: {budget_ms:.2f} ms over the parent",
            flush=True,
        )
    return rows


def bench_warmup_stage(
    shape: Shape,
    iters: int,
    seed: int,
    device: torch.device = torch.device("cpu"),
    scale_dtype: torch.dtype = torch.float64,
) -> list[dict]:
    """The DSB step during warm-up (stage 2, FIFO, as under a PML trainer by default). The
    memory then only stores the batch; for comparison, a memory whose
    statistics were built before filling (a scales() call on the empty memory)
    keeps them up to date at every enqueue, as all memories did before the
    build was deferred. Also the one-time cost of the build at the first
    weighted iteration."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    classes, memory_size = len(shape.counts), int(shape.counts.sum())
    # enough warm-up epochs that the timed steps all stay in stage 2
    warmup_epochs = 2 + (iters + 3) * shape.batch // memory_size
    rows = []
    for parent_cls, dsb_cls in ((SoftTripleLoss, DSBSoftTripleLoss), (NormalizedSoftmaxLoss, DSBNormalizedSoftmaxLoss)):
        parent = parent_cls(num_classes=classes, embedding_size=shape.dim).to(device)
        losses = {}
        for kind in ("deferred", "eager"):
            memory = SemanticScaleMemory(
                classes, shape.dim, memory_size, warmup_epochs=warmup_epochs, scale_dtype=scale_dtype
            ).to(device)
            if kind == "eager":
                memory.scales()  # statistics built now, then kept at every enqueue
            losses[kind] = dsb_cls(num_classes=classes, embedding_size=shape.dim, memory=memory).to(device)
            losses[kind].load_state_dict(parent.state_dict(), strict=False)
            fill_memory(memory, shape.counts, shape.batch, False, rng, gen, device)
        stream = index_stream(shape.counts, shape.batch, rng)
        times = {"parent": [], "deferred": [], "eager": []}
        for i in range(iters + 3):
            _, labels = next(stream)
            labels = labels.to(device)
            emb = torch.randn(shape.batch, shape.dim, generator=gen, device=device)
            sample = {"parent": timed(lambda: step(parent, emb, labels), device)}
            for kind, loss in losses.items():
                sample[kind] = timed(lambda: step(loss, emb, labels), device)
            if i >= 3:
                for kind, t in sample.items():
                    times[kind].append(t)
        memory = losses["deferred"].memory
        assert memory.stage == 2 and not bool(memory.statistics_built)
        build = timed(memory.scales, device)  # what the first weighted iteration adds, once
        med = {kind: statistics.median(t) for kind, t in times.items()}
        rows.append(
            {
                "shape": shape.name,
                "loss": parent_cls.__name__,
                "device": str(device),
                "scale_dtype": str(scale_dtype).replace("torch.", ""),
                "timed_steps": len(times["parent"]),
                "parent_ms": 1e3 * med["parent"],
                "dsb_stage2_ms": 1e3 * med["deferred"],
                "ratio": med["deferred"] / med["parent"],
                "dsb_stage2_statistics_kept_ms": 1e3 * med["eager"],
                "ratio_statistics_kept": med["eager"] / med["parent"],
                "first_refresh_ms": 1e3 * build,
            }
        )
        print(
            f"{shape.name:14s} stage 2 {parent_cls.__name__:21s} parent {1e3 * med['parent']:7.2f} ms  "
            f"DSB {1e3 * med['deferred']:7.2f} ms  ratio {med['deferred'] / med['parent']:5.2f}  "
            f"(statistics kept: {med['eager'] / med['parent']:5.2f})  "
            f"first refresh {1e3 * build:7.1f} ms once",
            flush=True,
        )
    return rows


def memory_bytes(memory: SemanticScaleMemory) -> int:
    return sum(b.numel() * b.element_size() for b in memory.buffers())


def bench_refresh(
    sizes,
    iters: int,
    seed: int,
    classes: int = 100,
    batch: int = 64,
    dim: int = 512,
    addressing: str = "fifo",
    scale_dtype: torch.dtype = torch.float64,
    device: torch.device = torch.device("cpu"),
) -> list[dict]:
    """enqueue + scales() time at d = 512, equal B and classes, growing M."""
    rows = []
    for memory_size in sizes:
        gen = torch.Generator(device=device).manual_seed(seed)
        rng = np.random.default_rng(seed)
        memory = SemanticScaleMemory(classes, dim, memory_size, warmup_epochs=1, scale_dtype=scale_dtype).to(device)
        counts = balanced(memory_size, classes)
        indexed = addressing == "index"
        labels_all = torch.from_numpy(np.repeat(np.arange(classes), counts))
        fill = torch.from_numpy(rng.permutation(memory_size))
        chunk = 4096  # fill fast with big batches
        for start in range(0, memory_size, chunk):
            idx = fill[start : start + chunk]
            emb = torch.randn(len(idx), dim, generator=gen, device=device)
            memory.enqueue(emb, labels_all[idx].to(device), idx.to(device) if indexed else None)
        memory.scales()
        stream = index_stream(counts, batch, rng)
        times = []
        warmup, timed_iters = (10, max(iters, 80)) if indexed else (3, iters)  # as in bench_shape
        for i in range(timed_iters + warmup):
            emb = torch.randn(batch, dim, generator=gen, device=device)
            idx, labels = (x.to(device) for x in next(stream))
            t = timed(lambda: (memory.enqueue(emb, labels, idx if indexed else None), memory.scales()), device)
            if i >= warmup:
                times.append(t)
        med, mean = statistics.median(times), statistics.fmean(times)
        rows.append(
            {
                "memory_size": memory_size,
                "addressing": addressing,
                "device": str(device),
                "scale_dtype": str(scale_dtype).replace("torch.", ""),
                "timed_steps": len(times),
                "refresh_ms": 1e3 * med,
                "refresh_mean_ms": 1e3 * mean,
                "memory_bytes": memory_bytes(memory),
            }
        )
        print(
            f"refresh d={dim} M={memory_size:7d} {addressing:5s}: {1e3 * med:8.2f} ms median, {1e3 * mean:8.2f} ms mean"
            f"  ({memory_bytes(memory) / 2**20:.0f} MiB)",
            flush=True,
        )
    return rows


def reference_scales(stored: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """S = 0.5*log2 det(I + (d/m) Zc Zc^T) per class from the stored (already
    unit) rows: numpy float64 slogdet, written from DEFINITIONS.md and sharing
    no code with the package's factorisations."""
    z, y = stored.double().numpy(), labels.numpy()
    d = z.shape[1]
    out = np.zeros(classes)
    for c in range(classes):
        zc = z[y == c]
        m = len(zc)
        if m < 2:
            continue
        zc = zc - zc.mean(0)
        gram = zc @ zc.T if m <= d else zc.T @ zc  # same nonzero eigenvalues: the smaller space
        _, logdet = np.linalg.slogdet(np.eye(len(gram)) + (d / m) * gram)
        out[c] = logdet / (2.0 * math.log(2.0))
    return torch.from_numpy(out)


def bench_error(updates: int, seed: int, shape: Shape, addressing: str = "fifo") -> dict:
    """Largest relative error of the memory's scales (float64 and float32
    paths) against a float64 numpy computation over its contents (:func:`reference_scales`), on
    clustered embeddings (class mean + noise, as after training). Index-addressed
    memories at d = 512 take the low-rank path: this measures its drift."""
    classes, memory_size = len(shape.counts), int(shape.counts.sum())
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    centres = torch.randn(classes, shape.dim, generator=gen)
    memories = {
        dtype: SemanticScaleMemory(classes, shape.dim, memory_size, warmup_epochs=1, scale_dtype=dtype)
        for dtype in (torch.float64, torch.float32)
    }
    stream = index_stream(shape.counts, shape.batch, rng)
    worst = {str(dtype).replace("torch.", ""): 0.0 for dtype in memories}
    checks = 10
    for i in range(updates):
        idx, labels = next(stream)
        emb = centres[labels] + 0.5 * torch.randn(len(labels), shape.dim, generator=gen)
        for memory in memories.values():
            memory.enqueue(emb, labels, idx if addressing == "index" else None)
            memory.scales()  # refreshed every iteration, as in training
        if (i + 1) % max(1, updates // checks) == 0:
            for dtype, memory in memories.items():
                stored, lab = memory.contents()
                ref = reference_scales(stored, lab, classes)
                rel = (memory.scales() - ref).abs() / ref.abs().clamp(min=1e-12)
                rel = rel.nan_to_num(nan=math.inf).max().item()  # a NaN is the worst case, not skipped by max()
                key = str(dtype).replace("torch.", "")
                worst[key] = max(worst[key], rel)
    print(
        f"largest relative scale error after {updates} updates ({shape.name}, {addressing}): "
        + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()),
        flush=True,
    )
    return {"updates": updates, "shape": shape.name, "addressing": addressing, **worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few iterations, small refresh sizes")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    parser.add_argument("--iters", type=int, default=None,
                        help="timed iterations per shape (index-addressed rows: at least 80, so that the "
                             "periodic exact refreshes are among them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--scale-dtype", choices=("float64", "float32"), default="float64",
        help="precision of the memory's statistics products and factorisations (default float64)",
    )
    parser.add_argument(
        "--addressing", choices=("fifo", "index", "both"), default="both",
        help="memory form: ring buffer, index-addressed (sample_indices passed), or both (default)",
    )
    parser.add_argument("--device", default="cpu", help="where the losses and memory run (default cpu; the error measurement runs on the CPU)")
    parser.add_argument("--steps-only", action="store_true", help="skip the refresh and error measurements")
    parser.add_argument("--out", default="results/bench_dsb_step.json", help="where to write the figures")
    args = parser.parse_args()
    # one thread everywhere: torch (MKL) and scipy's LAPACK (OpenBLAS) alike
    torch.set_num_threads(1)
    threadpool_limits(1)
    torch.manual_seed(args.seed)
    iters = args.iters or (5 if args.quick else 30)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, iterations {iters} "
          f"(index-addressed: {max(iters, 80)})")
    results = {"settings": run_settings(args), "steps": [], "warmup_stage": [], "refresh": [], "error": []}
    device, scale_dtype = torch.device(args.device), getattr(torch, args.scale_dtype)
    modes = ("fifo", "index") if args.addressing == "both" else (args.addressing,)
    for name in args.shapes.split(","):
        for mode in modes:
            results["steps"] += bench_shape(SHAPES[name](), iters, args.seed, scale_dtype, mode, device)
    for name in args.shapes.split(","):
        results["warmup_stage"] += bench_warmup_stage(SHAPES[name](), iters, args.seed, device, scale_dtype)
    if not args.steps_only:
        sizes = (5864, 20000) if args.quick else (5864, 115846, 437513)
        for mode in modes:
            results["refresh"] += bench_refresh(
                sizes, iters, args.seed, addressing=mode, scale_dtype=scale_dtype, device=device
            )
        results["error"] = [
            bench_error(2000 if args.quick else 20000, args.seed, SHAPES["cub64"]()),
            # the low-rank path: index-addressed, large classes at d = 512
            bench_error(200 if args.quick else 2000, args.seed, SHAPES["cifar100lt512"](), "index"),
        ]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
