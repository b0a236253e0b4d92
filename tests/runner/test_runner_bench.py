"""End to end: `pml-dsb bench` on digits-LT writes every output; a resumed run equals an uninterrupted one."""
import csv
import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

from pml_dsb import class_semantic_scales
from pml_dsb.cli import main
from pml_dsb.runner import load_run, train_one
from pml_dsb.runner.checkpoint import CheckpointError, load_checkpoint
from pml_dsb.runner.config import default_config_path, dump_config, load_config
from pml_dsb.runner.methods import METHODS

RUN_FILES = ("config.toml", "environment.json", "results.json", "table.md", "table.csv", "per_class.csv",
             "per_class_recall.png")


def tiny_config(tmp_path, epochs=3, methods=None, **training):
    """The built-in digits-LT config, made small: DSB weights from epoch 2 on."""
    cfg = load_config(default_config_path())
    cfg = dataclasses.replace(
        cfg, name="tiny", methods=methods or list(METHODS), seeds=[0],
        model=dataclasses.replace(cfg.model, width=4, embedding_size=16),
        training=dataclasses.replace(cfg.training, epochs=epochs, **training),
        dsb=dataclasses.replace(cfg.dsb, warmup_epochs=1),
        evaluation=dataclasses.replace(cfg.evaluation, nredo=2),
    )
    path = tmp_path / "tiny.toml"
    path.write_text(dump_config(cfg))
    return str(path), cfg


def bench(config_path, out, *extra):
    return main(["bench", "--config", config_path, "--out", str(out), "--no-progress", *extra])


