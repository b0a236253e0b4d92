"""`pml-dsb analyze ...` on tiny data: each command writes its plots, numbers and a table."""
import csv
import json
import sys

import numpy as np
import pytest
import torch

from pml_dsb.cli import main


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_marginal_digits(tmp_path, capsys):
    out = run(["analyze", "marginal", "--dataset", "digits-lt", "--classes", "8", "9", "--repeats", "2",
               "--no-progress", "--out", str(tmp_path)], capsys)
    for name in ("marginal_curves.png", "marginal_curves.csv", "saturation.csv", "marginal.json"):
        assert (tmp_path / name).is_file(), name
    rows = read_csv(tmp_path / "marginal_curves.csv")
    assert {r["class"] for r in rows} == {"8", "9"}  # IF=10: 16 and 12 samples
    assert len(rows) == 15 + 11
    data = json.loads((tmp_path / "marginal.json").read_text())
    assert data["parameters"]["repeats"] == 2 and len(data["curves"]) == 2
    assert "S(50)/S(n)" in out and "S(n) bits" in out


def test_manifold_files_and_builtin(tmp_path, capsys):
    pts = np.random.default_rng(0).normal(size=(50, 3))
    np.save(tmp_path / "blob.npy", pts)
    ply = tmp_path / "blob.ply"
    ply.write_text("ply\nformat ascii 1.0\nelement vertex 50\nproperty double x\nproperty double y\n"
                   "property double z\nend_header\n" + "".join(f"{x!r} {y!r} {z!r}\n" for x, y, z in pts.tolist()))
    out = run(["analyze", "manifold", "--input", str(tmp_path / "blob.npy"), str(ply),
               "--factors", "0.5", "1", "2", "4", "--out", str(tmp_path / "m")], capsys)
    rows = read_csv(tmp_path / "m" / "manifold_volumes.csv")
    assert len(rows) == 8
    vol = {(r["cloud"], float(r["factor"])): float(r["volume_bits"]) for r in rows}
    assert vol[("blob.npy", 2.0)] == pytest.approx(vol[("blob.ply", 2.0)], rel=1e-12)
    assert (tmp_path / "m" / "manifold_volumes.png").is_file()
    assert "blob.npy: monotonic, slow" in out
    out = run(["analyze", "manifold", "--points", "200", "--out", str(tmp_path / "b")], capsys)
    report = json.loads((tmp_path / "b" / "manifold.json").read_text())["reports"]
    assert set(report) == {"swiss_roll", "s_curve"} and all(r["monotonic"] for r in report.values())


def test_summary_dataset(tmp_path, capsys):
    out = run(["analyze", "summary", "--dataset", "digits-lt", "--imbalance-factor", "50", "--out", str(tmp_path)],
              capsys)
    data = json.loads((tmp_path / "summary.json").read_text())
    s = data["summaries"]["digits-lt"]
    assert s["count_imbalance_factor"] == pytest.approx(62.0)  # 124 / 2
    assert len(s["classes"]) == 10 and (tmp_path / "summary_digits-lt.png").is_file()
    assert "scale max/min" in out


def fake_run(folder, with_checkpoint=False, open_set=False):
    """A run folder of two methods, 2 seeds, 8 classes (and a best.pt of an untrained model);
    ``open_set``: test classes unseen in training, as CUB's and Cars196's, without counts."""
    rng = np.random.default_rng(0)
    counts = [124, 80, 52, 34, 22, 14, 9, 6]
    rows = ["method,seed,class,train_count,semantic_scale,scale_source,recall_at_1"]
    for method in ("NSM", "ST"):
        for seed in (0, 1):
            for c, n in enumerate(counts):
                count = "" if open_set else n
                rows.append(f"{method},{seed},{c},{count},{2 + rng.random():.4f},train,{0.5 + 0.004 * n:.3f}")
    folder.mkdir(parents=True)
    (folder / "per_class.csv").write_text("\n".join(rows) + "\n")
    dataset = {"dataset": "cub200"} if open_set else {"dataset": "digits_lt", "imbalance_factor": 50.0}
    (folder / "results.json").write_text(json.dumps(dataset))
    if with_checkpoint:
        from pml_dsb.runner import build_embedding_model, default_config_path, dump_config, load_config
        from pml_dsb.runner.checkpoint import FORMAT_TAG, FORMAT_VERSION, save_checkpoint

        config = load_config(default_config_path())
        (folder / "config.toml").write_text(dump_config(config))
        torch.manual_seed(0)
        model = build_embedding_model(config.model)
        state = {"format": FORMAT_TAG, "version": FORMAT_VERSION, "kind": "best", "method": "NSM", "seed": 0,
                 "epoch": 3, "model": model.state_dict(), "loss": {}, "metrics": {}}
        save_checkpoint(state, folder / "checkpoints" / "NSM" / "seed0" / "best.pt")
    return folder


