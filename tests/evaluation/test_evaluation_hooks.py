"""make_retrieval_hooks in a real (tiny) PML MetricLossOnly run."""
from __future__ import annotations

import csv
import glob
import importlib.util
import os
import re
import sqlite3
import sys

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses, trainers

from evaluation_testlib import clustered_data
from pml_dsb.evaluation import RetrievalAccuracyCalculator, evaluate_embeddings, make_retrieval_hooks

CPU = torch.device("cpu")


def _datasets():
    rng = np.random.default_rng(5)
    x, y = clustered_data(rng, [16] * 6, dim=8, noise=2.5)
    xv, yv = clustered_data(np.random.default_rng(6), [12] * 6, dim=8, noise=2.5)
    train = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    val = torch.utils.data.TensorDataset(torch.from_numpy(xv), torch.from_numpy(yv))
    return train, val


def _embed(trunk, dataset):
    with torch.no_grad():
        x, y = dataset.tensors
        return torch.nn.functional.normalize(trunk.eval()(x)), y


def _train(trunk, train, hooks, lr, epochs, **trainer_kwargs):
    trainers.MetricLossOnly(
        models={"trunk": trunk},
        optimizers={"trunk_optimizer": torch.optim.SGD(trunk.parameters(), lr=lr)},
        batch_size=32,
        loss_funcs={"metric_loss": losses.ContrastiveLoss()},
        dataset=train,
        data_device=CPU,
        dataloader_num_workers=0,
        end_of_epoch_hook=hooks.end_of_epoch_hook,
        **trainer_kwargs,
    ).train(num_epochs=epochs)


def test_metric_loss_only_run_logs_recall_and_saves_best_model(tmp_path):
    torch.manual_seed(0)
    train, val = _datasets()
    trunk = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    hooks = make_retrieval_hooks(
        {"val": val}, tmp_path / "run", recall_ks=(1, 2), dataloader_num_workers=0,
        batch_size=64, data_device=CPU, log_freq=1, tensorboard=False,
    )
    # before the first test (and on a resume in a new process): nothing logged yet
    assert hooks.accuracy_history() == {} and hooks.best_epoch_and_accuracy() == (None, 0)
    _train(trunk, train, hooks, lr=0.5, epochs=2, end_of_iteration_hook=hooks.end_of_iteration_hook)
    hooks.close()

    table = hooks.hook_container.record_group_name(hooks.tester, "val")
    # SQLite, read with sqlite3 rather than through record-keeper
    with sqlite3.connect(os.path.join(hooks.log_folder, "logs.db")) as db:
        rows = db.execute(
            f"SELECT epoch, recall_at_1_level0, recall_at_2_level0, NMI_level0 FROM {table} ORDER BY epoch"
        ).fetchall()
    assert [r[0] for r in rows] == [1, 2]
    assert all(0.0 <= v <= 1.0 for r in rows for v in r[1:])
    # CSV, read with csv
    with open(os.path.join(hooks.log_folder, f"{table}.csv")) as f:
        csv_rows = [r for r in csv.DictReader(f)]
    assert [int(r["epoch"]) for r in csv_rows] == [1, 2]
    assert [float(r["recall_at_1_level0"]) for r in csv_rows] == pytest.approx([r[1] for r in rows])
    assert hooks.accuracy_history()["recall_at_1_level0"] == pytest.approx([r[1] for r in rows])

    # the last row is the final model's accuracy, recomputed independently
    final = evaluate_embeddings(*_embed(trunk, val), recall_ks=(1, 2))
    assert rows[-1][1] == pytest.approx(final["recall_at_1"], abs=1e-9)

    # the best model is saved under the best epoch (the first maximum) and is that model
    best_epoch = 1 + int(np.argmax([r[1] for r in rows]))
    assert hooks.best_epoch_and_accuracy()[0] == best_epoch
    saved = glob.glob(os.path.join(hooks.model_folder, "trunk_best*.pth"))
    assert [re.search(r"best(\d+)\.pth$", p).group(1) for p in saved] == [str(best_epoch)]
    assert os.path.exists(os.path.join(hooks.model_folder, "trunk_2.pth"))
    best_trunk = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    best_trunk.load_state_dict(torch.load(saved[0], map_location=CPU))
    best = evaluate_embeddings(*_embed(best_trunk, val), recall_ks=(1,), nmi=False)
    assert best["recall_at_1"] == pytest.approx(rows[best_epoch - 1][1], abs=1e-9)

    # losses were logged by the end-of-iteration hook
    assert hooks.hook_container.get_loss_history()["metric_loss"]