def test_bench_writes_every_output(tmp_path, capsys):
    config_path, cfg = tiny_config(tmp_path)
    out = tmp_path / "results"
    assert bench(config_path, out, "--seeds", "0") == 0
    run_dir = out / "tiny"
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    for method in METHODS:
        for which in ("last", "best", "result"):
            ext = "json" if which == "result" else "pt"
            assert (run_dir / "checkpoints" / method / "seed0" / f"{which}.{ext}").is_file()
    assert "| 50 | DSB-ST |" in capsys.readouterr().out  # the table is printed

    results = json.loads((run_dir / "results.json").read_text())
    assert results["dataset"] == "digits_lt" and results["imbalance_factor"] == 50
    assert results["train_class_counts"] == [124, 80, 52, 34, 22, 14, 9, 6, 4, 2]
    assert results["methods"] == list(METHODS) and results["seeds"] == [0]
    for method in METHODS:
        entry = results["per_method"][method]
        assert len(entry["runs"]) == 1 and entry["std"]["recall_at_1"] is None  # one seed
        run = entry["runs"][0]
        assert 1 <= run["best_epoch"] <= 3 and 0 < run["metrics"]["recall_at_1"] <= 1
        assert set(run["metrics"]["groups"]) == {"many", "medium", "few"}
        assert len(run["per_class_recall_at_1"]) == 10
    assert set(results["paired"]) == {"CB-NSM", "DSB-NSM", "CB-ST", "DSB-ST"}
    assert results["paired"]["DSB-ST"]["parent"] == "ST"
    assert results["paired"]["DSB-ST"]["recall_at_1"]["p"] is None  # n/a with one seed

    # DSB reached stage 3 (weighted losses) in this short run
    for method in ("DSB-NSM", "DSB-ST"):
        result = json.loads((run_dir / "checkpoints" / method / "seed0" / "result.json").read_text())
        assert result["history"][0]["epoch"] == 0  # the untrained network
        assert result["history"][-1]["dsb_stage"] == 3

    table = (run_dir / "table.md").read_text()
    assert "| IF | Method | R@1 | R@2 | NMI |" in table and "n/a" in table and "few (5 classes)" in table
    with open(run_dir / "table.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == list(METHODS) * 2
    assert rows[0]["epoch_selection"] == "best" and rows[0]["recall_at_1_std"] == ""
    assert (run_dir / "per_class_recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    env = json.loads((run_dir / "environment.json").read_text())
    for key in ("torch", "pytorch_metric_learning", "faiss", "numpy", "sklearn", "pml_dsb"):
        assert env["versions"][key], key
    assert isinstance(env["git_revision"], str) and env["git_revision"]
    assert env["seeds"] == [0] and env["config"]["training"]["epochs"] == 3 and env["wall_seconds"] > 0

    # per_class.csv: scales of the train features of the best checkpoint, rebuilt through load_run
    with open(run_dir / "per_class.csv") as fh:
        per_class = list(csv.DictReader(fh))
    assert len(per_class) == 6 * 10
    assert {r["scale_source"] for r in per_class} == {"train"}
    loaded = load_run(run_dir)
    assert loaded.config == cfg and loaded.results == results
    features, labels = loaded.train_features("DSB-ST", 0)
    scales = class_semantic_scales(features, labels, 10)
    expected = [float(r["semantic_scale"]) for r in per_class if r["method"] == "DSB-ST"]
    np.testing.assert_allclose(scales.numpy(), expected, rtol=1e-6)
    assert [int(r["train_count"]) for r in per_class if r["method"] == "DSB-ST"] == results["train_class_counts"]

    # a second run into the same folder must not silently overwrite the first
    assert bench(config_path, out, "--seeds", "0") == 2


@pytest.mark.parametrize("module,extra", [("matplotlib", "plot"), ("faiss", "cpu")])
def test_a_missing_extra_stops_bench_before_training_with_its_pip_command(tmp_path, monkeypatch, caplog, module,
                                                                         extra):
    """Once the per-class plot came after every run had trained, and crashed
    with a traceback over a half-written run folder."""
    config_path, _ = tiny_config(tmp_path)
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, as when not installed
    trained = []
    monkeypatch.setattr("pml_dsb.runner.bench.train_one", lambda *a, **k: trained.append(a))
    assert bench(config_path, tmp_path / "out") == 2
    assert f'"pml-dsb[{extra}]"' in caplog.text and f'pip install -e ".[{extra}]"' in caplog.text
    assert "Traceback" not in caplog.text
    assert trained == [] and not (tmp_path / "out").exists()


def test_missing_data_and_missing_pretrained_weights_are_named_together(tmp_path, monkeypatch, caplog):
    """The weights were checked after the data: a machine lacking both learned of
    the weights only after placing the data."""
    import os

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))  # no cached ImageNet weights
    config = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "configs", "cub200_dim64.toml")
    (tmp_path / "no_data").mkdir()
    argv = ["bench", "--config", config, "--data-root", str(tmp_path / "no_data"), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "CUB_200_2011/images.txt' was not found" in caplog.text
    assert "no ImageNet weights for resnet50 in the torch hub cache" in caplog.text
    assert not (tmp_path / "out").exists()


def test_a_diverging_run_ends_with_a_message_not_a_traceback(tmp_path, monkeypatch, caplog):
    config_path, _ = tiny_config(tmp_path, epochs=1, methods=["NSM"])

    def diverge(*args, **kwargs):
        raise FloatingPointError("NSM seed 0, epoch 1: the loss is nan at batch 3; training diverged")

    monkeypatch.setattr("pml_dsb.runner.bench.train_one", diverge)
    assert bench(config_path, tmp_path / "out") == 1
    assert "training diverged. Lower [training] lr or loss_lr" in caplog.text and "Traceback" not in caplog.text


def _model_state(path):
    state = load_checkpoint(path)
    return state["model"], state["loss"], state["optimizers"]


def _assert_states_equal(a, b):
    for x, y in zip(_model_state(a), _model_state(b)):
        assert x.keys() == y.keys()
        for k in x:
            if torch.is_tensor(x[k]):
                assert torch.equal(x[k], y[k]), k
            else:
                assert repr(x[k]) == repr(y[k]), k


def test_resumed_run_equals_the_uninterrupted_one(tmp_path):
    config_path, _ = tiny_config(tmp_path, epochs=4, methods=["NSM", "DSB-ST"])
    whole, killed, extended = tmp_path / "whole", tmp_path / "killed", tmp_path / "extended"
    assert bench(config_path, whole) == 0

    # killed after epoch 2: checkpoints but no tables; then resumed
    assert bench(config_path, killed, "--stop-after-epoch", "2") == 0
    assert not (killed / "tiny" / "results.json").exists()
    assert load_checkpoint(killed / "tiny" / "checkpoints" / "DSB-ST" / "seed0" / "last.pt")["epoch"] == 2
    assert bench(config_path, killed, "--resume") == 0

    # run for fewer epochs first, then resumed with more
    assert bench(config_path, extended, "--epochs", "2") == 0
    assert bench(config_path, extended, "--resume") == 0

    expected = json.loads((whole / "tiny" / "results.json").read_text())
    for other in (killed, extended):
        assert json.loads((other / "tiny" / "results.json").read_text()) == expected
        assert (other / "tiny" / "per_class.csv").read_text() == (whole / "tiny" / "per_class.csv").read_text()
        for method in ("NSM", "DSB-ST"):
            for which in ("last.pt", "best.pt"):
                if which == "best.pt":
                    a = load_checkpoint(whole / "tiny" / "checkpoints" / method / "seed0" / which)
                    b = load_checkpoint(other / "tiny" / "checkpoints" / method / "seed0" / which)
                    assert a["epoch"] == b["epoch"]
                    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
                else:
                    _assert_states_equal(whole / "tiny" / "checkpoints" / method / "seed0" / which,
                                         other / "tiny" / "checkpoints" / method / "seed0" / which)

    # resuming with other settings is refused
    (tmp_path / "other").mkdir()
    other_path, _ = tiny_config(tmp_path / "other", epochs=4, methods=["NSM", "DSB-ST"], lr=0.5)
    assert bench(other_path, killed, "--resume") == 2


def test_a_cosine_schedule_resumes_only_over_its_own_epochs(tmp_path, caplog):
    """A cosine schedule spans the planned epochs: resumed with more, the
    learning rate would climb back up (T_max stayed the old epochs), unlike
    in an uninterrupted run over the new epochs."""
    _, cfg = tiny_config(tmp_path, epochs=2, methods=["NSM"], lr_schedule="cosine")
    train_one(cfg, "NSM", 0, out_dir=tmp_path / "run", progress=False, stop_after_epoch=1)
    longer = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, epochs=3))
    with pytest.raises(CheckpointError, match="lr_schedule = 'cosine' spans epochs=2, this config has epochs=3"):
        train_one(longer, "NSM", 0, out_dir=tmp_path / "run", progress=False, resume=True)
    whole = train_one(cfg, "NSM", 0, out_dir=tmp_path / "whole", progress=False)
    resumed = train_one(cfg, "NSM", 0, out_dir=tmp_path / "run", progress=False, resume=True)
    for r in (whole, resumed):
        r.pop("train_seconds")
    assert resumed == whole  # over its own epochs it resumes as before