def test_imbalance_and_summary_from_run(tmp_path, capsys):
    run_dir = fake_run(tmp_path / "run")
    out = run(["analyze", "imbalance", "--run", str(run_dir), "--bootstrap", "200", "--out", str(tmp_path / "i")],
              capsys)
    rows = read_csv(tmp_path / "i" / "correlations.csv")
    assert len(rows) == 2 * 3 * 2  # methods x predictors x (spearman, pearson)
    data = json.loads((tmp_path / "i" / "imbalance.json").read_text())
    comp = data["methods"]["NSM"]["comparison"]["spearman"]
    assert comp["winner"] == "train_count"  # accuracy was made a function of the count
    assert "train count tracks per-class accuracy best" in out
    assert (tmp_path / "i" / "scatter_NSM.png").is_file() and (tmp_path / "i" / "points.csv").is_file()
    run(["analyze", "summary", "--run", str(run_dir), "--out", str(tmp_path / "s")], capsys)
    summ = json.loads((tmp_path / "s" / "summary.json").read_text())["summaries"]
    assert set(summ) == {"NSM", "ST"} and summ["NSM"]["count_imbalance_factor"] == pytest.approx(124 / 6)


def test_a_later_call_into_the_same_folder_leaves_no_plot_of_an_earlier_one(tmp_path, capsys):
    run_dir = fake_run(tmp_path / "run")
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary_notes.txt").write_text("mine")  # not a plot of the command: kept
    (out / "overview.png").write_bytes(b"mine")
    run(["analyze", "summary", "--run", str(run_dir), "--out", str(out)], capsys)
    assert (out / "summary_NSM.png").is_file() and (out / "summary_ST.png").is_file()
    run(["analyze", "summary", "--dataset", "digits-lt", "--out", str(out)], capsys)
    summ = json.loads((out / "summary.json").read_text())["summaries"]
    plots = sorted(p.name for p in out.glob("summary_*.png"))
    assert plots == [f"summary_{key}.png" for key in summ] == ["summary_digits-lt.png"]
    assert (out / "summary_notes.txt").read_text() == "mine" and (out / "overview.png").read_bytes() == b"mine"

    run(["analyze", "imbalance", "--run", str(run_dir), "--bootstrap", "20", "--out", str(out)], capsys)
    run(["analyze", "imbalance", "--run", str(run_dir), "--method", "ST", "--bootstrap", "20", "--out", str(out)],
        capsys)
    methods = set(json.loads((out / "imbalance.json").read_text())["methods"])
    assert sorted(p.name for p in out.glob("scatter_*.png")) == [f"scatter_{m}.png" for m in sorted(methods)]
    assert methods == {"ST"} and (out / "summary_digits-lt.png").is_file()  # another command's plot: kept


def test_marginal_from_checkpoint(tmp_path, capsys):
    run_dir = fake_run(tmp_path / "run", with_checkpoint=True)
    run(["analyze", "marginal", "--checkpoint", str(run_dir / "checkpoints" / "NSM" / "seed0" / "best.pt"),
         "--classes", "7", "--repeats", "2", "--no-progress", "--out", str(tmp_path / "c")], capsys)
    data = json.loads((tmp_path / "c" / "marginal.json").read_text())
    assert data["input"]["method"] == "NSM" and data["input"]["dimension"] == 64
    assert data["curves"][0]["count"] == 6  # class 7 of digits-LT at IF=50


