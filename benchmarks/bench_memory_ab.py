"""A/B of the memory's own cost: ``SemanticScaleMemory`` at a git revision
against the working tree's, side by side in one process.

Both memories are filled alike, then fed the same stage-3 batches (a random
sampler, as in ``bench_dsb_step.py``), in an order that alternates at random
each step; the figure is the median time of ``enqueue`` + ``scales()`` per step
and its ratio. Both memories' scales are compared at every step: the largest
relative difference is printed (a change that alters the arithmetic shows
here, one that breaks it shows as large). The same code against itself gave
ratios of 0.94-1.00 over 10-30 steps on a shared 2-core machine: read
differences of a few percent as noise.

The revision's memory package (``pml_dsb/memory/``, every module of it) is
loaded from ``git archive REV`` and imports the rest of the package from the
working tree, so this works for revisions whose memory needs nothing the
working tree has removed.

    python benchmarks/bench_memory_ab.py --rev HEAD~3
    python benchmarks/bench_memory_ab.py --rev 3ef0022 --shapes cub512 --addressing index --steps 300
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
# this checkout's package, not an installed one: the revision compared against
# comes from this checkout's git (an editable install of another clone won)
sys.path.insert(1, os.path.dirname(_HERE))
from bench_dsb_step import SHAPES, fill_memory, index_stream  # noqa: E402
from bench_environment import run_settings  # noqa: E402

from pml_dsb import SemanticScaleMemory  # noqa: E402

PACKAGE = "pml_dsb/memory"


def memory_class_at(rev: str):
    """``SemanticScaleMemory`` as the memory package was at git revision ``rev``."""
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.dirname(_HERE)
        archive = subprocess.run(["git", "archive", rev, PACKAGE], cwd=root, capture_output=True)
        if archive.returncode != 0:
            raise SystemExit(f"git archive {rev} {PACKAGE} failed: {archive.stderr.decode().strip()}")
        commit = subprocess.run(["git", "rev-parse", rev], cwd=root, capture_output=True, text=True).stdout.strip()
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            # the "data" filter where this Python has it (3.10.12+, 3.11.4+)
            tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        # a package beside pml_dsb.memory, so that its relative imports resolve:
        # its own modules from the revision, the rest of pml_dsb from the working tree
        # (named after the commit: another revision loaded in the same process gets its own modules)
        name, folder = f"pml_dsb._baseline_memory_{commit[:12]}", os.path.join(tmp, PACKAGE)
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)  # imports its modules while the files exist
    return package.SemanticScaleMemory


def compare(baseline_cls, shape_name: str, addressing: str, steps: int, warmup: int, seed: int) -> dict:
    shape = SHAPES[shape_name]()
    classes, size = len(shape.counts), int(shape.counts.sum())
    indexed = addressing == "index"
    memories = []
    for cls in (baseline_cls, SemanticScaleMemory):
        rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
        memory = cls(classes, shape.dim, size, warmup_epochs=1)
        fill_memory(memory, shape.counts, shape.batch, indexed, rng, gen, torch.device("cpu"))
        memories.append(memory)
    rng, gen = np.random.default_rng(seed + 1), torch.Generator().manual_seed(seed + 1)
    order = random.Random(seed)
    stream = index_stream(shape.counts, shape.batch, rng)
    times, difference = ([], []), 0.0
    for step in range(warmup + steps):
        idx, labels = next(stream)
        emb = torch.randn(shape.batch, shape.dim, generator=gen)
        scales = [None, None]
        for k in order.sample((0, 1), 2):
            start = time.perf_counter()
            memories[k].enqueue(emb, labels, idx if indexed else None)
            scales[k] = memories[k].scales()
            if step >= warmup:
                times[k].append(time.perf_counter() - start)
        scale = scales[0].abs().clamp(min=1e-30)
        relative = ((scales[1] - scales[0]).abs() / scale).nan_to_num(nan=math.inf)  # a NaN is the worst case
        difference = max(difference, float(relative.max()))
    before, after = (1e3 * statistics.median(t) for t in times)
    print(
        f"{shape_name:14s} {addressing:5s} baseline {before:8.2f} ms  working tree {after:8.2f} ms  "
        f"ratio {after / before:5.2f}  largest relative difference {difference:.1e}",
        flush=True,
    )
    return {"shape": shape_name, "addressing": addressing, "baseline_ms": before, "ms": after,
            "ratio": after / before, "max_rel_difference": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", required=True, help="git revision of the baseline memory")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    parser.add_argument("--addressing", choices=("fifo", "index", "both"), default="both")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per shape (default 150, 100 at cifar100lt512, 20 at imagenetlt512)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench_memory_ab.json", help="where to write the figures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    threadpool_limits(1)
    baseline = memory_class_at(args.rev)
    default_steps = {"cifar100lt512": 100, "imagenetlt512": 20}
    modes = ("fifo", "index") if args.addressing == "both" else (args.addressing,)
    rows = [
        compare(baseline, name, mode, args.steps or default_steps.get(name, 150), args.warmup, args.seed)
        for name in args.shapes.split(",")
        for mode in modes
    ]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rev": args.rev, "settings": run_settings(args), "rows": rows}, f, indent=2)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
