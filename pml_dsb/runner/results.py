"""The run folder of ``pml-dsb bench``: what it holds, how to write and read it.

Run-folder contract (``pml-dsb analyze`` and any other reader rely on it)::

    <out>/<run_name>/              run_name = the config's ``name`` (or --run-name)
        config.toml                the resolved config (overrides applied); load_config() reads it
        environment.json           config (as a dict), methods, seeds, device, threads, number of
                                   processes (world_size) and torch.distributed backend, command
                                   line, package versions (python, torch,
                                   pytorch_metric_learning, faiss, numpy, sklearn, scipy,
                                   pml_dsb), git revision (or "unknown"), start/end time, wall time
        results.json               see below
        table.md                   the paper's table (Table 4: R@1, R@2, NMI per method, in %,
                                   mean ± std over seeds, each run at its best epoch; Table 5
                                   form, with an IF column, for imbalance factors above 1), the paired
                                   differences to the plain parent with paired t-tests, the same
                                   at the last epoch, the untrained network's values, and
                                   many/medium/few Recall@1 (closed-set datasets)
        table.csv                  one row per method and epoch_selection ("best", then "last"):
                                   method, epoch_selection, imbalance_factor, n_seeds,
                                   <metric>_mean, <metric>_std, parent, diff_<metric>_mean,
                                   diff_<metric>_std, t_<metric>, p_<metric> for metric in
                                   recall_at_1, recall_at_2, NMI (fractions, not %; empty = n/a)
        per_class.csv              method, seed, class, train_count, semantic_scale, scale_source,
                                   recall_at_1 (one row per method, seed and test class)
        per_class_recall.png       per-class Recall@1 (mean over seeds) against the class's
                                   train count and against its semantic scale, one series per method
        checkpoints/<method>/seed<k>/
            last.pt                latest epoch: model, loss (DSB memory), optimizers, RNG (one
                                   state per process under torchrun), history
            best.pt                the epoch of best test Recall@1: model and loss state
            result.json            the run's own result (train_one's return value)

``per_class.csv`` on closed-set datasets (digits-LT, CIFAR-100-LT: test
classes = training classes): ``train_count`` is the class's training count
and ``semantic_scale`` the class's semantic scale (bits,
:func:`pml_dsb.class_semantic_scales`, L2-normalised features) of the
*training* features of the best checkpoint (``scale_source = "train"``). On
CUB-200 and Cars196 the test classes are unseen in training: ``train_count``
is empty and ``semantic_scale`` comes from the *test* features of the best
checkpoint (``scale_source = "test"``).

``results.json``::

    {"format": "pml-dsb-results", "version": 1, "name", "dataset", "imbalance_factor" (null if none),
     "epochs": the configured training epochs,
     "closed_set", "train_class_counts": [n_0, ...], "metrics": ["recall_at_1", "recall_at_2", ..., "NMI"],
     "methods": [...], "seeds": [...],
     "per_method": {method: {
         "runs": [{"seed", "best_epoch", "metrics": {recall_at_<k>, NMI, groups, num_queries...},
                   "last_metrics": {...}, "init_metrics": {...} (last epoch; untrained network),
                   "per_class_recall_at_1": [per test label, null if no query],
                   "train_semantic_scales": [per train class],
                   ("test_semantic_scales": [per test class], CUB/Cars only)}, ...],
         "mean": {metric: float}, "std": {metric: float or null (one seed)},   (best epochs)
         "last_mean", "last_std", "init_mean", "init_std": the same at the last epoch / untrained,
         "groups": {"many"|"medium"|"few": {"mean": float, "std": float|null, "num_classes": int}}
                   (closed-set datasets only, best epochs),
         "per_class_recall_at_1_mean": [...],
         "first_weighted_epoch": [per seed: the first epoch that ended with the loss weighted
                   (stage 3), null if none] (methods whose histories record a DSB stage)}},
     "paired": {method: {"parent": parent, "n": seeds, metric: {"diff_mean", "diff_std", "t", "p",
                "significant" (p < 0.05; null when n/a), "parent_std"}}},   (best epochs)
     "paired_last_epoch": {...the same at the last epoch...}}

Metrics are fractions in ``results.json`` and the CSV files, percentages in
``table.md``.

Readers: :func:`load_run` returns a :class:`Run` that rebuilds a trained model
(:meth:`Run.load_model`) and the datasets of the config
(:meth:`Run.train_dataset`), so that train features can be recomputed.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import logging
import math
import os
import platform
import subprocess
import sys
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from .._json import read_json
from .config import BenchConfig, config_to_dict, dump_config, load_config
from .methods import PARENTS, canonical_method

logger = logging.getLogger(__name__)

__all__ = [
    "RESULTS_FORMAT",
    "TABLE_METRICS",
    "summarize",
    "paired_test",
    "format_table_markdown",
    "write_run_folder",
    "write_environment",
    "environment_info",
    "git_revision",
    "package_versions",
    "Run",
    "load_run",
    "load_trained_model",
]

RESULTS_FORMAT = "pml-dsb-results"
#: the metrics of the paper's tables, in order
TABLE_METRICS = ("recall_at_1", "recall_at_2", "NMI")
_LABELS = {"recall_at_1": "R@1", "recall_at_2": "R@2", "NMI": "NMI"}


def _finite_or_none(x: float) -> Optional[float]:
    return float(x) if x is not None and math.isfinite(x) else None


def paired_test(values: Sequence[float], parent: Sequence[float]) -> dict:
    """Paired difference ``values - parent`` over seeds and its paired t-test.

    Returns ``diff_mean``, ``diff_std`` (sample std, None for one seed), ``t``
    and ``p`` (two-sided ``scipy.stats.ttest_rel``; None, "n/a", with one seed
    or when every difference is equal), ``significant`` (``p < 0.05``, None
    when n/a), ``n``.

    >>> r = paired_test([0.5, 0.6, 0.7], [0.4, 0.4, 0.6])
    >>> round(r["diff_mean"], 4), round(r["t"], 3), r["n"]
    (0.1333, 4.0, 3)
    >>> paired_test([0.5], [0.4])["p"] is None
    True
    """
    a, b = np.asarray(values, dtype=float), np.asarray(parent, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same seeds, got {a.shape} and {b.shape}")
    diff = a - b
    out = {"n": int(diff.size), "diff_mean": float(diff.mean()),
           "diff_std": float(diff.std(ddof=1)) if diff.size > 1 else None,
           "t": None, "p": None, "significant": None}
    # equal differences (to rounding: equal gains over seeds differ by ~1e-17) have no spread to test
    if diff.size > 1 and not np.allclose(diff, diff[0], rtol=0, atol=1e-12):
        from scipy.stats import ttest_rel

        res = ttest_rel(a, b)
        out["t"] = _finite_or_none(float(res.statistic))
        out["p"] = _finite_or_none(float(res.pvalue))
        out["significant"] = None if out["p"] is None else bool(out["p"] < 0.05)
    return out


def _mean_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    vals = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if vals.size == 0:
        return None, None
    return float(vals.mean()), (float(vals.std(ddof=1)) if vals.size > 1 else None)


def summarize(config: BenchConfig, runs: Mapping[str, Sequence[dict]], train_counts: Sequence[int]) -> dict:
    """The ``results.json`` content from the finished runs.

    Args:
        runs: method -> the results of :func:`~pml_dsb.runner.train_one`, one per seed
            (the same seeds, in the same order, for every method).
        train_counts: training samples per class.
    """
    metrics = [f"recall_at_{k}" for k in config.evaluation.recall_ks] + (["NMI"] if config.evaluation.nmi else [])
    seeds = None
    out: dict[str, Any] = {
        "format": RESULTS_FORMAT, "version": 1, "name": config.name, "dataset": config.dataset.name,
        "imbalance_factor": config.dataset.imbalance_factor, "closed_set": config.dataset.closed_set,
        "train_class_counts": [int(c) for c in train_counts], "metrics": metrics, "epochs": config.training.epochs,
        "methods": list(runs), "per_method": {}, "paired": {},
    }
    for method, results in runs.items():
        run_seeds = [r["seed"] for r in results]
        if seeds is None:
            seeds = run_seeds
        elif run_seeds != seeds:
            raise ValueError(f"{method} has seeds {run_seeds}, the other methods {seeds}")
        entry: dict[str, Any] = {"runs": [], "mean": {}, "std": {}}
        for r in results:
            run = {k: r[k] for k in ("seed", "best_epoch", "metrics", "last_metrics", "init_metrics",
                                     "per_class_recall_at_1", "train_semantic_scales") if k in r}
            if "test_semantic_scales" in r:
                run["test_semantic_scales"] = r["test_semantic_scales"]
            entry["runs"].append(run)
        for m in metrics:
            entry["mean"][m], entry["std"][m] = _mean_std([r["metrics"].get(m) for r in results])
        for sel in ("last", "init"):
            entry[f"{sel}_mean"], entry[f"{sel}_std"] = {}, {}
            for m in metrics:
                entry[f"{sel}_mean"][m], entry[f"{sel}_std"][m] = _mean_std(
                    [r.get(f"{sel}_metrics", {}).get(m) for r in results])
        if config.dataset.closed_set:
            entry["groups"] = {}
            for group in ("many", "medium", "few"):
                vals = [r["metrics"]["groups"][group]["recall_at_1"] for r in results
                        if group in r["metrics"].get("groups", {})]
                mean, std = _mean_std(vals)
                num = next((r["metrics"]["groups"][group]["num_classes"] for r in results
                            if group in r["metrics"].get("groups", {})), 0)
                entry["groups"][group] = {"mean": mean, "std": std, "num_classes": num}
        per_class = np.array([[np.nan if v is None else v for v in r["per_class_recall_at_1"]] for r in results])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a class without any evaluated query
            means = np.nanmean(per_class, axis=0) if per_class.size else np.array([])
        entry["per_class_recall_at_1_mean"] = [None if not math.isfinite(v) else float(v) for v in means]
        staged = [r for r in results if any("dsb_stage" in h for h in r.get("history", ()))]
        if staged:
            # the first epoch that ended with the loss weighted (stage 3), per seed; None: never
            entry["first_weighted_epoch"] = [
                next((h["epoch"] for h in r["history"] if h.get("dsb_stage") == 3), None) for r in staged]
        out["per_method"][method] = entry
    out["seeds"] = seeds or []
    out["paired_last_epoch"] = {}
    for method in runs:
        parent = PARENTS.get(method)
        if parent is None or parent not in runs:
            continue
        for key, sel, std_key in (("paired", "metrics", "std"), ("paired_last_epoch", "last_metrics", "last_std")):
            pair: dict[str, Any] = {"parent": parent, "n": len(seeds)}
            for m in metrics:
                test = paired_test([r[sel][m] for r in runs[method]], [r[sel][m] for r in runs[parent]])
                test["parent_std"] = out["per_method"][parent][std_key][m]
                pair[m] = test
            out[key][method] = pair
    return out


# ----------------------------------------------------------------- tables
def _pct(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None:
        return "n/a"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _signed_pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:+.2f}"


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"] + [
        "| " + " | ".join(r) + " |" for r in rows]


def _paired_rows(paired: Mapping[str, Any], metric_names: list[str]) -> list[list[str]]:
    rows = []
    for method, pair in paired.items():
        cells = [method, pair["parent"]]
        for m in metric_names:
            t = pair[m]
            cells.append(_signed_pct(t["diff_mean"]) + (f" ± {100 * t['diff_std']:.2f}" if t["diff_std"] is not None else ""))
        for m in metric_names:
            t = pair[m]
            cells.append("n/a" if t["p"] is None else f"{t['p']:.3g}" + ("*" if t["significant"] else ""))
        rows.append(cells)
    return rows


def _weighting_note(summary: Mapping[str, Any]) -> str:
    """When the DSB methods' weighting began, from their epoch histories."""
    first = {m: e["first_weighted_epoch"] for m, e in summary["per_method"].items() if "first_weighted_epoch" in e}
    if not first:
        return "The best epoch is chosen on the test split."
    never = [m for m, epochs in first.items() if any(e is None for e in epochs)]
    if never:
        return (f"{', '.join(never)} never reached the weighted stage in some seeds (training ended within the "
                "warm-up, [dsb] warmup_epochs): there its losses were its parent's throughout. Train for more "
                "epochs than the warm-up.")
    latest = max(max(epochs) for epochs in first.values())
    note = (f"The best epoch is chosen on the test split and may fall before DSB's weighting starts (it starts "
            f"within epoch {latest} at the latest, at the batch that completes the warm-up); the last epoch is "
            "after it")
    if latest == summary.get("epochs"):
        return note + ", but in that epoch only the batches after the warm-up were weighted."
    return note + "."