def test_an_epoch_that_only_ties_the_best_recall_is_not_the_best(tmp_path, monkeypatch):
    """best.pt is written when Recall@1 improves strictly: with the same R@1
    every epoch, the first epoch stays the best."""
    import pml_dsb.runner.training as training

    _, cfg = tiny_config(tmp_path, epochs=3, methods=["NSM"])
    real = training.evaluate_model
    monkeypatch.setattr(training, "evaluate_model", lambda *a, **k: {**real(*a, **k), "recall_at_1": 0.5})
    result = train_one(cfg, "NSM", 0, out_dir=tmp_path / "run", progress=False)
    assert result["best_epoch"] == 1 and result["metrics"]["recall_at_1"] == 0.5


def _folder_bytes(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_deletes_nothing_when_a_check_fails(tmp_path, caplog):
    """--overwrite once deleted the previous run before the config was checked
    against the data: a refused run left nothing of either."""
    config_path, _ = tiny_config(tmp_path, epochs=1, methods=["NSM"])
    out = tmp_path / "results"
    assert bench(config_path, out) == 0
    before = _folder_bytes(out / "tiny")
    assert (out / "tiny" / "results.json").is_file()
    (tmp_path / "bad").mkdir()
    bad_path, _ = tiny_config(tmp_path / "bad", epochs=1, methods=["NSM"], sampler="m_per_class", m_per_class=2,
                              batch_size=64)
    assert bench(bad_path, out, "--overwrite") == 2
    assert "m_per_class" in caplog.text
    assert _folder_bytes(out / "tiny") == before


def test_recall_ks_beyond_the_test_set_is_refused_before_the_run_folder_is_written(tmp_path, caplog):
    # found at the first evaluation, with config.toml and environment.json written:
    # the corrected config was then refused as "already holds a run"
    _, cfg = tiny_config(tmp_path, epochs=1, methods=["NSM"])
    cfg = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, recall_ks=[1, 2, 1000]))
    path = tmp_path / "far.toml"
    path.write_text(dump_config(cfg))
    out = tmp_path / "results"
    assert bench(str(path), out) == 2
    assert "recall_ks asks for k = 1000 neighbours" in caplog.text and "Traceback" not in caplog.text
    assert not (out / "tiny").exists()


@pytest.mark.parametrize("case", ["epochs-beyond", "cosine-over-other-epochs", "other-settings"])
def test_a_refused_resume_writes_nothing(tmp_path, caplog, monkeypatch, case):
    """The checks of last.pt once ran in train_one, after config.toml and
    environment.json had been rewritten with the refused settings."""
    schedule = "cosine" if case == "cosine-over-other-epochs" else "constant"
    config_path, _ = tiny_config(tmp_path, epochs=3, methods=["NSM"], lr_schedule=schedule)
    out = tmp_path / "results"
    assert bench(config_path, out, "--stop-after-epoch", "2") == 0
    extra = {"epochs-beyond": ["--epochs", "1"], "cosine-over-other-epochs": ["--epochs", "4"]}.get(case, [])
    if case == "other-settings":  # config.toml matches this config; last.pt was written with other settings
        ckpt = out / "tiny" / "checkpoints" / "NSM" / "seed0" / "last.pt"
        state = torch.load(ckpt, weights_only=True)
        state["config"]["training"]["lr"] = 123.0
        torch.save(state, ckpt)
    before = _folder_bytes(out / "tiny")
    trained = []
    monkeypatch.setattr("pml_dsb.runner.bench.train_one", lambda *a, **k: trained.append(a))
    assert bench(config_path, out, "--resume", *extra) == 2
    words = {"epochs-beyond": "already at epoch 2, beyond this config's epochs=1",
             "cosine-over-other-epochs": "spans epochs=3, this config has epochs=4",
             "other-settings": "written with other settings"}[case]
    assert words in caplog.text
    assert trained == []
    assert _folder_bytes(out / "tiny") == before


