"""``pml-dsb analyze``: marginal effect, scale against bias, manifold check, imbalance summary.

Thin glue over the library functions of :mod:`pml_dsb.analysis`: each
subcommand computes, writes PNG plots and a JSON and/or CSV of every number it
plots into ``--out`` (default ``results/analysis/<command>``), and prints a
short table (the library itself only logs).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from pml_dsb import _optional
from pml_dsb._json import json_safe

logger = logging.getLogger(__name__)

__all__ = ["register"]

DEFAULT_OUT = os.path.join("results", "analysis")


# ----------------------------------------------------------------- output helpers
def _write_json(obj: Any, path: str) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(json_safe(obj), fh, indent=1, allow_nan=False)
        fh.write("\n")
    return path


def _write_csv(rows: Sequence[dict], path: str, columns: Optional[Sequence[str]] = None) -> str:
    columns = list(columns or (rows[0].keys() if rows else []))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return path


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _out_dir(args, command: str) -> str:
    # every command plots: a missing matplotlib fails before any work or file
    _optional.matplotlib_pyplot()
    out = args.out or os.path.join(DEFAULT_OUT, command)
    os.makedirs(out, exist_ok=True)
    return out


def _remove_stale_plots(out: str, prefix: str, written: Iterable[str]) -> None:
    """Delete the ``{prefix}*.png`` plots of an earlier call into ``out`` that this
    call did not write: beside this call's tables they would pass for its own."""
    written = {os.path.abspath(p) for p in written}
    for name in sorted(os.listdir(out)):
        path = os.path.abspath(os.path.join(out, name))
        if name.startswith(prefix) and name.endswith(".png") and path not in written and os.path.isfile(path):
            os.remove(path)
            logger.info("removed %s, a plot of an earlier call that this one did not make", path)


def _progress(iterable, args, **kwargs):
    if getattr(args, "no_progress", False):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


def _features(args):
    """(features, labels, description) from --checkpoint or --dataset raw inputs."""
    from .features import checkpoint_features, load_dataset, raw_features

    if args.checkpoint:  # the commands ran _check_sources first
        features, labels, info = checkpoint_features(args.checkpoint, data_root=args.root)
        return features, labels, {**info, "checkpoint": os.path.abspath(args.checkpoint)}
    name, split = args.dataset or args.default_dataset, args.split or "train"
    dataset = load_dataset(name, split=split, root=args.root, imbalance_factor=args.imbalance_factor,
                           seed=args.split_seed)
    features, labels = raw_features(dataset)
    info = {"source": "raw inputs (flattened)", "dataset": name, "split": split,
            "imbalance_factor": getattr(dataset, "imbalance_factor", None), "dimension": int(features.shape[1])}
    return features, labels, info


# ----------------------------------------------------------------- marginal
def _cmd_marginal(args) -> int:
    from . import plots
    from .marginal import SATURATION_POINTS, marginal_effect_curve, saturation_summary

    _check_sources(args)  # before the output folder is made
    out = _out_dir(args, "marginal")
    features, labels, info = _features(args)
    classes = np.unique(labels) if not args.classes else np.asarray(args.classes, dtype=np.int64)
    missing = sorted(set(classes.tolist()) - set(np.unique(labels).tolist()))
    if missing:
        raise ValueError(f"--classes {missing}: no samples with these labels (the input has labels "
                         f"{int(labels.min())}..{int(labels.max())})")
    curves = []
    for c in _progress(classes, args, desc="marginal", unit="class"):
        rows = np.flatnonzero(labels == c)
        curves.append(marginal_effect_curve(
            features[rows], repeats=args.repeats, seed=args.seed, normalize=not args.no_normalize,
            label=int(c), max_points=args.max_points,
        ))
    saturation = saturation_summary(curves)
    curve_rows = [
        {"class": c.label, "count": c.count, "m": int(m), "mean": float(mu), "std": float(sd)}
        for c in curves for m, mu, sd in zip(c.sizes, c.mean, c.std)
    ]
    _write_csv(curve_rows, os.path.join(out, "marginal_curves.csv"))
    _write_csv(saturation, os.path.join(out, "saturation.csv"))
    params = {"repeats": args.repeats, "seed": args.seed, "normalize": not args.no_normalize,
              "max_points": args.max_points, "subsets": "nested prefixes of random permutations"}
    _write_json({"input": info, "parameters": params, "saturation": saturation,
                 "curves": [{"class": c.label, "count": c.count, "sizes": c.sizes, "mean": c.mean, "std": c.std}
                            for c in curves]},
                os.path.join(out, "marginal.json"))
    plots.plot_marginal_curves(curves, os.path.join(out, "marginal_curves.png"),
                               title=f"Marginal effect: {info.get('dataset')} ({info['source']})")
    header = ["class", "n", "S(n) bits"] + [f"S({m})/S(n)" for m in SATURATION_POINTS]
    print(_table(header, [[r["label"], r["count"], _fmt(r["full_scale"])]
                          + [_fmt(r[f"fraction_at_{m}"]) for m in SATURATION_POINTS] for r in saturation]))
    print(f"(S(m): mean over {args.repeats} random subsets of m samples; '-': class has fewer than m)")
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------- imbalance (scale vs bias)
def _load_run(path: str):
    from .run_table import load_run_table

    return load_run_table(path)