def test_bad_configuration_is_refused(tmp_path):
    _, val = _datasets()
    with pytest.raises(ValueError, match=r"validation_split_name='val' is not a key of dataset_dict; expected one of \['test'\]"):
        make_retrieval_hooks({"test": val}, tmp_path)
    with pytest.raises(ValueError, match=r"primary_metric='recall_at_1' is not computed"):
        make_retrieval_hooks({"val": val}, tmp_path,
                             accuracy_calculator=RetrievalAccuracyCalculator(include=("NMI",)))
    with pytest.raises(ValueError, match=r"test_interval must be an int >= 1, got 0"):
        make_retrieval_hooks({"val": val}, tmp_path, test_interval=0)
    # computed, but a count: PML would keep the model with the most lone queries
    with pytest.raises(ValueError, match=r"primary_metric='num_lone_queries' counts queries left out of Recall@K, "
                                         r"it is no accuracy; expected one of \['NMI', 'recall_at_1'\]"):
        make_retrieval_hooks({"val": val}, tmp_path, primary_metric="num_lone_queries",
                             accuracy_calculator=RetrievalAccuracyCalculator(recall_ks=(1,)))
    make_retrieval_hooks({"val": val}, tmp_path, primary_metric="NMI")  # every accuracy may pick the best model
    # PML's tester would only fail after the first epoch of training
    with pytest.raises(ValueError, match=r"splits_to_eval never evaluates validation_split_name='val'"):
        make_retrieval_hooks({"train": val, "val": val}, tmp_path, splits_to_eval=[("train", ["train"])])
    for bad in ([("val", ["test"])], [("val", "val")], [("val", ["val"]), ("val", ["val"])], "val"):
        with pytest.raises(ValueError, match=r"splits_to_eval must be a list of \(query split"):
            make_retrieval_hooks({"val": val}, tmp_path, splits_to_eval=bad)


def test_splits_to_eval_with_tuples_and_query_among_references(tmp_path):
    # PML's tester concatenates the reference splits with a list and moves the
    # query split to their front in place: a tuple raised TypeError at the
    # first test, and the SQLite table read before a test had the other order
    torch.manual_seed(0)
    train, val = _datasets()
    trunk = torch.nn.Linear(8, 8)
    splits = (("val", ("train", "val")),)
    kwargs = dict(splits_to_eval=splits, dataloader_num_workers=0, batch_size=64, data_device=CPU, tensorboard=False)
    hooks = make_retrieval_hooks({"train": train, "val": val}, tmp_path / "run", **kwargs)
    table_before = hooks.hook_container.record_group_name(hooks.tester, "val")
    assert hooks.tester.reference_split_names["val"] == ["val", "train"]  # before any test: as PML will set them
    _train(trunk, train, hooks, lr=0.1, epochs=1)
    hooks.close()
    assert splits == (("val", ("train", "val")),)  # the caller's object is left as it was
    assert hooks.tester.reference_split_names["val"] == ["val", "train"]
    assert hooks.hook_container.record_group_name(hooks.tester, "val") == table_before
    # the run's own test, recomputed: val's queries against val + train, query excluded
    emb, labels = zip(_embed(trunk, val), _embed(trunk, train))
    expected = evaluate_embeddings(emb[0], labels[0], torch.cat(emb), torch.cat(labels), ref_includes_query=True,
                                   recall_ks=(1,), nmi=False)["recall_at_1"]
    # a resumed run (new hooks on the same folder) reads that history before any test
    resumed = make_retrieval_hooks({"train": train, "val": val}, tmp_path / "run", **kwargs)
    assert resumed.accuracy_history()["recall_at_1_level0"] == pytest.approx([expected], abs=1e-9)
    resumed.close()


