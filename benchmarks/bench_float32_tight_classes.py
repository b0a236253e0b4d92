"""float32 scales of tightly clustered classes against float64.

For 6 unit rows at d = 16, each at distance ``dist`` from a common unit
vector, prints the median (over draws) relative error of
``SemanticScaleMemory(scale_dtype=torch.float32).scales()`` and of
``padded_class_scales(..., dtype=torch.float32)`` against float64
``class_semantic_scales`` of the same stored rows. The memory recomputes
scales below 1e-4 bits from the stored rows in float64; the function does not.

    python benchmarks/bench_float32_tight_classes.py
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

# this checkout's package, not an installed one (an editable install of another clone)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pml_dsb import SemanticScaleMemory, class_semantic_scales  # noqa: E402
from pml_dsb.functional.semantic_scale import padded_class_scales  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    samples, dim = 6, 16
    labels = torch.zeros(samples, dtype=torch.long)
    mask = torch.ones(1, samples, dtype=torch.bool)
    for dist in (0.1, 0.03, 0.01, 0.0035, 0.003, 0.001, 0.0003):
        memory_err, function_err, scale = [], [], []
        for _ in range(args.draws):
            centre = torch.nn.functional.normalize(torch.randn(dim, generator=gen, dtype=torch.float64), dim=0)
            offset = torch.randn(samples, dim, generator=gen, dtype=torch.float64)
            memory = SemanticScaleMemory(2, dim, 8, warmup_epochs=1, scale_dtype=torch.float32)
            memory.enqueue(centre + dist * offset / offset.norm(dim=1, keepdim=True), labels)
            stored, _ = memory.contents()
            exact = float(class_semantic_scales(stored, labels, 2, normalize=False)[0])
            memory_err.append(abs(float(memory.scales()[0]) - exact) / exact)
            padded = padded_class_scales(stored.unsqueeze(0), mask, normalize=False, dtype=torch.float32)
            function_err.append(abs(float(padded[0]) - exact) / exact)
            scale.append(exact)
        print(f"distance {dist:<7g} S ~ {np.median(scale):.1e} bits   relative error, median of {args.draws}: "
              f"memory {np.median(memory_err):.1e}, padded_class_scales {np.median(function_err):.1e}")


if __name__ == "__main__":
    main()