def test_a_fifo_run_saved_with_the_training_set_as_m_is_not_reused(tmp_path):
    """With drop_last a first-in-first-out DSB memory holds what one epoch yields
    (320 of digits-LT's 347 samples at batch 64); a run saved when M was the
    training-set size must not be read back beside the new ones."""
    _, cfg = tiny_config(tmp_path, epochs=1, methods=["DSB-NSM"], drop_last=True, batch_size=64)
    cfg = dataclasses.replace(cfg, dsb=dataclasses.replace(cfg.dsb, index_addressed=False))
    train_one(cfg, "DSB-NSM", 0, out_dir=tmp_path / "r", progress=False)
    path = tmp_path / "r" / "checkpoints" / "DSB-NSM" / "seed0" / "result.json"
    saved = json.loads(path.read_text())
    assert saved["compatibility_key"]["dsb_fifo_memory_size"] == "samples per epoch"
    assert load_checkpoint(path.parent / "last.pt")["loss"]["memory.embedding_memory"].shape[0] == 320
    del saved["compatibility_key"]["dsb_fifo_memory_size"]  # as the older release wrote it
    saved["read back"] = True
    path.write_text(json.dumps(saved))
    assert "read back" not in train_one(cfg, "DSB-NSM", 0, out_dir=tmp_path / "r", progress=False, resume=True)


def test_resume_with_the_m_per_class_sampler(tmp_path):
    """PML's MPerClassSampler draws from numpy's global RNG and keeps a shuffled class order."""
    _, cfg = tiny_config(tmp_path, epochs=3, methods=["DSB-NSM"], sampler="m_per_class", batch_size=40)
    whole = train_one(cfg, "DSB-NSM", 1, out_dir=tmp_path / "a", progress=False)
    assert train_one(cfg, "DSB-NSM", 1, out_dir=tmp_path / "b", progress=False, stop_after_epoch=1) is None
    resumed = train_one(cfg, "DSB-NSM", 1, out_dir=tmp_path / "b", progress=False, resume=True)
    for r in (whole, resumed):
        r.pop("train_seconds")
    assert resumed == whole
    _assert_states_equal(tmp_path / "a" / "checkpoints" / "DSB-NSM" / "seed1" / "last.pt",
                         tmp_path / "b" / "checkpoints" / "DSB-NSM" / "seed1" / "last.pt")


def test_runs_leave_the_callers_rng_alone(tmp_path):
    _, cfg = tiny_config(tmp_path, epochs=1, methods=["NSM"])
    torch.manual_seed(123)
    np.random.seed(123)
    expected = (torch.rand(2), np.random.rand(2))
    torch.manual_seed(123)
    np.random.seed(123)
    train_one(cfg, "NSM", 0, out_dir=tmp_path, progress=False)
    assert torch.equal(torch.rand(2), expected[0]) and np.array_equal(np.random.rand(2), expected[1])


def test_json_outputs_are_strict_json(tmp_path):
    """NaN (an empty many/medium/few group's Recall@1) was written as a bare
    NaN token, which strict parsers refuse."""
    from pml_dsb.runner.training import write_json_atomic

    path = tmp_path / "r.json"
    write_json_atomic({"groups": {"few": {"recall_at_1": float("nan")}}, "v": [1.5, float("inf"), np.float64("nan")]},
                      path)

    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {"groups": {"few": {"recall_at_1": None}},
                                                                  "v": [1.5, None, None]}


def test_train_seconds_leave_out_the_evaluation(tmp_path, monkeypatch):
    """The per-epoch evaluation (faiss k-means restarts) costs every method
    alike and once diluted DSB's training-cost ratio against its parent."""
    import pml_dsb.runner.training as training

    class Clock:  # evaluation takes 1000 s of this clock, training none
        now = 0.0

        def perf_counter(self):
            return self.now

    clock = Clock()
    evaluate = training.evaluate_model

    def slow_evaluate(*args, **kwargs):
        clock.now += 1000.0
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(training, "time", clock)
    monkeypatch.setattr(training, "evaluate_model", slow_evaluate)
    _, cfg = tiny_config(tmp_path, epochs=2, methods=["NSM"])
    result = train_one(cfg, "NSM", 0, out_dir=tmp_path / "run", progress=False)
    assert clock.now >= 3000.0 and result["train_seconds"] == 0.0


def test_train_one_refuses_an_m_per_class_sampler_that_cannot_fill_a_batch(tmp_path):
    """PML's MPerClassSampler only asserts it: under python -O batches repeated samples."""
    from pml_dsb.runner.config import ConfigError

    _, cfg = tiny_config(tmp_path, epochs=1, methods=["NSM"], sampler="m_per_class", m_per_class=2, batch_size=64)
    with pytest.raises(ConfigError, match="m_per_class = 2 samples of each of 10 classes: at most 20"):
        train_one(cfg, "NSM", 0, out_dir=tmp_path / "run", progress=False)


@pytest.mark.parametrize("case", ["resnet-on-digits", "fifo-memory-below-batch"])
def test_configs_that_fail_at_their_first_batch_are_refused_before_anything_is_written(tmp_path, caplog, case):
    """A ResNet given 1-channel digits failed at the first evaluation, and a
    first-in-first-out memory smaller than a batch at the first DSB batch
    (after NSM had trained): both left a run folder a rerun refused."""
    _, cfg = tiny_config(tmp_path, epochs=1, methods=["NSM", "DSB-NSM"])
    if case == "resnet-on-digits":
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name="resnet18", width=None))
        words = "[model] name = 'resnet18' cannot embed [dataset] name = 'digits_lt' images (shape (1, 8, 8))"
    else:
        cfg = dataclasses.replace(cfg, dsb=dataclasses.replace(cfg.dsb, index_addressed=False, memory_size=5))
        words = "[dsb] memory_size = 5 is smaller than [training] batch_size = 64"
    path = tmp_path / "bad.toml"
    path.write_text(dump_config(cfg))
    assert bench(str(path), tmp_path / "out") == 2
    assert words in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "out" / "tiny").exists()


