"""Training-iteration cost of SoftTriple against DSB-ST (the paper's Table 10 in form).

For each shape, times full training iterations of a torchvision ResNet
(random init, fc replaced by Linear(features, d)) on synthetic images:
model forward + loss + backward + optimizer step, with the loss's parameters
(SoftTriple centres) in the optimizer too, for

  (a) PML's ``SoftTripleLoss`` and
  (b) ``DSBSoftTripleLoss`` with an index-addressed ``SemanticScaleMemory``
      (``sample_indices`` passed; memory pre-filled so it is in stage 3: the
      scales are refreshed and the loss weighted at every iteration).

Both variants start from the same weights and see the same batches (labels
and dataset indices from a random sampler: a fresh permutation of the
dataset's indices each epoch). After each variant's own warm-up phase (where
its peak GPU memory is measured, alone, so the two peaks do not mix), their
iterations are timed in alternation (A B, B A, A B, ...), so that drift and
noise hit both equally. Reported: median and mean iterations per second of
each, their ratio (also the median of the per-pair time ratios), the peak
memory allocated by each (on CUDA; above what was allocated before that
variant was built: model, optimizer state, activations, loss, DSB memory),
and the DSB memory's own buffer bytes. Data loading is not timed: one
synthetic image batch is made up front and reused.

SoftTriple settings of the paper: la=20, gamma=0.1, margin=0.01,
centers_per_class=10. Optimizer: Adam, lr 1e-4 (model) and 1e-2 (loss).

    python benchmarks/bench_train_step.py                 # cub + imagenetlt, ResNet-50, 224 px
    python benchmarks/bench_train_step.py --amp bf16      # model forward under bf16 autocast
    python benchmarks/bench_train_step.py --quick --device cpu   # smoke run: ResNet-18, 32 px, d=64
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torchvision
from pytorch_metric_learning.losses import SoftTripleLoss

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # bench_dsb_step's class counts and sampler
sys.path.insert(1, os.path.dirname(_HERE))  # the repo itself, when not installed

from bench_dsb_step import balanced, imagenet_lt, index_stream  # noqa: E402
from bench_environment import run_settings  # noqa: E402

from pml_dsb import DSBSoftTripleLoss, SemanticScaleMemory  # noqa: E402

SOFTTRIPLE = dict(la=20, gamma=0.1, margin=0.01, centers_per_class=10)


@dataclass
class Shape:
    name: str
    batch: int
    dim: int
    counts: np.ndarray  # per-class sample counts; dataset size M = their sum


SHAPES = {
    "cub": lambda: Shape("cub", 64, 512, balanced(5864, 100)),
    "imagenetlt": lambda: Shape("imagenetlt", 256, 512, imagenet_lt()),
}


def make_model(arch: str, dim: int) -> torch.nn.Module:
    model = getattr(torchvision.models, arch)(weights=None)  # random init, nothing downloaded
    model.fc = torch.nn.Linear(model.fc.in_features, dim)
    return model


def buffer_bytes(module: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class Variant:
    """One training setup: its own model copy, loss and Adam optimizer."""

    def __init__(self, name, model, loss, device, amp_dtype, pass_indices):
        self.name = name
        self.model = model.to(device).train()
        self.loss = loss.to(device)
        self.device = device
        self.amp_dtype = amp_dtype
        self.pass_indices = pass_indices
        self.opt = torch.optim.Adam(
            [
                {"params": self.model.parameters(), "lr": 1e-4},
                {"params": self.loss.parameters(), "lr": 1e-2},
            ]
        )

    def step(self, images, idx, labels) -> torch.Tensor:
        labels = labels.to(self.device, non_blocking=True)
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            emb = self.model(images)
        emb = emb.float()  # the loss (and the DSB memory) in float32, outside autocast
        if self.pass_indices:
            value = self.loss(emb, labels, sample_indices=idx.to(self.device, non_blocking=True))
        else:
            value = self.loss(emb, labels)
        value.backward()
        self.opt.step()
        return value


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(variant: Variant, batch, images) -> float:
    sync(variant.device)
    start = time.perf_counter()
    variant.step(images, *batch)
    sync(variant.device)
    return time.perf_counter() - start


def solo_phase(variant: Variant, stream, images, warmup: int, mem_iters: int, baseline: int) -> dict:
    """Warm-up iterations of one variant alone, then its peak memory over
    ``mem_iters`` more (CUDA only), above ``baseline`` (allocated before it was built)."""
    dev = variant.device
    for _ in range(warmup):
        variant.step(images, *next(stream))
    if dev.type != "cuda":
        for _ in range(mem_iters):
            variant.step(images, *next(stream))
        return {"peak_bytes": None, "resident_bytes": None}
    sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(mem_iters):
        variant.step(images, *next(stream))
    sync(dev)
    return {
        "peak_bytes": torch.cuda.max_memory_allocated(dev) - baseline,
        "resident_bytes": torch.cuda.memory_allocated(dev) - baseline,
    }


def allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def bench_shape(shape: Shape, args, device) -> dict:
    classes, size = len(shape.counts), int(shape.counts.sum())
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    amp_dtype = torch.bfloat16 if args.amp == "bf16" else None
    stream = index_stream(shape.counts, shape.batch, rng)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    images = torch.randn(shape.batch, 3, args.image_size, args.image_size, device=device, generator=gen)

    base_model = make_model(args.arch, shape.dim)
    parent_loss = SoftTripleLoss(num_classes=classes, embedding_size=shape.dim, **SOFTTRIPLE)
    initial_centres = copy.deepcopy(parent_loss.state_dict())
    head = (
        f"{shape.name}: C={classes} M={size} B={shape.batch} d={shape.dim} {args.arch} "
        f"{args.image_size}px amp={args.amp}"
    )
    print(head, flush=True)

    # (a) SoftTriple alone: build, warm up, peak memory
    base = allocated(device)
    parent = Variant("SoftTriple", copy.deepcopy(base_model), parent_loss, device, amp_dtype, pass_indices=False)
    mem_parent = solo_phase(parent, stream, images, args.warmup, args.mem_iters, base)

    # (b) DSB-ST alone: build, pre-fill the memory (untimed), warm up, peak memory
    base = allocated(device)
    memory = SemanticScaleMemory(classes, shape.dim, size, warmup_epochs=1)
    dsb_loss = DSBSoftTripleLoss(num_classes=classes, embedding_size=shape.dim, memory=memory, **SOFTTRIPLE)
    dsb_loss.load_state_dict(initial_centres, strict=False)  # same initial centres
    dsb = Variant("DSB-ST", copy.deepcopy(base_model), dsb_loss, device, amp_dtype, pass_indices=True)
    fill_start = time.perf_counter()
    fill_gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    label_of = torch.from_numpy(np.repeat(np.arange(classes), shape.counts))
    order = torch.from_numpy(rng.permutation(size))
    chunk = 4 * shape.batch
    with torch.no_grad():
        for start in range(0, size, chunk):
            idx = order[start : start + chunk]
            dsb_loss.memory.enqueue(
                torch.randn(len(idx), shape.dim, device=device, generator=fill_gen),
                label_of[idx].to(device),
                idx.to(device),
            )
        dsb_loss.memory.scales()
    sync(device)
    fill_s = time.perf_counter() - fill_start
    assert dsb_loss.memory.stage == 3, dsb_loss.memory.stage
    mem_dsb = solo_phase(dsb, stream, images, args.warmup, args.mem_iters, base)

    # both, timed in alternation on the same batches
    t_parent, t_dsb = [], []
    for i in range(args.iters):
        batch = next(stream)
        pair = (parent, dsb) if i % 2 == 0 else (dsb, parent)
        times = {v.name: timed_step(v, batch, images) for v in pair}
        t_parent.append(times["SoftTriple"])
        t_dsb.append(times["DSB-ST"])
    assert dsb_loss.memory.stage == 3
    dsb_buffers = buffer_bytes(dsb_loss.memory)  # after the run: some caches grow as they are used

    def summary(times):
        med = statistics.median(times)
        return {"median_s": med, "median_it_s": 1 / med, "mean_it_s": len(times) / sum(times)}

    sp, sd = summary(t_parent), summary(t_dsb)
    row = {
        "shape": shape.name,
        "classes": classes,
        "memory_size": size,
        "batch": shape.batch,
        "dim": shape.dim,
        "arch": args.arch,
        "image_size": args.image_size,
        "amp": args.amp,
        "iters": args.iters,
        "softtriple": {**sp, **mem_parent},
        "dsb_st": {**sd, **mem_dsb},
        "it_s_ratio_dsb_over_softtriple": sd["median_it_s"] / sp["median_it_s"],
        "mean_it_s_ratio_dsb_over_softtriple": sd["mean_it_s"] / sp["mean_it_s"],
        "median_pair_time_ratio_dsb_over_softtriple": statistics.median(b / a for a, b in zip(t_parent, t_dsb)),
        "dsb_memory_buffer_bytes": dsb_buffers,
        "softtriple_param_bytes": param_bytes(parent_loss),
        "model_param_bytes": param_bytes(parent.model),
        "input_bytes": images.numel() * images.element_size(),
        "memory_fill_s": fill_s,
    }

    def mib(x):
        return "   n/a   " if x is None else f"{x / 2**20:7.0f} MiB"

    for label, s, m in (("SoftTriple", sp, mem_parent), ("DSB-ST", sd, mem_dsb)):
        print(
            f"  {label:10s} {s['median_it_s']:7.2f} it/s median  {s['mean_it_s']:7.2f} it/s mean  "
            f"({1e3 * s['median_s']:8.1f} ms)  peak {mib(m['peak_bytes'])}",
            flush=True,
        )
    print(
        f"  DSB/SoftTriple it/s ratio {row['it_s_ratio_dsb_over_softtriple']:.3f} (median), "
        f"{row['mean_it_s_ratio_dsb_over_softtriple']:.3f} (mean); per-pair time ratio "
        f"{row['median_pair_time_ratio_dsb_over_softtriple']:.3f}; DSB memory buffers {mib(dsb_buffers).strip()}; "
        f"memory fill {fill_s:.1f} s",
        flush=True,
    )
    del parent, dsb, images
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per variant (default 30; quick 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up iterations per variant (default 5; quick 1)")
    parser.add_argument("--mem-iters", type=int, default=2, help="iterations per variant over which its peak memory is taken")
    parser.add_argument("--arch", default=None, help="torchvision ResNet (default resnet50; quick resnet18)")
    parser.add_argument("--image-size", type=int, default=None, help="default 224; quick 32")
    parser.add_argument("--dim", type=int, default=None, help="embedding size for every shape (default: the shape's, 512; quick 64)")
    parser.add_argument("--batch", type=int, default=None, help="batch size for every shape (default: the shape's; quick 32)")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none", help="model forward under torch.autocast")
    parser.add_argument("--no-cudnn-benchmark", action="store_true", help="leave torch.backends.cudnn.benchmark off")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: resnet18, 32 px, d=64, B=32, few iterations")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU, torch's own on CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench_train_step.json", help="where to write the figures")
    args = parser.parse_args()
    q = args.quick
    args.iters = args.iters or (4 if q else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 5)
    args.arch = args.arch or ("resnet18" if q else "resnet50")
    args.image_size = args.image_size or (32 if q else 224)
    args.dim = args.dim or (64 if q else None)
    args.batch = args.batch or (32 if q else None)
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, device {name}, threads "
        f"{torch.get_num_threads()}, iterations {args.iters} (+{args.warmup} warm-up, {args.mem_iters} memory) per variant",
        flush=True,
    )
    results = {
        "settings": run_settings(args),
        "torchvision": torchvision.__version__,
        "torch": torch.__version__,
        "device": name,
        "cudnn_benchmark": device.type == "cuda" and not args.no_cudnn_benchmark,
        "softtriple": SOFTTRIPLE,
        "shapes": [],
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    for key in args.shapes.split(","):
        shape = SHAPES[key]()
        if args.dim:
            shape.dim = args.dim
        if args.batch:
            shape.batch = args.batch
        results["shapes"].append(bench_shape(shape, args, device))
        with open(args.out, "w") as f:  # after every shape: a run cut short keeps what it measured
            json.dump(results, f, indent=2)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
