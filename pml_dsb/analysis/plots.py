"""PNG figures of the analyses (matplotlib, headless, imported through ``pml_dsb._optional``).

Each function draws exactly the numbers it is given (the CLI writes the same
numbers to JSON/CSV beside the figure), saves one PNG at ``path`` and
returns ``path``.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Optional, Sequence

import numpy as np

from pml_dsb._optional import matplotlib_pyplot

__all__ = ["plot_marginal_curves", "plot_scale_vs_accuracy", "plot_manifold_volumes", "plot_imbalance_summary"]


def _save(fig, path) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    matplotlib_pyplot().close(fig)
    return path


def plot_marginal_curves(curves: Sequence, path, title: str = "Marginal effect of semantic scale") -> str:
    """S against subset size m, one line per class (mean) with a +-1 std band."""
    plt = matplotlib_pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("viridis")
    for i, c in enumerate(curves):
        if not len(c.sizes):
            continue
        color = cmap(i / max(len(curves) - 1, 1))
        ax.plot(c.sizes, c.mean, color=color, lw=1.3, label=f"class {c.label} (n={c.count})")
        ax.fill_between(c.sizes, c.mean - c.std, c.mean + c.std, color=color, alpha=0.2, lw=0)
    ax.set_xlabel("samples in the subset, m")
    ax.set_ylabel("semantic scale S (bits)")
    ax.set_title(title)
    if len(curves) <= 20:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_scale_vs_accuracy(
    predictors: Mapping[str, np.ndarray],
    accuracy: np.ndarray,
    path,
    correlations: Optional[Mapping[str, float]] = None,
    accuracy_name: str = "Recall@1",
    title: str = "",
) -> str:
    """One scatter panel per predictor: per-class accuracy against the predictor,
    with the correlation in the panel title when given."""
    plt = matplotlib_pyplot()
    names = list(predictors)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        x = np.asarray(predictors[name], dtype=float)
        ax.scatter(x, accuracy, s=18, alpha=0.8)
        label = name.replace("_", " ")
        ax.set_xlabel(label + (" (bits)" if name == "semantic_scale" else ""))
        ax.set_ylabel(f"per-class {accuracy_name}")
        if correlations and name in correlations and not math.isnan(correlations[name]):
            ax.set_title(f"Spearman rho = {correlations[name]:+.3f}", fontsize=9)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_manifold_volumes(factors: Sequence[float], volumes: Mapping[str, Sequence[float]], path) -> str:
    """Measured volume S (normalize=False) against the scale factor, one line per cloud."""
    plt = matplotlib_pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, v in volumes.items():
        ax.plot(factors, v, marker="o", label=name)
    ax.set_xlabel("scale factor")
    ax.set_ylabel("semantic scale S (bits)")
    ax.set_title("Volume of a scaled point cloud")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_imbalance_summary(rows: Sequence[Mapping], path, title: str = "Semantic scale imbalance") -> str:
    """Bars of each class's scale (sorted, smallest first) with its count on a second axis."""
    plt = matplotlib_pyplot()
    names = [str(r["class"]) for r in rows]
    scales = [r["scale"] for r in rows]
    counts = [r["count"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(rows)), 4))
    x = np.arange(len(rows))
    ax.bar(x, scales, color="tab:blue", alpha=0.8, label="semantic scale")
    ax.set_ylabel("semantic scale S (bits)")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90 if len(rows) > 20 else 0, fontsize=7)
    ax.set_xlabel("class (sorted by scale)")
    ax2 = ax.twinx()
    ax2.plot(x, counts, color="tab:red", marker=".", label="train count")
    ax2.set_ylabel("samples", color="tab:red")
    ax.set_title(title)
    return _save(fig, path)