@pytest.mark.parametrize("content", ['{"epochs": 1, "compat', "[1, 2]"], ids=["truncated", "not-an-object"])
def test_an_unreadable_result_json_is_named_on_resume(tmp_path, caplog, content):
    # a bare JSONDecodeError named no file; a list raised AttributeError
    config_path, _ = tiny_config(tmp_path, epochs=1, methods=["NSM"])
    out = tmp_path / "results"
    assert bench(config_path, out) == 0
    result = out / "tiny" / "checkpoints" / "NSM" / "seed0" / "result.json"
    result.write_text(content)
    assert bench(config_path, out, "--resume") == 2
    assert str(result) in caplog.text and "delete it to train this run again" in caplog.text
    assert "Traceback" not in caplog.text


def test_a_resume_removes_the_previous_summary_until_it_writes_its_own(tmp_path):
    # stopped before its end, a resume with more epochs left the old tables beside the new config.toml
    config_path, _ = tiny_config(tmp_path, epochs=1, methods=["NSM"])
    out = tmp_path / "results"
    assert bench(config_path, out) == 0
    assert bench(config_path, out, "--resume", "--epochs", "3", "--stop-after-epoch", "2") == 0
    assert load_config(out / "tiny" / "config.toml").training.epochs == 3
    assert not any((out / "tiny" / name).exists() for name in RUN_FILES if name not in ("config.toml", "environment.json"))
    assert bench(config_path, out, "--resume", "--epochs", "3") == 0
    assert json.loads((out / "tiny" / "results.json").read_text())["epochs"] == 3


@pytest.mark.parametrize("device", ["cuda:99", "xpu", "meta"])
def test_a_device_this_machine_lacks_is_refused_before_anything_is_written(tmp_path, caplog, device):
    # run_benchmark wrote config.toml and environment.json, then torch failed, and a rerun was refused
    # (only CUDA was checked: xpu failed with an AssertionError, meta at its first copy)
    from pml_dsb.runner.bench import run_benchmark

    if device == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():  # torch.xpu: torch >= 2.3
        pytest.skip("this machine has an xpu device")  # never on CI's CPU machines
    _, cfg = tiny_config(tmp_path, epochs=1, methods=["NSM"])
    with pytest.raises(ValueError, match=f"device '{device}'"):
        run_benchmark(cfg, tmp_path / "out", device=device, progress=False)
    with pytest.raises(ValueError, match=f"device '{device}'"):
        train_one(cfg, "NSM", 0, device=device, out_dir=tmp_path / "one", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "one").exists()
    config_path, _ = tiny_config(tmp_path, epochs=1, methods=["NSM"])
    assert main(["bench", "--config", config_path, "--out", str(tmp_path / "cli"), "--device", device]) == 2
    assert f"--device: device '{device}'" in caplog.text and not (tmp_path / "cli").exists()


def test_a_run_killed_between_writing_best_pt_and_last_pt_resumes_to_the_uninterrupted_result(tmp_path):
    """best.pt is written before last.pt: a kill between the two left a best.pt one
    epoch past last.pt, and the resume refused the run ("records its best epoch as ...")."""
    config_path, _ = tiny_config(tmp_path, epochs=3, methods=["NSM"])
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert bench(config_path, straight) == 0
    run = killed / "tiny" / "checkpoints" / "NSM" / "seed0"
    assert bench(config_path, killed, "--stop-after-epoch", "1") == 0
    after_1 = (run / "last.pt").read_bytes()
    assert bench(config_path, killed, "--resume", "--stop-after-epoch", "2") == 0
    assert torch.load(run / "best.pt", weights_only=False)["epoch"] == 2  # precondition: epoch 2 improved
    (run / "last.pt").write_bytes(after_1)  # as the kill left it: best.pt of epoch 2, last.pt of epoch 1
    assert bench(config_path, killed, "--resume") == 0
    want = json.loads((straight / "tiny" / "checkpoints" / "NSM" / "seed0" / "result.json").read_text())
    got = json.loads((run / "result.json").read_text())
    assert got["best_epoch"] == want["best_epoch"] and got["metrics"] == want["metrics"]
    assert got["history"] == want["history"] and got["train_semantic_scales"] == want["train_semantic_scales"]


