"""Per-class numbers of a finished benchmark run, as plain arrays.

A run folder written by ``pml-dsb bench`` (its contract is the docstring of
:mod:`pml_dsb.runner.results`) holds ``per_class.csv`` (one row per method,
seed and test class: ``method, seed, class, train_count, semantic_scale,
scale_source, recall_at_1``) and ``results.json`` (dataset, imbalance factor,
closed set or not). On closed-set data (digits-LT, CIFAR-100-LT) the scale is
that of the class's *train* features under the best checkpoint; on CUB-200 and
Cars196 the test classes are unseen, ``train_count`` is empty and the scale
comes from the *test* features (``scale_source = "test"``).
:func:`load_run_table` reads them into a :class:`RunTable`: for each
method, (seeds, classes) arrays of semantic scale and Recall@1, NaN where a
value is missing (an empty cell, or a class without an evaluated query).
"""
from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np

from .._json import read_json
from .correlation import scored_classes

logger = logging.getLogger(__name__)

__all__ = ["RunTable", "load_run_table", "PER_CLASS_COLUMNS"]

PER_CLASS_COLUMNS = ("method", "seed", "class", "train_count", "semantic_scale", "recall_at_1")


def _num(text) -> float:
    if text is None:
        return math.nan
    text = str(text).strip()
    if text == "" or text.lower() in ("none", "nan", "null"):
        return math.nan
    return float(text)


@dataclass
class RunTable:
    """Per-class values of one run.

    Attributes:
        path: the run folder.
        dataset: dataset name from ``results.json`` (None if absent).
        imbalance_factor: from ``results.json`` (None if absent or not long-tailed).
        scale_source: ``"train"`` or ``"test"`` features (None if the CSV does not say).
        methods: methods in file order.
        seeds: {method: [seed, ...]} in increasing order.
        classes: (C,) class labels in increasing order.
        train_count: (C,) training samples per class (NaN if not given).
        scale: {method: (seeds, C) semantic scale in bits}.
        accuracy: {method: (seeds, C) per-class Recall@1}.
    """

    path: str
    dataset: Optional[str]
    imbalance_factor: Optional[float]
    scale_source: Optional[str]
    methods: list[str]
    seeds: dict[str, list[int]]
    classes: np.ndarray
    train_count: np.ndarray
    scale: dict[str, np.ndarray] = field(default_factory=dict)
    accuracy: dict[str, np.ndarray] = field(default_factory=dict)

    def complete(self, method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(classes, train_count, scale, accuracy)`` of ``method`` restricted
        to the classes that have a scale (``S > 0``: a 0 means fewer than two
        samples or no spread, "no scale yet") and a Recall@1 in every seed."""
        if method not in self.scale:
            raise KeyError(f"method {method!r} is not in the run (it has {self.methods})")
        s, a = self.scale[method], self.accuracy[method]
        keep = scored_classes(s, a)
        dropped = int((~keep).sum())
        if dropped:
            logger.warning("%s: %d of %d classes lack a scale (S = 0 or missing) or a Recall@1 in some seed; "
                           "left out", method, dropped, len(keep))
        return self.classes[keep], self.train_count[keep], s[:, keep], a[:, keep]


def load_run_table(path: Union[str, os.PathLike]) -> RunTable:
    """Read ``per_class.csv`` (and ``results.json`` if present) of a run folder.

    Raises ``FileNotFoundError`` naming the missing file and ``ValueError``
    for a CSV without the expected columns.
    """
    path = os.fspath(path)
    csv_path = os.path.join(path, "per_class.csv")
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(
            f"no per_class.csv in run folder {path!r} (expected {csv_path!r}, written by `pml-dsb bench`)"
        )
    dataset = factor = None
    results_path = os.path.join(path, "results.json")
    if os.path.isfile(results_path):
        results = read_json(results_path)
        ds = results.get("dataset") if isinstance(results, dict) else None
        dataset = ds.get("name") if isinstance(ds, dict) else ds
        factor = results.get("imbalance_factor") if isinstance(results, dict) else None
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in PER_CLASS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}; found {reader.fieldnames}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{csv_path}: no rows")
    for line, r in enumerate(rows, start=2):  # before any use: float('abc') named no file or line
        for c, parse in (("class", int), ("seed", int), ("train_count", _num), ("semantic_scale", _num),
                         ("recall_at_1", _num)):
            try:
                parse(r[c])
            except (TypeError, ValueError):
                raise ValueError(f"{csv_path}, line {line}: column {c!r}: {r[c]!r} is not a number") from None
    methods: list[str] = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    classes = np.array(sorted({int(r["class"]) for r in rows}), dtype=np.int64)
    col = {c: i for i, c in enumerate(classes)}
    seeds = {m: sorted({int(r["seed"]) for r in rows if r["method"] == m}) for m in methods}
    counts = np.full(len(classes), math.nan)
    scale = {m: np.full((len(seeds[m]), len(classes)), math.nan) for m in methods}
    acc = {m: np.full((len(seeds[m]), len(classes)), math.nan) for m in methods}
    seen = set()
    for r in rows:
        m, j = r["method"], col[int(r["class"])]
        i = seeds[m].index(int(r["seed"]))
        if (m, i, j) in seen:  # e.g. two runs' CSVs concatenated: the later row would win silently
            raise ValueError(f"{csv_path}: more than one row for method {m}, seed {r['seed']}, class {classes[j]}")
        seen.add((m, i, j))
        n = _num(r["train_count"])
        if math.isfinite(n):
            if math.isfinite(counts[j]) and counts[j] != n:
                raise ValueError(f"{csv_path}: class {classes[j]} has train counts {counts[j]:g} and {n:g}")
            counts[j] = n
        scale[m][i, j] = _num(r["semantic_scale"])
        acc[m][i, j] = _num(r["recall_at_1"])
    sources = sorted({r.get("scale_source") or "" for r in rows} - {""})
    if len(sources) > 1:
        raise ValueError(f"{csv_path}: mixed scale_source values {sources}")
    logger.info("run %s: %d methods, %d classes", path, len(methods), len(classes))
    return RunTable(path, dataset, factor, sources[0] if sources else None, methods, seeds, classes, counts,
                    scale, acc)