def test_missing_record_keeper_names_the_pip_command(tmp_path, monkeypatch):
    _, val = _datasets()
    monkeypatch.setitem(sys.modules, "record_keeper", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install record-keeper  \(the extra \"pml-dsb\[record\]\""):
        make_retrieval_hooks({"val": val}, tmp_path)


def test_tensorboard_optional(tmp_path, monkeypatch):
    _, val = _datasets()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    hooks = make_retrieval_hooks({"val": val}, tmp_path)  # default: only when installed
    assert hooks.tensorboard_writer is None and hooks.tensorboard_folder is None
    with pytest.raises(ModuleNotFoundError, match=r"pip install tensorboard  \(the extra \"pml-dsb\[tensorboard\]\""):
        make_retrieval_hooks({"val": val}, tmp_path, tensorboard=True)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_writer_when_installed(tmp_path):
    _, val = _datasets()
    hooks = make_retrieval_hooks({"val": val}, tmp_path, tensorboard=True)
    assert hooks.tensorboard_writer is not None
    hooks.close()


def test_test_interval_patience_and_save_models_reach_pml(tmp_path):
    """With a learning rate of 0 the accuracy never improves: tested every
    2nd epoch, the best stays epoch 2, and patience=1 stops the trainer after
    the test at epoch 4 (4 - 2 > 1), as PML's own hook does; save_models=False
    writes no model file."""
    torch.manual_seed(0)
    train, val = _datasets()
    trunk = torch.nn.Linear(8, 8)
    hooks = make_retrieval_hooks(
        {"val": val}, tmp_path / "run", recall_ks=(1,), dataloader_num_workers=0, batch_size=64,
        data_device=CPU, tensorboard=False, test_interval=2, patience=1, save_models=False,
    )
    _train(trunk, train, hooks, lr=0.0, epochs=8)
    hooks.close()
    assert hooks.accuracy_history()["epoch"] == [2, 4]
    assert hooks.best_epoch_and_accuracy()[0] == 2
    assert os.listdir(hooks.model_folder) == []


def test_tester_kwargs_reach_the_tester_and_reserved_ones_are_refused(tmp_path):
    _, val = _datasets()
    hooks = make_retrieval_hooks({"val": val}, tmp_path, tensorboard=False, batch_size=64,
                                 tester_kwargs={"normalize_embeddings": False, "batch_size": 7})
    assert hooks.tester.normalize_embeddings is False and hooks.tester.batch_size == 7
    for reserved in ("accuracy_calculator", "end_of_testing_hook"):
        with pytest.raises(ValueError, match=rf"tester_kwargs must not set '{reserved}'"):
            make_retrieval_hooks({"val": val}, tmp_path, tensorboard=False, tester_kwargs={reserved: None})


def test_log_freq_prefix_validation_split_and_collate_fn_reach_pml(tmp_path):
    """A validation split not named "val", every split tested (splits_to_eval
    None), losses logged every 2nd iteration as PML's rule says (iteration %
    log_freq == 0), tables named with the prefix, the collate function used."""
    torch.manual_seed(0)
    train, val = _datasets()
    trunk = torch.nn.Linear(8, 8)
    collated = []

    def collate(batch):
        collated.append(len(batch))
        return torch.utils.data.default_collate(batch)

    hooks = make_retrieval_hooks(
        {"train": train, "test": val}, tmp_path / "run", recall_ks=(1,), validation_split_name="test",
        dataloader_num_workers=0, batch_size=64, data_device=CPU, tensorboard=False, log_freq=2,
        record_group_name_prefix="exp7", test_collate_fn=collate,
    )
    # before any test: both splits readable, each against itself
    assert hooks.tester.reference_split_names == {"train": ["train"], "test": ["test"]}
    assert hooks.accuracy_history("train") == {} and hooks.accuracy_history() == {}
    iterations = []

    def on_iteration(trainer):
        iterations.append(trainer.iteration)
        hooks.end_of_iteration_hook(trainer)

    _train(trunk, train, hooks, lr=0.1, epochs=2, end_of_iteration_hook=on_iteration)
    hooks.close()
    assert hooks.validation_split_name == "test" and hooks.hook_container.validation_split_name == "test"
    # the default split is the validation split: the test set's recall, recomputed
    expected = evaluate_embeddings(*_embed(trunk, val), recall_ks=(1,), nmi=False)["recall_at_1"]
    assert hooks.accuracy_history()["recall_at_1_level0"][-1] == pytest.approx(expected, abs=1e-9)
    assert hooks.accuracy_history() == hooks.accuracy_history("test") != hooks.accuracy_history("train")
    assert {"epoch", "recall_at_1_level0", "NMI_level0", "num_lone_queries_level0"} <= set(hooks.accuracy_history())
    for split in ("train", "test"):  # the best epoch of the split asked for, by its recall_at_1
        history = hooks.accuracy_history(split)
        best = int(np.argmax(history["recall_at_1_level0"]))
        assert hooks.best_epoch_and_accuracy(split) == (
            history["epoch"][best], pytest.approx(history["recall_at_1_level0"][best]))
    assert hooks.best_epoch_and_accuracy("train")[1] != hooks.best_epoch_and_accuracy()[1]
    table = hooks.hook_container.record_group_name(hooks.tester, "test")
    assert table.startswith("exp7_") and table.endswith("_TEST_vs_self")
    with sqlite3.connect(os.path.join(hooks.log_folder, "logs.db")) as db:
        assert db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 2
    logged = sum(1 for i in iterations if i % 2 == 0)
    assert 0 < logged < len(iterations)
    assert len(hooks.hook_container.get_loss_history()["metric_loss"]) == logged
    # two tests of two splits: train in 2 batches of 64, test in 2 (96 and 72 samples)
    assert collated and sum(collated) == 2 * (96 + 72)


def test_an_empty_dataset_dict_is_refused(tmp_path):
    for bad in ({}, [("val", None)]):
        with pytest.raises(ValueError, match=r"dataset_dict must be a non-empty mapping split name -> dataset"):
            make_retrieval_hooks(bad, tmp_path)


def test_tensorboard_none_uses_it_when_installed(tmp_path, monkeypatch):
    """tensorboard=None writes to tensorboard when the module imports (a
    stand-in here), False never does."""
    import types

    made = []

    class SummaryWriter:
        def __init__(self, log_dir):
            made.append(log_dir)

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    _, val = _datasets()
    hooks = make_retrieval_hooks({"val": val}, tmp_path)
    assert isinstance(hooks.tensorboard_writer, SummaryWriter)
    assert made == [os.path.join(str(tmp_path), "tensorboard")] == [hooks.tensorboard_folder]
    assert hooks.record_keeper.tensorboard_writer is hooks.tensorboard_writer
    hooks = make_retrieval_hooks({"val": val}, tmp_path, tensorboard=False)
    assert hooks.tensorboard_writer is None and hooks.tensorboard_folder is None and len(made) == 1


def test_patience_zero_is_allowed_and_a_negative_one_refused(tmp_path):
    _, val = _datasets()
    hooks = make_retrieval_hooks({"val": val}, tmp_path, tensorboard=False, patience=0)
    assert hooks.end_of_epoch_hook is not None
    with pytest.raises(ValueError, match=r"patience must be an int >= 0, got -1"):
        make_retrieval_hooks({"val": val}, tmp_path, tensorboard=False, patience=-1)