def format_table_markdown(summary: Mapping[str, Any]) -> str:
    """``table.md``: the paper's table (best epoch), the paired tests, the same
    at the last epoch, the untrained network and, for closed-set data, the
    many/medium/few groups."""
    methods = summary["methods"]
    n = len(summary["seeds"])
    if_value = summary.get("imbalance_factor")
    long_tailed = if_value is not None and if_value > 1  # as DatasetConfig.long_tailed: IF 1 is balanced
    metric_names = [m for m in TABLE_METRICS if m in summary["metrics"]]
    labels = [_LABELS[m] for m in metric_names]
    lines = [f"# {summary['name']}: {summary['dataset']}"
             + (f", imbalance factor {if_value:g}" if if_value is not None else ""), ""]
    lines.append(f"Mean ± sample std over {n} seed{'s' if n != 1 else ''} ({', '.join(map(str, summary['seeds']))}),"
                 " in %, each run at its best epoch by test Recall@1"
                 + (" (the paper's Table 5 form)." if long_tailed else " (the paper's Table 4 form)."))
    lines.append("")

    def main_rows(mean_key, std_key):
        rows = []
        for method in methods:
            entry = summary["per_method"][method]
            cells = ([f"{if_value:g}"] if long_tailed else []) + [method]
            cells += [_pct(entry[mean_key].get(m), entry[std_key].get(m)) for m in metric_names]
            rows.append(cells)
        return rows

    head = (["IF"] if long_tailed else []) + ["Method"] + labels
    lines += _md_table(head, main_rows("mean", "std"))
    paired_head = ["Method", "Parent"] + [f"Δ {l}" for l in labels] + [f"p ({l})" for l in labels]
    if summary["paired"]:
        lines += ["", "## Paired difference to the plain parent (same seeds, best epochs)", ""]
        lines.append("Δ = method − parent in % points, mean ± std over seeds; p: two-sided paired t-test "
                     "(scipy.stats.ttest_rel); n/a with one seed or identical differences; "
                     "* marks p < 0.05 (the difference exceeds seed noise).")
        lines.append("")
        lines += _md_table(paired_head, _paired_rows(summary["paired"], metric_names))
    lines += ["", "## At the last epoch", "", _weighting_note(summary), ""]
    lines += _md_table(head, main_rows("last_mean", "last_std"))
    if summary.get("paired_last_epoch"):
        lines.append("")
        lines += _md_table(paired_head, _paired_rows(summary["paired_last_epoch"], metric_names))
    init = [summary["per_method"][m].get("init_mean", {}) for m in methods]
    if init and all(init):
        vals = {m: _mean_std([i.get(m) for i in init])[0] for m in metric_names}
        lines += ["", "Untrained network (epoch 0, mean over runs): "
                  + ", ".join(f"{_LABELS[m]} {_pct(vals[m], None)}" for m in metric_names) + "."]
    if summary.get("closed_set"):
        counts = summary["train_class_counts"]
        sizes = {g: sum(1 for c in counts if (c > 100 if g == "many" else c < 20 if g == "few" else 20 <= c <= 100))
                 for g in ("many", "medium", "few")}
        lines += ["", "## Recall@1 by training count at the best epoch (many > 100, medium 20-100, few < 20)", ""]
        head = ["Method"] + [f"{g} ({sizes[g]} class{'' if sizes[g] == 1 else 'es'})" for g in ("many", "medium", "few")]
        rows = []
        for method in methods:
            groups = summary["per_method"][method].get("groups", {})
            rows.append([method] + [_pct(groups.get(g, {}).get("mean"), groups.get(g, {}).get("std"))
                                    for g in ("many", "medium", "few")])
        lines += _md_table(head, rows)
    return "\n".join(lines) + "\n"


