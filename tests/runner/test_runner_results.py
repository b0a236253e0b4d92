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


def _digits_config(**training):
    return config_from_dict({"name": "t", "dataset": {"name": "digits_lt", "imbalance_factor": 10},
                             "methods": ["NSM", "DSB-NSM", "ST", "CB-ST"], "seeds": [0, 1, 2],
                             "training": training})


def test_a_zero_spread_is_printed_and_the_last_rows_of_table_csv_hold_the_last_epoch(tmp_path):
    cfg = _digits_config()
    runs = make_runs()
    for r in runs["ST"]:  # the same Recall@1 in every seed: std 0, not "no std"
        r["metrics"]["recall_at_1"] = 0.5
    for r, last in zip(runs["NSM"], (0.1, 0.3, 0.9)):
        r["last_metrics"]["recall_at_1"] = last
    summary = summarize(cfg, runs, [150, 50, 10, 5])
    assert "| 10 | ST | 50.00 ± 0.00 |" in format_table_markdown(summary)
    paths = write_run_folder(tmp_path, cfg, summary)
    with open(paths["table.csv"]) as fh:
        table = list(csv.DictReader(fh))
    best = {r["method"]: r for r in table if r["epoch_selection"] == "best"}
    last = {r["method"]: r for r in table if r["epoch_selection"] == "last"}
    assert set(best) == set(last) == {"NSM", "DSB-NSM", "ST", "CB-ST"}
    assert float(best["NSM"]["recall_at_1_mean"]) == pytest.approx(0.6)
    assert float(last["NSM"]["recall_at_1_mean"]) == pytest.approx(np.mean([0.1, 0.3, 0.9]))
    assert float(last["NSM"]["recall_at_1_std"]) == pytest.approx(np.std([0.1, 0.3, 0.9], ddof=1))
    assert float(best["ST"]["recall_at_1_std"]) == 0.0
    assert float(last["DSB-NSM"]["diff_recall_at_1_mean"]) == pytest.approx(
        np.mean(np.subtract([0.55, 0.62, 0.78], [0.1, 0.3, 0.9])))


def test_per_class_mean_leaves_out_only_the_seeds_without_a_query():
    cfg = _digits_config()
    runs = make_runs()
    runs["NSM"][1]["per_class_recall_at_1"] = [0.6, None, 0.6, None]  # class 1: no query in seed 1 only
    summary = summarize(cfg, runs, [150, 50, 10, 5])
    assert summary["per_method"]["NSM"]["per_class_recall_at_1_mean"] == pytest.approx([0.6, 0.6, 0.6, None])
    assert summary["per_method"]["NSM"]["per_class_recall_at_1_mean"][1] == pytest.approx(np.mean([0.5, 0.7]))


def test_group_sizes_of_table_md_use_the_evaluations_boundaries():
    """many > 100, medium 20..100, few < 20 training samples, as the
    evaluation's groups (checked on the group_recall of a tiny set)."""
    from pml_dsb.evaluation import evaluate_embeddings

    counts = [101, 100, 20, 19]
    x = np.repeat(np.eye(4), 2, axis=0)
    y = np.repeat(np.arange(4), 2)
    groups = evaluate_embeddings(x, y, recall_ks=(1,), nmi=False, train_counts=counts)["groups"]
    want = {g: groups[g]["num_classes"] for g in ("many", "medium", "few")}
    assert want == {"many": 1, "medium": 2, "few": 1}
    cfg = _digits_config()
    md = format_table_markdown(summarize(cfg, make_runs(), counts))
    assert "| Method | many (1 class) | medium (2 classes) | few (1 class) |" in md


def test_the_weighting_note_names_the_latest_start_over_all_dsb_methods():
    cfg = config_from_dict({"name": "t", "dataset": {"name": "digits_lt", "imbalance_factor": 10},
                            "methods": ["NSM", "DSB-NSM", "ST", "DSB-ST"], "seeds": [0, 1, 2],
                            "training": {"epochs": 6}})
    r1 = {"NSM": [0.5, 0.6, 0.7], "DSB-NSM": [0.55, 0.62, 0.78], "ST": [0.4, 0.5, 0.6], "DSB-ST": [0.4, 0.5, 0.6]}
    runs = {m: [fake_result(m, s, v) for s, v in zip([0, 1, 2], vals)] for m, vals in r1.items()}
    for method, firsts in (("DSB-NSM", [5, 6, 5]), ("DSB-ST", [3, 3, 3])):
        for run, first in zip(runs[method], firsts):
            run["history"] = [{"epoch": 0}] + [{"epoch": e, "dsb_stage": 3 if e >= first else 2} for e in range(1, 7)]
    md = format_table_markdown(summarize(cfg, runs, [150, 50, 10, 5]))
    assert "it starts within epoch 6 at the latest" in md
    assert "only the batches after the warm-up were weighted" in md


def test_undefined_values_are_left_out_of_means_and_stds():
    """An empty many/medium/few group has Recall@1 NaN in a fresh run's
    result (null once read back from result.json): left out like null."""
    cfg = _digits_config()
    runs = make_runs()
    runs["NSM"][0]["metrics"]["groups"]["few"]["recall_at_1"] = float("nan")
    runs["NSM"][1]["metrics"]["groups"]["few"]["recall_at_1"] = None
    for r in runs["ST"]:
        r["metrics"]["groups"]["few"]["recall_at_1"] = float("nan")
    runs["CB-ST"][2]["metrics"]["NMI"] = float("nan")
    summary = summarize(cfg, runs, [150, 50, 10, 5])
    few = summary["per_method"]["NSM"]["groups"]["few"]
    assert few["mean"] == pytest.approx(0.7) and few["std"] is None
    assert summary["per_method"]["ST"]["groups"]["few"] == {"mean": None, "std": None, "num_classes": 1}
    nmi = [0.5 + r1 / 4 for r1 in (0.4, 0.5)]
    assert summary["per_method"]["CB-ST"]["mean"]["NMI"] == pytest.approx(np.mean(nmi))
    assert summary["per_method"]["CB-ST"]["std"]["NMI"] == pytest.approx(np.std(nmi, ddof=1))