@pytest.mark.parametrize("case", ["best-of-another-method", "result-without-metrics", "result-of-another-seed"])
def test_a_resume_checks_best_pt_and_result_json_before_anything_changes(tmp_path, caplog, case):
    """best.pt was read only at the end of the resumed training (after last.pt and
    environment.json had been rewritten); a result.json lacking a key failed in
    the summary with a bare KeyError, after the old tables had been deleted."""
    config_path, _ = tiny_config(tmp_path, epochs=2, methods=["NSM", "DSB-NSM"])
    out = tmp_path / "results"
    if case == "best-of-another-method":
        assert bench(config_path, out, "--stop-after-epoch", "1") == 0
    else:
        assert bench(config_path, out) == 0
    runs = out / "tiny" / "checkpoints"
    if case == "best-of-another-method":
        (runs / "NSM" / "seed0" / "best.pt").write_bytes((runs / "DSB-NSM" / "seed0" / "best.pt").read_bytes())
        words = "checkpoint of method 'DSB-NSM', expected 'NSM'"
    else:
        path = runs / "NSM" / "seed0" / "result.json"
        result = json.loads(path.read_text())
        if case == "result-without-metrics":
            del result["metrics"]
            words = "lacks metrics; delete it to train this run again"
        else:
            result["seed"] = 7
            words = "the result of NSM seed 7, expected NSM seed 0"
        path.write_text(json.dumps(result))
    before = _folder_bytes(out / "tiny")
    assert bench(config_path, out, "--resume") == 2
    assert words in caplog.text and "Traceback" not in caplog.text
    assert _folder_bytes(out / "tiny") == before


def test_no_progress_reaches_the_benchmark(tmp_path, monkeypatch):
    """--no-progress hides the progress bars (logs of batch jobs stay readable); without it they show."""
    seen = []
    monkeypatch.setattr("pml_dsb.runner.bench.run_benchmark", lambda config, **kw: seen.append(kw["progress"]))
    config_path, _ = tiny_config(tmp_path, epochs=1, methods=["NSM"])
    assert bench(config_path, tmp_path / "out") == 0
    assert main(["bench", "--config", config_path, "--out", str(tmp_path / "out")]) == 0
    assert seen == [False, True]


def test_the_train_split_for_semantic_scales_of_an_image_dataset_is_not_augmented(tmp_path, monkeypatch):
    """The semantic scales of the train features are measured on train_eval: random crops and
    flips there would make them depend on the draw. The training view keeps its augmentation."""
    import pml_dsb.datasets
    from pml_dsb.datasets import default_transform
    from pml_dsb.runner.builders import build_run_data
    from pml_dsb.runner.config import config_from_dict

    class FakeCUB:  # the CUB200 signature, no files
        def __init__(self, root, split, transform):
            self.split, self.transform = split, transform

        def class_counts(self):
            return [2, 1]

    monkeypatch.setattr(pml_dsb.datasets, "CUB200", FakeCUB)
    cfg = config_from_dict({"dataset": {"name": "cub200", "root": str(tmp_path)}, "model": {"name": "resnet18"}})
    data = build_run_data(cfg)
    assert (data.train.split, data.train_eval.split, data.test.split) == ("train", "train", "test")
    assert repr(data.train_eval.transform) == repr(default_transform("cub200", "test"))
    assert repr(data.test.transform) == repr(default_transform("cub200", "test"))
    assert repr(data.train.transform) == repr(default_transform("cub200", "train"))
    assert repr(data.train.transform) != repr(data.train_eval.transform)  # precondition: they differ


def test_recall_k_up_to_the_test_items_less_one_is_accepted_and_no_further(tmp_path):
    """Each test query is ranked against the other len(test) - 1 items: k = len(test) failed at the first
    evaluation, after the run folder was written."""
    from pml_dsb.runner.bench import _check_against_data
    from pml_dsb.runner.builders import build_run_data
    from pml_dsb.runner.config import ConfigError

    _, cfg = tiny_config(tmp_path, epochs=1, methods=["NSM"])
    data = build_run_data(cfg)
    n = len(data.test)

    def with_ks(ks):
        return dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, recall_ks=ks))

    _check_against_data(with_ks([1, 2, n - 1]), data)
    with pytest.raises(ConfigError, match=f"asks for k = {n} neighbours, but each query of the {n} test items "
                                          f"has {n - 1} others"):
        _check_against_data(with_ks([1, 2, n]), data)


def test_runtime_num_threads_of_one_is_applied_and_undone(monkeypatch):
    """num_threads = 1 is the default [runtime] setting (reproducible timings): only 0 leaves
    the libraries' defaults."""
    from pml_dsb.runner.bench import configure_runtime
    from pml_dsb.runner.config import RuntimeConfig

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with configure_runtime(RuntimeConfig(num_threads=1, deterministic=False)):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with configure_runtime(RuntimeConfig(num_threads=0, deterministic=False)):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_train_loss_is_the_mean_of_the_epochs_batch_losses(tmp_path, monkeypatch):
    import pml_dsb.runner.training as training

    seen = []
    real = training.build_loss

    def recording_loss(*args, **kwargs):
        loss = real(*args, **kwargs)
        loss.register_forward_hook(lambda module, inputs, output: seen.append(float(output.detach())))
        return loss

    monkeypatch.setattr(training, "build_loss", recording_loss)
    _, cfg = tiny_config(tmp_path, epochs=2, methods=["NSM"])
    history = train_one(cfg, "NSM", 0, out_dir=tmp_path / "run", progress=False)["history"]
    sizes = [h["iterations"] for h in history[1:]]
    assert len(seen) == sum(sizes) and min(sizes) > 1
    for h, losses in zip(history[1:], (seen[:sizes[0]], seen[sizes[0]:])):
        assert h["train_loss"] == pytest.approx(np.mean(losses), rel=1e-12)