def _csv_num(x: Optional[float]) -> str:
    return "" if x is None else repr(float(x))


def _write_table_csv(summary: Mapping[str, Any], path: str) -> None:
    metric_names = [m for m in TABLE_METRICS if m in summary["metrics"]]
    header = ["method", "epoch_selection", "imbalance_factor", "n_seeds"]
    header += [f"{m}_{s}" for m in metric_names for s in ("mean", "std")]
    header += ["parent"] + [f"{k}_{m}" if k in ("t", "p") else f"diff_{m}_{k}"
                            for m in metric_names for k in ("mean", "std", "t", "p")]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for selection, prefix, paired_key in (("best", "", "paired"), ("last", "last_", "paired_last_epoch")):
            for method in summary["methods"]:
                entry = summary["per_method"][method]
                row = [method, selection, "" if summary["imbalance_factor"] is None else summary["imbalance_factor"],
                       len(summary["seeds"])]
                row += [_csv_num(entry[prefix + s][m]) for m in metric_names for s in ("mean", "std")]
                pair = summary.get(paired_key, {}).get(method)
                row.append(pair["parent"] if pair else "")
                for m in metric_names:
                    t = pair[m] if pair else {}
                    row += [_csv_num(t.get("diff_mean")), _csv_num(t.get("diff_std")), _csv_num(t.get("t")),
                            _csv_num(t.get("p"))]
                writer.writerow(row)