def _cmd_imbalance(args) -> int:
    from . import plots
    from .correlation import count_predictors, scale_bias_analysis

    table = _load_run(args.run)
    methods = args.method or table.methods
    unknown = [m for m in methods if m not in table.methods]
    if unknown:  # before any output: a later method's error left the earlier ones' plots
        args.parser.error(f"--method {' '.join(unknown)}: not in the run (its methods: {' '.join(table.methods)})")
    out = _out_dir(args, "imbalance")
    written = []
    corr_rows, point_rows, report = [], [], {"run": os.path.abspath(args.run), "dataset": table.dataset,
                                             "bootstrap": {"n_boot": args.bootstrap, "seed": args.seed,
                                                           "confidence": args.confidence},
                                             "methods": {}}
    for method in methods:
        classes, counts, scale, acc = table.complete(method)
        if len(classes) < 3:
            logger.warning("%s: only %d complete classes; skipped", method, len(classes))
            continue
        result = scale_bias_analysis(scale, counts, acc, n_boot=args.bootstrap,
                                     confidence=args.confidence, seed=args.seed)
        report["methods"][method] = {"seeds": table.seeds[method], "num_classes": int(len(classes)), **result}
        for c in result["correlations"]:
            corr_rows.append({"method": method, "predictor": c["predictor"], "correlation": c["method"],
                              "value": c["value"], "ci_classes_low": c["ci_classes"][0],
                              "ci_classes_high": c["ci_classes"][1], "ci_seeds_low": c["ci_seeds"][0],
                              "ci_seeds_high": c["ci_seeds"][1]})
        s_mean, a_mean = scale.mean(0), acc.mean(0)
        for j, c in enumerate(classes):
            point_rows.append({"method": method, "class": int(c), "train_count": counts[j],
                               "semantic_scale": float(s_mean[j]), "recall_at_1": float(a_mean[j])})
        preds = {k: v for k, v in count_predictors(s_mean, counts).items() if np.all(np.isfinite(v))}
        rho = {c["predictor"]: c["value"] for c in result["correlations"] if c["method"] == "spearman"}
        written.append(os.path.join(out, f"scatter_{method}.png"))
        plots.plot_scale_vs_accuracy(preds, a_mean, written[-1], rho,
                                     title=f"{table.dataset or ''} {method}: per-class Recall@1 "
                                           f"(mean over {len(table.seeds[method])} seeds)")
        print(f"\n== {method} ({len(classes)} classes, seeds {table.seeds[method]})")
        print(_table(["predictor", "corr", "value", "CI classes", "CI seeds"], [
            [r["predictor"], r["correlation"], _fmt(r["value"], "+.3f"),
             f"[{_fmt(r['ci_classes_low'], '+.3f')}, {_fmt(r['ci_classes_high'], '+.3f')}]",
             f"[{_fmt(r['ci_seeds_low'], '+.3f')}, {_fmt(r['ci_seeds_high'], '+.3f')}]"]
            for r in corr_rows if r["method"] == method]))
        n_seeds = len(table.seeds[method])
        if n_seeds < 2:
            print("(no interval over seeds: the run has one seed)")
        elif n_seeds < 5:
            print(f"(the interval over seeds comes from only {n_seeds} seeds: a few distinct resamples, coarse)")
        if table.scale_source == "test":
            print("(open-set run: the scales are those of the unseen test classes' test features)")
        print("Spearman: " + result["comparison"]["spearman"]["statement"])
        print("Pearson:  " + result["comparison"]["pearson"]["statement"])
    if not report["methods"]:
        print("no method had enough classes with a scale and a Recall@1")
        return 1
    _remove_stale_plots(out, "scatter_", written)
    _write_csv(corr_rows, os.path.join(out, "correlations.csv"))
    _write_csv(point_rows, os.path.join(out, "points.csv"))
    _write_json(report, os.path.join(out, "imbalance.json"))
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------- manifold
def _cmd_manifold(args) -> int:
    from . import plots
    from .manifold import (
        BUILTIN_CLOUDS, DEFAULT_FACTORS, builtin_point_cloud, load_point_cloud, scaled_volumes, volume_report,
    )

    factors = sorted(args.factors or DEFAULT_FACTORS)
    if len(set(factors)) != len(factors) or len(factors) < 2:
        args.parser.error(f"--factors needs at least two distinct values, got {' '.join(map(str, args.factors))}")
    out = _out_dir(args, "manifold")
    if args.input:
        names = [os.path.basename(p) for p in args.input]
        if len(set(names)) < len(names):  # a/cloud.npy b/cloud.npy: named by their paths
            names = list(args.input)
        if len(set(names)) < len(names):
            args.parser.error(f"--input names a file twice: {' '.join(args.input)}")
        clouds = {name: load_point_cloud(p) for name, p in zip(names, args.input)}
    else:
        clouds = {n: builtin_point_cloud(n, args.points, args.seed) for n in BUILTIN_CLOUDS}
    volumes, reports, rows = {}, {}, []
    for name, points in clouds.items():
        v = scaled_volumes(points, factors)
        volumes[name] = v
        reports[name] = {"num_points": int(len(points)), **volume_report(factors, v, dim=points.shape[1])}
        rows += [{"cloud": name, "factor": f, "volume_bits": float(x)} for f, x in zip(factors, v)]
    _write_csv(rows, os.path.join(out, "manifold_volumes.csv"))
    _write_json({"factors": factors, "normalize": False, "seed": args.seed,
                 "volumes": volumes, "reports": reports}, os.path.join(out, "manifold.json"))
    plots.plot_manifold_volumes(factors, volumes, os.path.join(out, "manifold_volumes.png"))
    print(_table(["factor"] + list(clouds), [[_fmt(f, "g")] + [_fmt(volumes[n][i]) for n in clouds]
                                             for i, f in enumerate(factors)]))
    for name, r in reports.items():
        print(f"{name}: {'monotonic' if r['monotonic'] else 'NOT monotonic'}, "
              f"{'slow' if r['slow'] else 'NOT slow'} ({r['bits_per_doubling']:.2f} bits per doubling, "
              f"at most {r['max_bits_per_doubling']:.2f}; bound {r['dim']}), volume x{r['volume_ratio']:.2f} "
              f"for factor x{r['factor_ratio']:g}")
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------- summary
def _cmd_summary(args) -> int:
    from . import plots
    from .imbalance import imbalance_summary

    out = _out_dir(args, "summary")
    summaries = {}
    if args.run:
        table = _load_run(args.run)
        if not np.isfinite(table.train_count).any():
            raise ValueError(
                f"run {args.run!r} ({table.dataset}) evaluates classes unseen in training: they have no "
                f"training counts to set beside their scales; summarise a training split instead "
                f"(--dataset with --split train, or --checkpoint)"
            )
        for method in table.methods:
            s = table.scale[method]
            # a seed where a class has no scale (0, or no row) tells nothing of its
            # size: the mean is over the seeds that have one, 0 (no scale) if none
            has = np.isfinite(s) & (s > 0)
            seeds_with = has.sum(0)
            mean = np.where(seeds_with > 0, np.where(has, s, 0.0).sum(0) / np.maximum(seeds_with, 1), 0.0)
            ok = np.isfinite(table.train_count)
            summaries[method] = imbalance_summary(mean[ok], table.train_count[ok], table.classes[ok].tolist())
        source = {"run": os.path.abspath(args.run), "dataset": table.dataset,
                  "scale": "per_class.csv semantic_scale, mean over the seeds where the class has a scale"}
    else:
        from pml_dsb.functional import class_semantic_scales
        import torch

        features, labels, source = _features(args)
        num_classes = int(labels.max()) + 1
        scales = class_semantic_scales(features, torch.as_tensor(labels), num_classes,
                                       normalize=not args.no_normalize).numpy()
        counts = np.bincount(labels, minlength=num_classes)
        summaries[source.get("dataset") or "dataset"] = imbalance_summary(scales, counts)
    rows, written = [], []
    for key, summ in summaries.items():
        rows += [{"source": key, **r} for r in summ["classes"]]
        written.append(os.path.join(out, f"summary_{key}.png"))
        plots.plot_imbalance_summary(summ["classes"], written[-1], title=f"Semantic scale imbalance: {key}")
    _remove_stale_plots(out, "summary_", written)
    _write_csv(rows, os.path.join(out, "summary.csv"))
    _write_json({"input": source, "summaries": summaries}, os.path.join(out, "summary.json"))
    print(_table(["source", "classes", "scale max/min", "count max/min", "Spearman(S, n)"], [
        [k, s["num_classes"], _fmt(s["scale_ratio"]), _fmt(s["count_imbalance_factor"], ".1f"),
         _fmt(s["scale_count_spearman"], "+.3f")] for k, s in summaries.items()]))
    for key, summ in summaries.items():
        ranked = [r for r in summ["classes"] if r["scale_rank"] is not None]
        k = args.top
        shown = ranked if len(ranked) <= 2 * k else ranked[:k] + ranked[-k:]
        note = "" if len(shown) == len(ranked) else f"; the {k} smallest and {k} largest of {len(ranked)}"
        print(f"\n{key}: classes ranked by scale (smallest first{note})")
        print(_table(["rank", "class", "scale", "count", "count rank"],
                     [[r["scale_rank"], r["class"], _fmt(r["scale"]), r["count"], r["count_rank"]] for r in shown]))
        if summ["num_without_scale"]:
            print(f"({summ['num_without_scale']} classes without a scale (fewer than 2 samples or no spread): "
                  "not ranked, not in Spearman(S, n))")
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------- parser
def _int_at_least(minimum: int, why: str = ""):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}{why}, got {text}")
        return value

    parse.__name__ = "integer"  # argparse's "invalid integer value" for non-numbers
    return parse


