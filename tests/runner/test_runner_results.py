"""Run-folder writing from synthetic run results: tables, paired tests, per-class files."""
import csv
import json

import numpy as np
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
    assert "many (1 class)" in md and "Untrained network (epoch 0, mean over runs): R@1 30.00" in md
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


def test_last_epoch_pairs_use_the_last_epoch_figures():
    """The pairs at the last epoch compare last-epoch Recall@1 and give the
    parent's last-epoch spread (the best epoch's was reported)."""
    cfg = config_from_dict({"name": "t", "dataset": {"name": "digits_lt", "imbalance_factor": 10},
                            "methods": ["NSM", "DSB-NSM", "ST", "CB-ST"], "seeds": [0, 1, 2]})
    runs = make_runs()
    for r, last in zip(runs["NSM"], (0.1, 0.3, 0.9)):  # the parent's last epoch differs from its best
        r["last_metrics"]["recall_at_1"] = last
    summary = summarize(cfg, runs, [150, 50, 10, 5])
    pair = summary["paired_last_epoch"]["DSB-NSM"]["recall_at_1"]
    assert summary["per_method"]["NSM"]["last_std"]["recall_at_1"] == pytest.approx(np.std([0.1, 0.3, 0.9], ddof=1))
    assert pair["parent_std"] == pytest.approx(np.std([0.1, 0.3, 0.9], ddof=1))
    assert summary["paired"]["DSB-NSM"]["recall_at_1"]["parent_std"] == pytest.approx(0.1)
    assert pair["p"] == pytest.approx(ttest_rel([0.55, 0.62, 0.78], [0.1, 0.3, 0.9]).pvalue)


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


@pytest.mark.parametrize("first_stage_3, needle", [
    ([5, 5, 6], "it starts within epoch 6 at the latest"),
    ([5, None, 5], "DSB-NSM never reached the weighted stage in some seeds"),
])
def test_the_table_says_when_dsb_weighting_began(first_stage_3, needle):
    # from the epoch histories (dsb_stage at the end of each epoch), not from the config
    cfg = config_from_dict({"name": "t", "dataset": {"name": "digits_lt", "imbalance_factor": 10},
                            "methods": ["NSM", "DSB-NSM", "ST", "CB-ST"], "seeds": [0, 1, 2],
                            "training": {"epochs": 6}})
    runs = make_runs()
    for run, first in zip(runs["DSB-NSM"], first_stage_3):
        run["history"] = [{"epoch": 0}] + [
            {"epoch": e, "dsb_stage": 3 if first is not None and e >= first else 2} for e in range(1, 7)]
    summary = summarize(cfg, runs, [150, 50, 10, 5])
    assert summary["per_method"]["DSB-NSM"]["first_weighted_epoch"] == first_stage_3
    assert "first_weighted_epoch" not in summary["per_method"]["NSM"]
    md = format_table_markdown(summary)
    assert needle in md and ("the last epoch is after it" in md) == (None not in first_stage_3)
    # weighting that began only in the final epoch is said to be partial
    assert ("only the batches after the warm-up were weighted" in md) == (first_stage_3 == [5, 5, 6])


def test_git_revision_only_of_a_repository_that_tracks_the_path(tmp_path):
    import subprocess

    from pml_dsb.runner.results import git_revision

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "own.txt").write_text("a user's project\n")
    git("add", "own.txt")
    git("commit", "-q", "-m", "first")
    # an installed copy inside someone else's repository (a project's virtualenv)
    site = tmp_path / "venv" / "pml_dsb"
    site.mkdir(parents=True)
    (site / "results.py").write_text("# installed\n")
    assert git_revision(site / "results.py") == "unknown" and git_revision(site) == "unknown"
    git("add", "venv")
    git("commit", "-q", "-m", "vendored")
    assert git_revision(site / "results.py") == git("rev-parse", "HEAD")
    (site / "results.py").write_text("# changed\n")
    assert git_revision(site) == git("rev-parse", "HEAD") + "+dirty"