def _per_class_rows(summary: Mapping[str, Any]) -> list[dict]:
    rows = []
    counts = summary["train_class_counts"]
    closed = summary["closed_set"]
    for method in summary["methods"]:
        for run in summary["per_method"][method]["runs"]:
            scales = run["train_semantic_scales"] if closed else run.get("test_semantic_scales", [])
            for c, r1 in enumerate(run["per_class_recall_at_1"]):
                rows.append({
                    "method": method, "seed": run["seed"], "class": c,
                    "train_count": counts[c] if closed else "",
                    "semantic_scale": scales[c] if c < len(scales) else "",
                    "scale_source": "train" if closed else "test",
                    "recall_at_1": "" if r1 is None else r1,
                })
    return rows


def _write_per_class_csv(rows: list[dict], path: str) -> None:
    fields = ["method", "seed", "class", "train_count", "semantic_scale", "scale_source", "recall_at_1"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _plot_per_class(summary: Mapping[str, Any], rows: list[dict], path: str) -> None:
    from .. import _optional

    plt = _optional.matplotlib_pyplot()
    closed = summary["closed_set"]
    ncols = 2 if closed else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.5), squeeze=False)
    axes = axes[0]
    markers = "os^vD<>p*h"
    for i, method in enumerate(summary["methods"]):
        mine = [r for r in rows if r["method"] == method and r["recall_at_1"] != ""]
        classes = sorted({r["class"] for r in mine})
        r1 = np.array([np.mean([r["recall_at_1"] for r in mine if r["class"] == c]) for c in classes])
        scale = np.array([np.mean([r["semantic_scale"] for r in mine if r["class"] == c and r["semantic_scale"] != ""] or [np.nan])
                          for c in classes])
        style = dict(marker=markers[i % len(markers)], linestyle="-" if closed else "none", label=method, alpha=0.8)
        if closed:
            counts = np.array([summary["train_class_counts"][c] for c in classes])
            order = np.argsort(counts)
            axes[0].plot(counts[order], r1[order], **style)
            order = np.argsort(scale)
            axes[1].plot(scale[order], r1[order], **{**style, "linestyle": "none"})
        else:
            axes[0].plot(scale, r1, **style)
    if closed:
        axes[0].set_xscale("log")
        axes[0].set_xlabel("training samples of the class (log scale)")
        axes[1].set_xlabel("semantic scale of the class's train features (bits)")
    else:
        axes[0].set_xlabel("semantic scale of the class's test features (bits)")
    for ax in axes:
        ax.set_ylabel(f"per-class Recall@1 (mean over {len(summary['seeds'])} seeds)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{summary['name']}: per-class Recall@1 at the best epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_run_folder(run_dir: Union[str, os.PathLike], config: BenchConfig, summary: Mapping[str, Any]) -> dict:
    """Write ``config.toml``, ``results.json``, ``table.md``, ``table.csv``,
    ``per_class.csv`` and ``per_class_recall.png`` into ``run_dir``.

    Returns the paths written, by name."""
    run_dir = os.fspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    paths = {name: os.path.join(run_dir, name) for name in
             ("config.toml", "results.json", "table.md", "table.csv", "per_class.csv", "per_class_recall.png")}
    with open(paths["config.toml"], "w", encoding="utf-8") as fh:
        fh.write(dump_config(config, header="Resolved config of this run (pml-dsb bench)."))
    from .training import write_json_atomic

    write_json_atomic(summary, paths["results.json"])
    with open(paths["table.md"], "w", encoding="utf-8") as fh:
        fh.write(format_table_markdown(summary))
    _write_table_csv(summary, paths["table.csv"])
    rows = _per_class_rows(summary)
    _write_per_class_csv(rows, paths["per_class.csv"])
    _plot_per_class(summary, rows, paths["per_class_recall.png"])
    return paths


# ------------------------------------------------------------ environment
def git_revision(path: Union[str, os.PathLike, None] = None) -> str:
    """``git rev-parse HEAD`` of the repository holding ``path`` (default: this
    package), with ``+dirty`` when tracked files changed; ``"unknown"`` outside
    a git checkout, without git, or when git does not track ``path`` (an
    installed copy inside some other repository, e.g. a project's virtualenv)."""
    target = os.fspath(path) if path is not None else os.path.abspath(__file__)
    folder = target if os.path.isdir(target) else os.path.dirname(target)
    try:
        # the enclosing repository must track the path itself, not merely contain it
        subprocess.run(["git", "ls-files", "--error-unmatch", "--", os.path.basename(target) if folder != target
                        else "."], cwd=folder, capture_output=True, text=True, timeout=10, check=True)
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "") if rev else "unknown"