_positive_int = _int_at_least(1)


def _add_data_options(p: argparse.ArgumentParser, dataset_default: Optional[str] = "digits-lt") -> None:
    from .features import DATASET_NAMES

    # defaults None: --checkpoint refuses the ones given (its run's config decides them)
    p.add_argument("--dataset", type=lambda t: t.replace("_", "-"), choices=DATASET_NAMES, default=None,
                   help=f"dataset whose train split is analysed (default: {dataset_default or 'none'})")
    p.add_argument("--root", help="data folder (every dataset but digits-lt); nothing is downloaded")
    p.add_argument("--imbalance-factor", type=float, default=None,
                   help="imbalance factor of digits-lt / cifar100-lt (default 10; the built-in "
                        "`pml-dsb bench` run trains digits-lt at 50)")
    p.add_argument("--split", choices=("train", "test"), default=None, help="split (default: train)")
    p.add_argument("--split-seed", type=int, default=None, help="digits-lt's train/test split seed (default 0)")
    p.add_argument("--checkpoint", help="a checkpoint of `pml-dsb bench` (<run>/checkpoints/<method>/seed<k>/"
                                        "best.pt, or a copy of one kept in the run folder): analyse that "
                                        "model's embeddings of the run's train split instead of raw inputs "
                                        "(--root then overrides the run's data folder)")
    p.add_argument("--no-normalize", action="store_true",
                   help="do not L2-normalise vectors before the scale (default: normalise)")
    p.set_defaults(default_dataset=dataset_default, parser=p)