def test_paired_rows_of_table_md_against_scipy():
    """The paired table's cells, recomputed from the seeds with numpy and
    scipy: signed mean ± sample std of the differences in % points, p with 3
    significant digits, * only when p < 0.05 (one pair below, one above)."""
    cfg = _digits_config()
    r1 = {"NSM": [0.5, 0.6, 0.7], "DSB-NSM": [0.6, 0.71, 0.8], "ST": [0.4, 0.5, 0.6], "CB-ST": [0.33, 0.52, 0.61]}
    runs = {m: [fake_result(m, s, v) for s, v in zip([0, 1, 2], vals)] for m, vals in r1.items()}
    md = format_table_markdown(summarize(cfg, runs, [150, 50, 10, 5]))

    def cells(method, parent):
        a = {"R@1": np.array(r1[method]), "R@2": np.minimum(1, np.array(r1[method]) + 0.05),
             "NMI": 0.5 + np.array(r1[method]) / 4}
        b = {"R@1": np.array(r1[parent]), "R@2": np.minimum(1, np.array(r1[parent]) + 0.05),
             "NMI": 0.5 + np.array(r1[parent]) / 4}
        diffs = [f"{100 * (a[m] - b[m]).mean():+.2f} ± {100 * (a[m] - b[m]).std(ddof=1):.2f}" for m in a]
        ps = [ttest_rel(a[m], b[m]).pvalue for m in a]
        return "| " + " | ".join([method, parent, *diffs, *(f"{p:.3g}" + ("*" if p < 0.05 else "") for p in ps)]) + " |"

    p_dsb, p_cb = ttest_rel(r1["DSB-NSM"], r1["NSM"]).pvalue, ttest_rel(r1["CB-ST"], r1["ST"]).pvalue
    assert p_dsb < 0.05 < p_cb and f"{p_cb:.3g}" != f"{p_cb:.2g}"
    rows = [line for line in md.splitlines() if line.startswith(("| DSB-NSM | NSM |", "| CB-ST | ST |"))]
    assert rows == [cells("DSB-NSM", "NSM"), cells("CB-ST", "ST")] * 2  # best and last epoch (the same here)
    assert "-1.33 ± " in rows[1]  # a negative mean keeps its sign


def test_a_method_whose_parent_did_not_run_has_no_pair():
    cfg = config_from_dict({"name": "t", "dataset": {"name": "digits_lt", "imbalance_factor": 10},
                            "methods": ["DSB-NSM", "ST"], "seeds": [0, 1]})
    runs = {m: [fake_result(m, s, v) for s, v in zip([0, 1], [0.5, 0.6])] for m in ("DSB-NSM", "ST")}
    summary = summarize(cfg, runs, [150, 50, 10, 5])
    assert summary["paired"] == {} and summary["paired_last_epoch"] == {}
    assert "## Paired difference" not in format_table_markdown(summary)


def test_the_untrained_line_is_the_mean_over_all_methods_and_needs_every_method():
    cfg = _digits_config()
    runs = make_runs()
    init_r1 = {"NSM": [0.1, 0.2, 0.3], "DSB-NSM": [0.4, 0.5, 0.6], "ST": [0.2, 0.2, 0.2], "CB-ST": [0.3, 0.1, 0.9]}
    for method, vals in init_r1.items():
        for r, v in zip(runs[method], vals):
            r["init_metrics"]["recall_at_1"] = v
    summary = summarize(cfg, runs, [150, 50, 10, 5])
    want = 100 * np.mean([np.mean(v) for v in init_r1.values()])
    assert f"Untrained network (epoch 0, mean over runs): R@1 {want:.2f}, R@2 40.00, NMI 20.00." in \
        format_table_markdown(summary)
    assert summary["per_method"]["CB-ST"]["init_std"]["recall_at_1"] == pytest.approx(np.std([0.3, 0.1, 0.9], ddof=1))
    # a results.json without one method's untrained figures (an older run): no line rather than a partial mean
    del summary["per_method"]["ST"]["init_mean"]
    assert "Untrained network" not in format_table_markdown(summary)


@pytest.mark.parametrize("imbalance_factor", [1, 10])
def test_an_imbalance_factor_of_1_gives_the_balanced_table_form(imbalance_factor):
    """IF 1 is a balanced set (DatasetConfig.long_tailed): Table 4's form, no IF
    column; the header still names the factor."""
    cfg = config_from_dict({"name": "t", "dataset": {"name": "digits_lt", "imbalance_factor": imbalance_factor},
                            "methods": ["NSM", "DSB-NSM", "ST", "CB-ST"], "seeds": [0, 1, 2]})
    assert cfg.dataset.long_tailed == (imbalance_factor > 1)
    md = format_table_markdown(summarize(cfg, make_runs(), [150, 50, 10, 5]))
    assert md.startswith(f"# t: digits_lt, imbalance factor {imbalance_factor}\n")
    if imbalance_factor == 1:
        assert "(the paper's Table 4 form)" in md and "| NSM | 60.00 ± 10.00 |" in md and "| IF |" not in md
    else:
        assert "(the paper's Table 5 form)" in md and "| 10 | NSM | 60.00 ± 10.00 |" in md