def package_versions() -> dict:
    """Versions of python and of the packages a result depends on (None if absent)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for key, dist in (("torch", "torch"), ("torchvision", "torchvision"),
                      ("pytorch_metric_learning", "pytorch-metric-learning"), ("faiss", None),
                      ("numpy", "numpy"), ("sklearn", "scikit-learn"), ("scipy", "scipy"),
                      ("pml_dsb", "pml-dsb")):
        version = None
        if key == "faiss":
            try:
                import faiss

                version = getattr(faiss, "__version__", None)
            except ImportError:
                version = None
        else:
            try:
                version = metadata.version(dist)
            except metadata.PackageNotFoundError:
                version = None
        out[key] = version
    return out


def environment_info(config: BenchConfig, device: str, argv: Optional[Sequence[str]] = None, **extra) -> dict:
    """Everything ``environment.json`` records (see the module docstring)."""
    import torch

    from ..distributed.ddp import get_world_size
    from ..distributed.gather import is_distributed

    return {
        "config": config_to_dict(config),
        "methods": list(config.methods),
        "seeds": list(config.seeds),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(0) if str(device).startswith("cuda") and torch.cuda.is_available() else None,
        "torch_num_threads": torch.get_num_threads(),
        "world_size": get_world_size(),
        "distributed_backend": str(torch.distributed.get_backend()) if is_distributed() else None,
        "versions": package_versions(),
        "git_revision": git_revision(),
        "platform": platform.platform(),
        "argv": list(sys.argv if argv is None else argv),
        **extra,
    }


def write_environment(run_dir: Union[str, os.PathLike], info: Mapping[str, Any]) -> str:
    """Write ``info`` as ``<run_dir>/environment.json`` (atomically); return its path."""
    from .training import write_json_atomic

    path = os.path.join(os.fspath(run_dir), "environment.json")
    write_json_atomic(dict(info), path)
    return path


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------ reading
@dataclasses.dataclass
class Run:
    """A finished (or partial) benchmark run folder, as :func:`load_run` reads it.

    Attributes:
        path: the run folder.
        config: its resolved config (``config.toml``).
        results: ``results.json`` (None while the benchmark has not finished).
        environment: ``environment.json`` (None if absent).
    """

    path: str
    config: BenchConfig
    results: Optional[dict]
    environment: Optional[dict]

    @property
    def methods(self) -> list[str]:
        return list(self.config.methods)

    @property
    def seeds(self) -> list[int]:
        return list(self.config.seeds)

    def checkpoint_path(self, method: str, seed: int, which: str = "best") -> str:
        """``checkpoints/<method>/seed<seed>/<which>.pt`` (``which``: best or last)."""
        if which not in ("best", "last"):
            raise ValueError(f"which must be 'best' or 'last', got {which!r}")
        from .training import run_dir_for

        return os.path.join(run_dir_for(self.path, method, seed), f"{which}.pt")

    def load_model(self, method: str, seed: int, device: str = "cpu", which: str = "best"):
        """The embedding model of (method, seed) with the weights of its
        ``best.pt`` (or ``last.pt``), in eval mode, on ``device``."""
        from .checkpoint import load_checkpoint

        method = canonical_method(method)
        path = self.checkpoint_path(method, seed, which)
        return self.model_from_state(load_checkpoint(path, map_location=device, method=method, seed=seed),
                                     device, source=path)

    def model_from_state(self, state: dict, device: str = "cpu", source: str = "the checkpoint"):
        """The embedding model of this run's config with the weights of a
        checkpoint ``state`` (:func:`~pml_dsb.runner.load_checkpoint`), e.g.
        of a copy of ``last.pt`` kept from an earlier epoch; in eval mode."""
        from .builders import build_embedding_model
        from .checkpoint import CheckpointError

        model = build_embedding_model(self.config.model)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise CheckpointError(f"{source}: its model does not fit the [model] config of run {self.path!r}: "
                                  f"{str(err).splitlines()[0]}") from err
        return model.to(device).eval()

    def train_dataset(self, augment: bool = False):
        """The config's training split; ``augment=False`` (default) gives the
        deterministic test transform, as used for semantic scales."""
        from .builders import build_dataset

        return build_dataset(self.config.dataset, "train", augment=augment)

    def test_dataset(self):
        """The run's test split, as its config builds it (no augmentation)."""
        from .builders import build_dataset

        return build_dataset(self.config.dataset, "test", augment=False)

    def train_features(self, method: str, seed: int, device: str = "cpu", batch_size: Optional[int] = None):
        """(features, labels) of the training split under the best checkpoint of
        (method, seed): what ``per_class.csv``'s semantic scales were computed from."""
        import torch

        from .training import embed

        model = self.load_model(method, seed, device)
        return embed(model, self.train_dataset(), batch_size or self.config.evaluation.batch_size, torch.device(device))


def load_run(path: Union[str, os.PathLike], data_root: Optional[str] = None) -> Run:
    """Read a run folder written by ``pml-dsb bench``.

    ``data_root`` replaces the config's data folder (the data moved).
    Raises ``FileNotFoundError`` naming ``config.toml`` when ``path`` is not a
    run folder.
    """
    path = os.fspath(path)
    config_path = os.path.join(path, "config.toml")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{path!r} is not a pml-dsb run folder: {config_path!r} is missing (run `pml-dsb bench` first)"
        )
    config = load_config(config_path)
    if data_root is not None:
        config = dataclasses.replace(config, dataset=dataclasses.replace(config.dataset, root=os.fspath(data_root)))

    def read(name):
        p = os.path.join(path, name)
        return read_json(p) if os.path.isfile(p) else None

    return Run(path=path, config=config, results=read("results.json"), environment=read("environment.json"))


def load_trained_model(run_dir: Union[str, os.PathLike], method: str, seed: int, device: str = "cpu"):
    """Shortcut for ``load_run(run_dir).load_model(method, seed, device)``."""
    return load_run(run_dir).load_model(method, seed, device)
