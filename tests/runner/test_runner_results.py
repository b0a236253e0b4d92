"""Run-folder writing from synthetic run results: tables, paired tests, per-class files."""
import csv
import json

import pytest
from scipy.stats import ttest_rel

from pml_dsb.runner.config import config_from_dict
from pml_dsb.runner.results import format_table_markdown, paired_test, summarize, write_run_folder


def fake_result(method, seed, r1, num_classes=4, closed=True):
    metrics = {"recall_at_1": r1, "recall_at_2": min(1.0, r1 + 0.05), "recall_at_4": 1.0, "recall_at_8": 1.0,
               "NMI": 0.5 + r1 / 4}
    if closed:
        metrics["groups"] = {g: {"recall_at_1": r1, "num_classes": 1} for g in ("many", "medium", "few")}
    out = {
        "method": method, "seed": seed, "best_epoch": 2, "metrics": metrics,
        "last_metrics": {k: v for k, v in metrics.items() if k != "groups"},
        "init_metrics": {"recall_at_1": 0.3, "recall_at_2": 0.4, "recall_at_4": 0.5, "recall_at_8": 0.6, "NMI": 0.2},
        "per_class_recall_at_1": [r1] * (num_classes - 1) + [None],
        "train_semantic_scales": [1.0 + c for c in range(num_classes)],
    }
    if not closed:
        out["test_semantic_scales"] = [2.0 + c for c in range(num_classes)]
    return out


def make_runs(closed=True):
    r1 = {"NSM": [0.5, 0.6, 0.7], "DSB-NSM": [0.55, 0.62, 0.78], "ST": [0.4, 0.5, 0.6], "CB-ST": [0.4, 0.5, 0.6]}
    return {m: [fake_result(m, s, v, closed=closed) for s, v in zip([0, 1, 2], vals)] for m, vals in r1.items()}


def test_paired_test_matches_scipy():
    a, b = [0.55, 0.62, 0.78], [0.5, 0.6, 0.7]
    res = paired_test(a, b)
    ref = ttest_rel(a, b)
    assert res["t"] == pytest.approx(ref.statistic) and res["p"] == pytest.approx(ref.pvalue)
    assert res["diff_mean"] == pytest.approx(0.05) and res["n"] == 3
    assert res["significant"] == bool(ref.pvalue < 0.05)
    same = paired_test([0.4, 0.5], [0.4, 0.5])
    assert same["p"] is None and same["significant"] is None and same["diff_std"] == 0
    # equal gains over seeds, equal only to rounding (3/500 each): no spread, no test
    # (t came out 1.6e14, p 3.8e-29, "significant")
    gains = paired_test([0.9, 0.8, 0.7], [0.9 - 3 / 500, 0.8 - 3 / 500, 0.7 - 3 / 500])
    assert gains["p"] is None and gains["significant"] is None and gains["diff_mean"] == pytest.approx(0.006)
    with pytest.raises(ValueError):
        paired_test([1, 2], [1])


def test_closed_set_run_folder(tmp_path):
    cfg = config_from_dict({"name": "t", "dataset": {"name": "digits_lt", "imbalance_factor": 10},
                            "methods": ["NSM", "DSB-NSM", "ST", "CB-ST"], "seeds": [0, 1, 2]})
    summary = summarize(cfg, make_runs(), [150, 50, 10, 5])
    assert summary["per_method"]["NSM"]["mean"]["recall_at_1"] == pytest.approx(0.6)
    assert summary["per_method"]["NSM"]["std"]["recall_at_1"] == pytest.approx(0.1)
    assert summary["per_method"]["NSM"]["per_class_recall_at_1_mean"] == pytest.approx([0.6, 0.6, 0.6, None])
    assert set(summary["paired"]) == {"DSB-NSM", "CB-ST"}
    assert summary["paired"]["CB-ST"]["recall_at_1"]["p"] is None  # identical to its parent
    md = format_table_markdown(summary)
    assert "| 10 | NSM | 60.00 ± 10.00 |" in md
    assert "| DSB-NSM | NSM | +5.00 ± 3.00 |" in md
    assert "many (1 classes)" in md and "Untrained network (epoch 0, mean over runs): R@1 30.00" in md
    paths = write_run_folder(tmp_path, cfg, summary)
    assert json.loads(open(paths["results.json"]).read())["paired"]["DSB-NSM"]["parent"] == "NSM"
    with open(paths["per_class.csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 * 3 * 4
    assert rows[0] == {"method": "NSM", "seed": "0", "class": "0", "train_count": "150",
                       "semantic_scale": "1.0", "scale_source": "train", "recall_at_1": "0.5"}
    assert rows[3]["recall_at_1"] == ""  # no evaluated query
    with open(paths["table.csv"]) as fh:
        table = list(csv.DictReader(fh))
    assert float(table[1]["diff_recall_at_1_mean"]) == pytest.approx(0.05)
    assert float(table[1]["p_recall_at_1"]) == pytest.approx(ttest_rel([0.55, 0.62, 0.78], [0.5, 0.6, 0.7]).pvalue)


def test_open_set_run_folder_uses_test_scales(tmp_path):
    cfg = config_from_dict({"name": "cub", "dataset": {"name": "cub200", "root": "x"},
                            "methods": ["NSM", "DSB-NSM", "ST", "CB-ST"], "seeds": [0, 1, 2]})
    summary = summarize(cfg, make_runs(closed=False), [30, 30, 30, 30])
    assert "groups" not in summary["per_method"]["NSM"] and summary["imbalance_factor"] is None
    md = format_table_markdown(summary)
    assert "| Method | R@1 | R@2 | NMI |" in md and "IF" not in md.split("\n")[4]
    paths = write_run_folder(tmp_path, cfg, summary)
    with open(paths["per_class.csv"]) as fh:
        row = next(csv.DictReader(fh))
    assert row["train_count"] == "" and row["scale_source"] == "test" and row["semantic_scale"] == "2.0"
    assert open(paths["per_class_recall.png"], "rb").read(4) == b"\x89PNG"


def test_mismatched_seeds_are_refused():
    cfg = config_from_dict({"dataset": {"name": "digits_lt"}, "methods": ["NSM", "ST"]})
    runs = {"NSM": [fake_result("NSM", 0, 0.5)], "ST": [fake_result("ST", 1, 0.5)]}
    with pytest.raises(ValueError, match="seeds"):
        summarize(cfg, runs, [1, 1, 1, 1])