def test_a_resumed_run_keeps_the_training_time_of_its_first_part(tmp_path, monkeypatch):
    import pml_dsb.runner.training as training

    class Clock:  # every reading is 10 s after the previous one: 10 s of training per epoch
        now = 0.0

        def perf_counter(self):
            self.now += 10.0
            return self.now

    monkeypatch.setattr(training, "time", Clock())
    _, cfg = tiny_config(tmp_path, epochs=2, methods=["NSM"])
    whole = train_one(cfg, "NSM", 0, out_dir=tmp_path / "whole", progress=False)
    assert train_one(cfg, "NSM", 0, out_dir=tmp_path / "run", progress=False, stop_after_epoch=1) is None
    resumed = train_one(cfg, "NSM", 0, out_dir=tmp_path / "run", progress=False, resume=True)
    assert whole["train_seconds"] == resumed["train_seconds"] == 20.0


def test_stop_after_the_last_epoch_is_a_finished_run(tmp_path):
    _, cfg = tiny_config(tmp_path, epochs=2, methods=["NSM"])
    result = train_one(cfg, "NSM", 0, out_dir=tmp_path / "run", progress=False, stop_after_epoch=2)
    assert result is not None and result["best_epoch"] in (1, 2)
    written = json.loads((tmp_path / "run" / "checkpoints" / "NSM" / "seed0" / "result.json").read_text())
    assert written["epochs"] == 2 and written["best_epoch"] == result["best_epoch"]


def test_init_metrics_are_those_of_the_untrained_network(tmp_path):
    from pml_dsb.runner.builders import build_embedding_model, build_run_data
    from pml_dsb.runner.training import evaluate_model, seeded_rng

    _, cfg = tiny_config(tmp_path, epochs=2, methods=["NSM"])
    result = train_one(cfg, "NSM", 3, out_dir=tmp_path / "run", progress=False)
    with seeded_rng(3):  # the model train_one builds first under the run's seed
        model = build_embedding_model(cfg.model)
    untrained = evaluate_model(model, build_run_data(cfg), cfg, torch.device("cpu"))
    assert set(result["init_metrics"]) == {"recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "NMI",
                                           "recall_at_1_many", "recall_at_1_medium", "recall_at_1_few"}
    for key in ("recall_at_1", "recall_at_2", "NMI"):
        assert result["init_metrics"][key] == pytest.approx(untrained[key], abs=1e-12)


def test_embed_puts_the_models_mode_back(tmp_path):
    from pml_dsb.runner.training import embed

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5))
    data = torch.utils.data.TensorDataset(torch.randn(10, 4), torch.arange(10) % 2)
    for training_mode in (False, True):
        model.train(training_mode)
        emb, labels = embed(model, data, 4, torch.device("cpu"))
        assert model.training is training_mode
        with torch.no_grad():  # embedded in eval mode: no dropout
            torch.testing.assert_close(emb, model[0](data.tensors[0]))
        assert labels.tolist() == (torch.arange(10) % 2).tolist()


def test_a_run_killed_after_its_last_epoch_but_before_its_result_json_resumes_to_that_result(tmp_path):
    """last.pt at the final epoch and no result.json (killed in between): the
    resume trains nothing and writes the result the uninterrupted run wrote."""
    _, cfg = tiny_config(tmp_path, epochs=2, methods=["NSM"])
    done = train_one(cfg, "NSM", 0, out_dir=tmp_path / "run", progress=False)
    run_dir = tmp_path / "run" / "checkpoints" / "NSM" / "seed0"
    (run_dir / "result.json").unlink()
    last = (run_dir / "last.pt").read_bytes()
    again = train_one(cfg, "NSM", 0, out_dir=tmp_path / "run", progress=False, resume=True)
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(done))
    assert (run_dir / "last.pt").read_bytes() == last  # no epoch trained again


def test_check_resumable_refuses_a_best_pt_of_the_last_epoch_that_last_pt_does_not_name(tmp_path):
    """best.pt of epoch e = last.pt's epoch while last.pt records another best
    epoch: no kill between the two writes explains it (best.pt is written
    first), so the resume is refused before it trains."""
    from pml_dsb.runner.checkpoint import save_checkpoint
    from pml_dsb.runner.training import check_resumable

    _, cfg = tiny_config(tmp_path, epochs=3, methods=["NSM"])
    assert train_one(cfg, "NSM", 0, out_dir=tmp_path / "run", progress=False, stop_after_epoch=2) is None
    run_dir = tmp_path / "run" / "checkpoints" / "NSM" / "seed0"
    last = load_checkpoint(run_dir / "last.pt", kind="last")
    best = load_checkpoint(run_dir / "best.pt", kind="best")
    assert last["epoch"] == 2
    check_resumable(cfg, "NSM", 0, tmp_path / "run")  # consistent: accepted
    if best["epoch"] == last["epoch"]:
        save_checkpoint({**last, "best": {**last["best"], "epoch": 1}}, run_dir / "last.pt")
    else:
        save_checkpoint({**best, "epoch": last["epoch"]}, run_dir / "best.pt")
    with pytest.raises(CheckpointError, match="but .*last.pt records its best epoch as"):
        check_resumable(cfg, "NSM", 0, tmp_path / "run")