def test_checkpoint_features_come_from_the_files_own_weights(tmp_path):
    """A copy of a checkpoint kept in the run folder (another epoch's weights)
    was reported as that file, yet embedded with the run's best.pt."""
    from pml_dsb.analysis.features import checkpoint_features
    from pml_dsb.datasets import DigitsLT
    from pml_dsb.runner import build_embedding_model, load_config
    from pml_dsb.runner.checkpoint import load_checkpoint, save_checkpoint

    run_dir = fake_run(tmp_path / "run", with_checkpoint=True)
    best = run_dir / "checkpoints" / "NSM" / "seed0" / "best.pt"
    state = load_checkpoint(best)
    torch.manual_seed(1)
    other = build_embedding_model(load_config(run_dir / "config.toml").model).eval()
    state = {**state, "epoch": 1, "model": other.state_dict()}
    kept = best.parent / "epoch1.pt"
    save_checkpoint(state, kept)
    features, labels, info = checkpoint_features(kept)
    assert "epoch1.pt" in info["source"] and "epoch 1" in info["source"]
    # reference: the file's weights applied to the run's train split (digits-LT at IF 50) by hand
    data = DigitsLT(imbalance_factor=50.0, split="train")
    x = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        want = other(x)
    np.testing.assert_allclose(features.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    assert labels.tolist() == [data[i][1] for i in range(len(data))]
    best_features, _, _ = checkpoint_features(best)
    assert not np.allclose(best_features.numpy(), features.numpy(), atol=1e-3)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["analyze", "summary"], "give one of --dataset, --checkpoint or --run"),
        (["analyze", "marginal", "--checkpoint", "x.pt", "--split", "test"], "--split: not used with --checkpoint"),
        (["analyze", "marginal", "--checkpoint", "x.pt", "--dataset", "digits-lt", "--imbalance-factor", "5"],
         "--dataset, --imbalance-factor: not used with --checkpoint"),
        (["analyze", "summary", "--run", "r", "--split-seed", "3"], "--split-seed: not used with --run"),
        # only digits-lt has a seeded split: CUB's was read as given, the seed silently dropped
        (["analyze", "summary", "--dataset", "cub200", "--root", "r", "--split-seed", "3"],
         "--split-seed: applies to digits-lt only (cub200 has a fixed split)"),
        (["analyze", "manifold", "--factors", "1", "1", "2"], "--factors needs at least two distinct values"),
        # one point has no spread: S = 0 at every factor, reported "NOT monotonic"
        (["analyze", "manifold", "--points", "1"], "argument --points: must be an integer >= 2, got 1"),
        (["analyze", "marginal", "--max-points", "1"], "argument --max-points: must be an integer >= 2, got 1"),
    ],
    ids=["no-source", "checkpoint-split", "checkpoint-dataset", "run-split-seed", "cub-split-seed",
         "repeated-factor", "points", "max-points"],
)
def test_inputs_that_would_be_ignored_are_usage_errors(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and words in err and "usage: pml-dsb analyze" in err
    assert not (tmp_path / "out").exists()  # refused before the output folder is made


def test_summary_of_an_open_set_run_says_why_it_cannot(tmp_path, caplog):
    run_dir = fake_run(tmp_path / "run", open_set=True)
    assert main(["analyze", "summary", "--run", str(run_dir), "--out", str(tmp_path / "s")]) == 2
    assert "evaluates classes unseen in training" in caplog.text and "Traceback" not in caplog.text


@pytest.mark.parametrize(
    "argv,words",
    [
        (["marginal", "--dataset", "cub200"], ["ValueError", "needs a data root (--root DIR)"]),
        (["marginal", "--seed", "-1"], ["seed must be an integer >= 0, got -1"]),
        (["imbalance", "--run", "no-such-run"], ["FileNotFoundError", "no per_class.csv"]),
        (["manifold", "--factors", "0", "1"], ["factors must be a non-empty sequence of positive numbers"]),
        (["marginal", "--classes", "3", "99", "--no-progress"], ["--classes [99]: no samples", "labels 0..9"]),
        (["marginal", "--dataset", "cub200", "--root", ".", "--imbalance-factor", "10"],
         ["imbalance_factor applies to the long-tailed datasets, not to 'cub200'"]),
    ],
    ids=["no-root", "seed", "no-run", "factors", "absent-class", "imbalance-factor-cub"],
)
def test_bad_arguments_are_reported_without_a_traceback(tmp_path, caplog, argv, words):
    assert main(["analyze", *argv, "--out", str(tmp_path / "out")]) == 2
    for w in words:
        assert w in caplog.text
    assert "Traceback" not in caplog.text


def test_verbose_lets_the_error_through_with_its_traceback(tmp_path):
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        main(["-v", "analyze", "marginal", "--seed", "-1", "--out", str(tmp_path / "out")])


def test_bootstrap_needs_ten_replicates(tmp_path, capsys):
    run_dir = fake_run(tmp_path / "run")
    with pytest.raises(SystemExit) as info:
        main(["analyze", "imbalance", "--run", str(run_dir), "--bootstrap", "9", "--out", str(tmp_path / "i")])
    assert info.value.code == 2 and "must be an integer >= 10 (fewer give no interval), got 9" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's own wording, not the parser function's name
        main(["analyze", "imbalance", "--run", str(run_dir), "--bootstrap", "x", "--out", str(tmp_path / "i")])
    assert "argument --bootstrap: invalid integer value: 'x'" in capsys.readouterr().err
    run(["analyze", "imbalance", "--run", str(run_dir), "--bootstrap", "10", "--out", str(tmp_path / "i")], capsys)


@pytest.mark.parametrize("argv", [["marginal", "--dataset", "digits-lt", "--repeats", "2", "--no-progress"],
                                  ["manifold", "--factors", "1", "2"]], ids=["marginal", "manifold"])
def test_without_matplotlib_analyze_says_which_extra_before_any_work(tmp_path, caplog, monkeypatch, argv):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError, as when not installed
    assert main(["analyze", *argv, "--out", str(tmp_path / "out")]) == 2
    assert 'pip install matplotlib' in caplog.text and '"pml-dsb[plot]"' in caplog.text
    assert "Traceback" not in caplog.text
    assert not (tmp_path / "out").exists()


def test_a_user_error_names_the_command_line_that_shows_its_traceback(tmp_path, caplog):
    argv = ["analyze", "marginal", "--dataset", "cub200", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "pml-dsb -v analyze ... shows the traceback" in caplog.text and "Traceback" not in caplog.text
    with pytest.raises((OSError, ValueError)):  # -v goes before the command: the error is raised
        main(["-v", *argv])


def test_summary_of_a_run_averages_a_scale_over_the_seeds_that_have_one(tmp_path, capsys):
    """S = 0 (no scale) in one seed was averaged in, halving the class's scale,
    and a class without a row in one seed vanished from the summary."""
    counts = [100, 60, 30, 12, 5, 2]
    scales = {0: [5.0, 4.5, 4.0, 3.0, 2.5, 0.0], 1: [5.1, 4.4, 4.1, 3.1, 2.4, 3.0]}
    rows = ["method,seed,class,train_count,semantic_scale,scale_source,recall_at_1"]
    for seed in (0, 1):
        for c, n in enumerate(counts):
            if not (c == 4 and seed == 1):  # class 4 has no row in seed 1
                rows.append(f"NSM,{seed},{c},{n},{scales[seed][c]},train,0.7")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "per_class.csv").write_text("\n".join(rows) + "\n")
    (folder / "results.json").write_text(json.dumps({"dataset": "digits_lt", "imbalance_factor": 50.0}))
    run(["analyze", "summary", "--run", str(folder), "--out", str(tmp_path / "s")], capsys)
    summ = json.loads((tmp_path / "s" / "summary.json").read_text())["summaries"]["NSM"]
    got = {r["class"]: r["scale"] for r in summ["classes"]}
    want = {0: 5.05, 1: 4.45, 2: 4.05, 3: 3.05, 4: 2.5, 5: 3.0}  # class 5: seed 1 alone; class 4: seed 0 alone
    assert summ["num_classes"] == 6 and got.keys() == want.keys()
    for c in want:
        assert got[c] == pytest.approx(want[c], rel=1e-12)


def test_an_unknown_method_is_refused_before_any_output(tmp_path, capsys):
    # it was found when the loop reached it, after the earlier methods' plots
    run_dir = fake_run(tmp_path / "run")
    with pytest.raises(SystemExit) as info:
        main(["analyze", "imbalance", "--run", str(run_dir), "--method", "NSM", "BOGUS", "--out", str(tmp_path / "o")])
    assert info.value.code == 2 and "--method BOGUS: not in the run (its methods: " in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_clouds_with_the_same_file_name_are_named_by_their_paths(tmp_path, capsys):
    # keyed by file name, the second cloud silently replaced the first
    for i, folder in enumerate(("a", "b")):
        (tmp_path / folder).mkdir()
        np.save(tmp_path / folder / "cloud.npy", np.random.default_rng(i).normal(size=(20, 3)) * (i + 1))
    paths = [str(tmp_path / "a" / "cloud.npy"), str(tmp_path / "b" / "cloud.npy")]
    run(["analyze", "manifold", "--input", *paths, "--factors", "1", "2", "--out", str(tmp_path / "m")], capsys)
    volumes = json.loads((tmp_path / "m" / "manifold.json").read_text())["volumes"]
    assert sorted(volumes) == sorted(paths) and volumes[paths[0]] != volumes[paths[1]]
    with pytest.raises(SystemExit) as info:
        main(["analyze", "manifold", "--input", paths[0], paths[0], "--out", str(tmp_path / "n")])
    assert info.value.code == 2 and "--input names a file twice" in capsys.readouterr().err


def test_manifold_writes_factors_in_increasing_order(tmp_path, capsys, np_ref):
    """``--factors 2 1`` must be reported sorted, each volume beside its own factor:
    written in the given order, the JSON, CSV and plot ran from 2 down to 1."""
    pts = np.random.default_rng(6).normal(size=(30, 3))
    np.save(tmp_path / "c.npy", pts)
    run(["analyze", "manifold", "--input", str(tmp_path / "c.npy"), "--factors", "2", "1", "0.5",
         "--out", str(tmp_path / "m")], capsys)
    data = json.loads((tmp_path / "m" / "manifold.json").read_text())
    assert data["factors"] == [0.5, 1.0, 2.0]
    rows = read_csv(tmp_path / "m" / "manifold_volumes.csv")
    assert [float(r["factor"]) for r in rows] == [0.5, 1.0, 2.0]
    want = [np_ref.semantic_scale(pts * f, normalize=False) for f in (0.5, 1.0, 2.0)]
    np.testing.assert_allclose([float(r["volume_bits"]) for r in rows], want, rtol=1e-10)
    np.testing.assert_allclose(data["volumes"]["c.npy"], want, rtol=1e-10)
    assert data["reports"]["c.npy"]["factor_ratio"] == 4.0


def test_summary_dataset_no_normalize_uses_the_raw_vectors(tmp_path, capsys, np_ref):
    """``--no-normalize`` must reach the scales of ``summary --dataset``: it was
    ignored, every scale computed from L2-normalised pixels."""
    from pml_dsb.datasets import DigitsLT

    run(["analyze", "summary", "--dataset", "digits-lt", "--no-normalize", "--out", str(tmp_path)], capsys)
    rows = json.loads((tmp_path / "summary.json").read_text())["summaries"]["digits-lt"]["classes"]
    got = {r["class"]: r["scale"] for r in rows}
    data = DigitsLT(imbalance_factor=10, split="train")  # the default imbalance factor and seed
    x, y = data.data.reshape(len(data), -1).double().numpy(), np.asarray(data.labels)
    want = np_ref.class_scales(x, y, 10, normalize=False)
    assert sorted(got) == list(range(10))
    np.testing.assert_allclose([got[c] for c in range(10)], want, rtol=1e-4)
    normalized = np_ref.class_scales(x, y, 10, normalize=True)
    assert not np.allclose(want, normalized, rtol=1e-2)


def test_plots_create_their_folder(tmp_path):
    from pml_dsb.analysis.plots import plot_imbalance_summary, plot_manifold_volumes, plot_scale_vs_accuracy

    target = tmp_path / "not" / "there"
    written = [
        plot_manifold_volumes([1, 2], {"blob": [0.5, 1.5]}, target / "a.png"),
        plot_scale_vs_accuracy({"semantic_scale": np.array([1.0, 2.0])}, np.array([0.2, 0.4]),
                               target / "deeper" / "b.png", correlations={"semantic_scale": 1.0}),
        plot_imbalance_summary([{"class": 0, "scale": 1.0, "count": 5}], str(target / "c.png")),
    ]
    assert written == [str(target / "a.png"), str(target / "deeper" / "b.png"), str(target / "c.png")]
    for path in written:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_imbalance_points_are_the_per_class_means_over_the_seeds(tmp_path, capsys):
    """points.csv: each class's scale and Recall@1 averaged over the run's seeds,
    computed here from per_class.csv itself."""
    run_dir = fake_run(tmp_path / "run")
    run(["analyze", "imbalance", "--run", str(run_dir), "--method", "NSM", "--bootstrap", "20",
         "--out", str(tmp_path / "i")], capsys)
    source = [r for r in read_csv(run_dir / "per_class.csv") if r["method"] == "NSM"]
    points = read_csv(tmp_path / "i" / "points.csv")
    assert [int(p["class"]) for p in points] == list(range(8))
    for p in points:
        mine = [r for r in source if r["class"] == p["class"]]
        assert len(mine) == 2  # two seeds
        assert float(p["semantic_scale"]) == pytest.approx(np.mean([float(r["semantic_scale"]) for r in mine]))
        assert float(p["recall_at_1"]) == pytest.approx(np.mean([float(r["recall_at_1"]) for r in mine]))
        assert float(p["train_count"]) == float(mine[0]["train_count"])