def _check_sources(args) -> None:
    """Usage errors (exit 2 with the usage line) for inputs that would be ignored."""
    ignored = [flag for flag, value in (("--dataset", args.dataset), ("--split", args.split),
                                        ("--split-seed", args.split_seed),
                                        ("--imbalance-factor", args.imbalance_factor)) if value is not None]
    if args.checkpoint and ignored:
        args.parser.error(f"{', '.join(ignored)}: not used with --checkpoint (its run's config gives the "
                          f"dataset and the train split); leave them out")
    name = args.dataset or args.default_dataset
    if args.split_seed is not None and not (args.checkpoint or getattr(args, "run", None)) and name not in (
        None, "digits-lt"
    ):
        args.parser.error(f"--split-seed: applies to digits-lt only ({name} has a fixed split); leave it out")
    if getattr(args, "run", None) and (ignored or args.root or args.checkpoint):
        extra = ignored + (["--root"] if args.root else []) + (["--checkpoint"] if args.checkpoint else [])
        args.parser.error(f"{', '.join(extra)}: not used with --run (the run folder's per_class.csv gives "
                          f"the scales); leave them out")


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``analyze`` with ``marginal``, ``imbalance``, ``manifold`` and ``summary``."""
    parser = subparsers.add_parser(
        "analyze", help="measure semantic scale and test the paper's claims on your data",
        description="Measure semantic scale: marginal effect curves, scale against per-class accuracy "
                    "of a benchmark run, the volume of scaled point clouds, and imbalance summaries. "
                    "Each command writes PNG plots and JSON/CSV of every plotted number to --out.",
    )
    sub = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")

    def common(p, name):
        p.add_argument("--out", help=f"output folder (default: {os.path.join(DEFAULT_OUT, name)})")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("marginal", help="S of random subsets of m samples per class, m = 2..n",
                       description="Marginal effect curves: per class, the mean and std of the semantic "
                                   "scale over --repeats random subsets of each size m, and S at 50 and "
                                   "100 samples as a fraction of S at the full count.")
    _add_data_options(p)
    p.add_argument("--repeats", type=_positive_int, default=10, help="random subsets per size (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets (default 0)")
    p.add_argument("--max-points", type=_int_at_least(2), default=None,
                   help="at most about this many sizes per class, spaced geometrically "
                        "(default: every m = 2..n)")
    p.add_argument("--classes", type=int, nargs="+", help="only these labels")
    common(p, "marginal")
    p.set_defaults(func=_cmd_marginal)

    p = sub.add_parser("imbalance", help="semantic scale vs train count as predictors of per-class Recall@1",
                       description="From a benchmark run folder (per_class.csv, results.json): Spearman and "
                                   "Pearson correlations of semantic scale, train count and log count with "
                                   "per-class Recall@1, bootstrap intervals over classes and over seeds, and "
                                   "which predictor wins by how much.")
    p.add_argument("--run", required=True, help="run folder written by `pml-dsb bench`")
    p.add_argument("--method", nargs="+", help="only these methods (default: all in the run)")
    p.add_argument("--bootstrap", type=_int_at_least(10, " (fewer give no interval)"), default=2000,
                   help="bootstrap replicates, at least 10 (an interval needs 10 defined ones; default 2000)")
    p.add_argument("--confidence", type=float, default=0.95, help="interval coverage (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    common(p, "imbalance")
    p.set_defaults(func=_cmd_imbalance, parser=p)

    p = sub.add_parser("manifold", help="volume of a point cloud scaled by 0.5..4",
                       description="Semantic scale (normalize=False) of point clouds scaled by each factor: "
                                   "scikit-learn's swiss roll and S-curve, or --input .npy (N x 3) / ASCII "
                                   ".ply files. Reports whether it rises monotonically and slowly.")
    p.add_argument("--input", nargs="+", help=".npy or ASCII .ply point clouds (default: swiss roll, S-curve)")
    p.add_argument("--factors", type=float, nargs="+", default=None,
                   help="scale factors (default: 0.5 1 1.5 2 2.5 3 3.5 4)")
    p.add_argument("--points", type=_int_at_least(2), default=2000, help="points of generated clouds (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of generated clouds (default 0)")
    common(p, "manifold")
    p.set_defaults(func=_cmd_manifold, parser=p)

    p = sub.add_parser("summary", help="per-class scales, scale max/min beside count imbalance, ranking",
                       description="Imbalance summary of a dataset's train split (raw inputs or a "
                                   "checkpoint's features) or of a run folder (--run).")
    _add_data_options(p, dataset_default=None)
    p.add_argument("--run", help="run folder written by `pml-dsb bench` (instead of --dataset)")
    p.add_argument("--top", type=_positive_int, default=5, help="classes shown at each end (default 5)")
    common(p, "summary")
    p.set_defaults(func=_check_summary)
    return parser


def _check_summary(args) -> int:
    _check_sources(args)
    if not (args.run or args.dataset or args.checkpoint):
        args.parser.error("give one of --dataset, --checkpoint or --run")
    return _cmd_summary(args)