def test_last_metrics_are_those_of_the_last_epochs_model(tmp_path):
    """last_metrics: the network after the final epoch (last.pt), evaluated again here."""
    from pml_dsb.runner.builders import build_embedding_model, build_run_data
    from pml_dsb.runner.training import evaluate_model

    _, cfg = tiny_config(tmp_path, epochs=3, methods=["NSM"])
    result = train_one(cfg, "NSM", 0, out_dir=tmp_path / "run", progress=False)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "NSM" / "seed0" / "last.pt", kind="last")
    assert last["epoch"] == 3
    model = build_embedding_model(cfg.model)
    model.load_state_dict(last["model"])
    again = evaluate_model(model, build_run_data(cfg), cfg, torch.device("cpu"))
    assert result["history"][-1]["epoch"] == 3
    for key in ("recall_at_1", "recall_at_2", "NMI"):
        assert result["last_metrics"][key] == pytest.approx(again[key], abs=1e-12)
    for group in ("many", "medium", "few"):
        assert result["last_metrics"][f"recall_at_1_{group}"] == pytest.approx(
            again["groups"][group]["recall_at_1"], abs=1e-12)


def test_a_run_does_not_depend_on_the_callers_numpy_state(tmp_path):
    """MPerClassSampler draws from numpy's global RNG: the run seeds it, so
    whatever state the caller left there gives the same run."""
    _, cfg = tiny_config(tmp_path, epochs=1, methods=["NSM"], sampler="m_per_class", batch_size=40)
    results = []
    for caller_seed in (1, 2):
        np.random.seed(caller_seed)
        r = train_one(cfg, "NSM", 0, out_dir=tmp_path / f"r{caller_seed}", progress=False)
        r.pop("train_seconds")
        results.append(r)
    assert results[0] == results[1]
    _assert_states_equal(tmp_path / "r1" / "checkpoints" / "NSM" / "seed0" / "last.pt",
                         tmp_path / "r2" / "checkpoints" / "NSM" / "seed0" / "last.pt")


def test_a_fifo_run_of_the_m_per_class_sampler_saved_with_the_training_set_as_m_is_not_reused(tmp_path):
    """The m-per-class sampler's epoch yields other than the training-set size
    too: a first-in-first-out run saved when M was len(train) is trained again."""
    _, cfg = tiny_config(tmp_path, epochs=1, methods=["DSB-NSM"], sampler="m_per_class", batch_size=40)
    cfg = dataclasses.replace(cfg, dsb=dataclasses.replace(cfg.dsb, index_addressed=False))
    train_one(cfg, "DSB-NSM", 0, out_dir=tmp_path / "r", progress=False)
    path = tmp_path / "r" / "checkpoints" / "DSB-NSM" / "seed0" / "result.json"
    saved = json.loads(path.read_text())
    assert saved["compatibility_key"]["dsb_fifo_memory_size"] == "samples per epoch"
    del saved["compatibility_key"]["dsb_fifo_memory_size"]  # as the older release wrote it
    saved["read back"] = True
    path.write_text(json.dumps(saved))
    assert "read back" not in train_one(cfg, "DSB-NSM", 0, out_dir=tmp_path / "r", progress=False, resume=True)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_the_configured_optimizer_trains_the_model_and_the_loss(tmp_path, optimizer):
    """[training] optimizer, lr, momentum and weight_decay as documented: the
    model's optimizer has the weight decay, the loss parameters' has none."""
    _, cfg = tiny_config(tmp_path, epochs=1, methods=["NSM"], optimizer=optimizer, lr=0.01, loss_lr=0.05,
                         weight_decay=0.02, momentum=0.5)
    train_one(cfg, "NSM", 0, out_dir=tmp_path / "r", progress=False)
    opts = load_checkpoint(tmp_path / "r" / "checkpoints" / "NSM" / "seed0" / "last.pt", kind="last")["optimizers"]
    model, loss = opts["model"]["param_groups"][0], opts["loss"]["param_groups"][0]
    assert (model["lr"], model["weight_decay"]) == (0.01, 0.02)
    assert (loss["lr"], loss["weight_decay"]) == (0.05, 0.0)
    for group in (model, loss):
        if optimizer == "sgd":
            assert group["momentum"] == 0.5 and "betas" not in group
        else:
            # AdamW, not Adam's L2 penalty (the key exists from torch 2.7, where AdamW is an Adam)
            assert group.get("decoupled_weight_decay", True) is True and "betas" in group
    if optimizer == "adamw":
        from pml_dsb.runner.training import _optimizer

        built = _optimizer("adamw", [torch.nn.Parameter(torch.zeros(1))], lr=0.01, weight_decay=0.02, momentum=0.5)
        assert type(built) is torch.optim.AdamW
