"""Typed benchmark configs: loading, unknown keys, types, values, overrides."""
import dataclasses
import glob
import os

import pytest

from pml_dsb.runner.config import (
    BenchConfig,
    ConfigError,
    apply_overrides,
    config_from_dict,
    default_config_path,
    dump_config,
    load_config,
    tomllib,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH_CONFIGS = sorted(glob.glob(os.path.join(REPO, "benchmarks", "configs", "*.toml")))


def write(tmp_path, text, name="cfg.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_default_config_is_digits_lt_with_the_paper_settings():
    cfg = load_config(default_config_path())
    assert isinstance(cfg, BenchConfig)
    assert cfg.dataset.name == "digits_lt" and cfg.dataset.imbalance_factor == 50
    assert cfg.methods == ["NSM", "CB-NSM", "DSB-NSM", "ST", "CB-ST", "DSB-ST"]
    assert len(cfg.seeds) >= 3
    st = cfg.softtriple
    assert (st.la, st.gamma, st.margin, st.centers_per_class) == (20.0, 0.1, 0.01, 10)
    assert cfg.normsoftmax.temperature == 0.05
    assert cfg.class_balanced.beta == 0.9999
    assert cfg.dsb.warmup_epochs == 5
    # DSB must reach stage 3 (weighting) well before the end
    assert cfg.training.epochs >= cfg.dsb.warmup_epochs + 5


@pytest.mark.parametrize("path", BENCH_CONFIGS, ids=[os.path.basename(p) for p in BENCH_CONFIGS])
def test_shipped_benchmark_configs_load(path):
    cfg = load_config(path)
    assert cfg.softtriple.la == 20.0 and cfg.normsoftmax.temperature == 0.05
    assert cfg.model.embedding_size in (64, 512)


def test_shipped_benchmark_configs_cover_the_issue():
    names = {os.path.basename(p) for p in BENCH_CONFIGS}
    assert {"digits_lt_if10.toml", "digits_lt_if50.toml", "cub200_dim64.toml", "cub200_dim512.toml",
            "cars196_dim64.toml", "cars196_dim512.toml", "cifar100lt_if10.toml", "cifar100lt_if50.toml",
            "cifar100lt_if200.toml"} <= names


def test_unknown_key_is_rejected_naming_key_section_and_file(tmp_path):
    path = write(tmp_path, '[dataset]\nname = "digits_lt"\n\n[training]\nepochs = 3\nlearning_rate = 0.1\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "'learning_rate'" in msg and "[training]" in msg and path in msg
    assert "Allowed keys" in msg and "lr" in msg


def test_unknown_section_and_top_level_key_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trainig' at the top level; did you mean 'training'"):
        load_config(write(tmp_path, '[dataset]\nname = "digits_lt"\n[trainig]\nepochs = 3\n'))
    with pytest.raises(ConfigError, match="unknown key 'seed'"):
        load_config(write(tmp_path, 'seed = 3\n[dataset]\nname = "digits_lt"\n', "b.toml"))


@pytest.mark.parametrize(
    "section, line, needle",
    [
        ("training", 'epochs = "ten"', "epochs must be int"),
        ("training", "epochs = true", "epochs must be int"),
        ("training", "lr = \"fast\"", "lr must be float"),
        ("training", 'optimizer = "rmsprop"', "optimizer must be 'adam' | 'adamw' | 'sgd'"),
        ("evaluation", 'recall_ks = [1, "2"]', "recall_ks must be list of int"),
        ("dsb", "index_addressed = 1", "index_addressed must be bool"),
        ("model", "pretrained = 3", "pretrained must be bool | str"),
    ],
)
def test_wrong_types_are_rejected(tmp_path, section, line, needle):
    path = write(tmp_path, f'[dataset]\nname = "digits_lt"\n[{section}]\n{line}\n')
    with pytest.raises(ConfigError, match=needle.replace("|", r"\|")) as err:
        load_config(path)
    assert path in str(err.value)


@pytest.mark.parametrize(
    "model, needle",
    [
        ({"name": "vgg"}, r"\[model\] name must be one of .*got 'vgg'$"),
        ({"name": "bn_inception"}, r"got 'bn_inception' \(BN-Inception, the paper's backbone"),
        ({"name": "resnet50", "width": 4}, r"width applies to digits_cnn only, not to 'resnet50'"),
    ],
)
def test_model_name_and_width_are_checked_when_loaded(model, needle):
    with pytest.raises(ConfigError, match=needle):
        config_from_dict({"dataset": {"name": "digits_lt"}, "model": model})


def test_repeated_recall_k_is_rejected():
    with pytest.raises(ConfigError, match=r"recall_ks must not repeat a value, got \[1, 2, 2\]"):
        config_from_dict({"dataset": {"name": "digits_lt"}, "evaluation": {"recall_ks": [1, 2, 2]}})


@pytest.mark.parametrize(
    "sections, needle",
    [
        ({"dsb": {"memory_size": 100, "index_addressed": True}},
         r"index_addressed needs memory_size = the training-set size \(347\) or 0, got 100"),
        ({"training": {"sampler": "m_per_class", "m_per_class": 4, "batch_size": 64}},
         r"at most 40; raise m_per_class or lower batch_size"),
        ({"training": {"batch_size": 400, "drop_last": True}},
         r"an epoch of 347 training samples yields no batch with batch_size = 400, drop_last = true"),
    ],
    ids=["index-addressed-size", "m-per-class-batch", "no-batch"],
)
def test_settings_checked_against_the_data_before_any_training(tmp_path, sections, needle):
    from pml_dsb.runner import run_benchmark

    cfg = config_from_dict({"name": "t", "dataset": {"name": "digits_lt", "imbalance_factor": 50},
                            "methods": ["NSM", "DSB-NSM"], "seeds": [0], **sections})
    with pytest.raises(ConfigError, match=needle):
        run_benchmark(cfg, out=tmp_path, progress=False)
    assert not (tmp_path / "t").exists()  # refused before the run folder is written


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_samples_per_epoch_counts_what_the_sharded_batches_hold(world):
    from torch.utils.data import BatchSampler

    from pml_dsb.distributed import ShardedBatchSampler
    from pml_dsb.runner.builders import samples_per_epoch

    for n, batch, drop_last in [(101, 20, False), (102, 20, False), (103, 20, False), (103, 20, True),
                                (40, 20, False), (4, 2, False), (7, 20, False), (7, 20, True)]:
        training = config_from_dict({"dataset": {"name": "digits_lt"},
                                     "training": {"batch_size": batch, "drop_last": drop_last}}).training
        batches = BatchSampler(range(n), batch, drop_last)
        held = sum(len(part) for rank in range(world) for part in ShardedBatchSampler(batches, rank, world))
        assert samples_per_epoch(n, training, world) == held, (n, batch, drop_last, world)


def test_fifo_memory_holds_what_one_epoch_enqueues():
    from pml_dsb.runner.builders import samples_per_epoch
    from pml_dsb.runner.methods import build_loss

    for training, per_epoch in (({}, 347), ({"drop_last": True, "batch_size": 64}, 320),
                                ({"sampler": "m_per_class", "m_per_class": 8, "batch_size": 40}, 320)):
        fifo = config_from_dict({"dataset": {"name": "digits_lt"}, "training": training,
                                 "dsb": {"index_addressed": False}})
        assert samples_per_epoch(347, fifo.training) == per_epoch
        loss = build_loss("DSB-NSM", fifo, [100] * 3 + [47], memory_size=347, epoch_samples=per_epoch)
        assert loss.memory.memory_size == per_epoch
        indexed = config_from_dict({"dataset": {"name": "digits_lt"}, "training": training})
        counts = [100] * 3 + [47]
        assert build_loss("DSB-NSM", indexed, counts, memory_size=347, epoch_samples=per_epoch).memory.memory_size == 347


def test_int_accepted_for_float_and_values_checked():
    cfg = config_from_dict({"dataset": {"name": "digits_lt", "imbalance_factor": 10}, "training": {"lr": 1}})
    assert isinstance(cfg.training.lr, float) and isinstance(cfg.dataset.imbalance_factor, float)
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        config_from_dict({"dataset": {"name": "digits_lt"}, "training": {"epochs": 0}})
    with pytest.raises(ConfigError, match="unknown method 'DSB-CE'"):
        config_from_dict({"dataset": {"name": "digits_lt"}, "methods": ["NSM", "DSB-CE"]})
    with pytest.raises(ConfigError, match="name must be one of"):
        config_from_dict({"dataset": {"name": "mnist"}})
    with pytest.raises(ConfigError, match="needs 'name'"):
        config_from_dict({"dataset": {}})
    with pytest.raises(ConfigError, match="imbalance_factor is required for cifar100_lt"):
        config_from_dict({"dataset": {"name": "cifar100_lt"}})
    with pytest.raises(ConfigError, match="multiple of m_per_class"):
        config_from_dict({"dataset": {"name": "digits_lt"},
                          "training": {"sampler": "m_per_class", "batch_size": 30, "m_per_class": 4}})


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"dataset": {"name": "digits_lt"}, "seeds": [0, 2**32]}, r"seeds must be integers in \[0, 4294967295\]"),
        ({"dataset": {"name": "digits_lt"}, "evaluation": {"nmi_seed": 2**31}}, "nmi_seed must be <= 2147483647"),
    ],
    ids=["seed-2**32", "nmi_seed-2**31"],
)
def test_settings_that_would_fail_later_are_refused(data, needle):
    """A seed past numpy's range and an nmi_seed past faiss's C int once
    failed after the run folder had been written."""
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(data)
    largest = {"seeds": [2**32 - 1]} if "seeds" in data else {"evaluation": {"nmi_seed": 2**31 - 1}}
    if "dataset" in data and data["dataset"]["name"] == "digits_lt" and len(data) > 1:
        config_from_dict({"dataset": {"name": "digits_lt"}, **largest})  # the largest allowed passes


@pytest.mark.parametrize(
    "dataset, needle",
    [({"name": "digits_lt", "image_size": 32}, "image_size applies to the image datasets"),
     ({"name": "cub200", "root": "nowhere", "split_seed": 3}, "split_seed applies to digits_lt only")],
    ids=["image_size-digits", "split_seed-cub"],
)
def test_settings_a_dataset_ignores_are_refused_for_a_new_run_only(tmp_path, caplog, dataset, needle):
    """Once silently ignored. A run folder written then still loads (its config.toml)."""
    from pml_dsb.cli import main

    path = write(tmp_path, dump_config(config_from_dict({"dataset": dataset, "methods": ["NSM"]})))
    assert load_config(path).dataset.unused_settings() != []  # loads: old run folders stay readable
    assert main(["bench", "--config", path, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert needle in caplog.text and not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["4294967296", "0-4294967296", "0-1000000", "-1"])
def test_cli_seeds_outside_numpys_range_or_too_many_are_usage_errors(text, capsys):
    from pml_dsb.cli import main

    with pytest.raises(SystemExit) as info:
        main(["bench", "--seeds", text])
    assert info.value.code == 2 and "seeds must be at most 1000 integers in [0, 4294967295]" in capsys.readouterr().err


def test_cli_seed_range_running_backwards_is_a_usage_error(capsys):
    from pml_dsb.cli import main

    with pytest.raises(SystemExit) as info:
        main(["bench", "--seeds", "0,5-3"])
    assert info.value.code == 2 and "seed range '5-3' runs backwards" in capsys.readouterr().err


def test_toml_syntax_error_names_the_file(tmp_path):
    path = write(tmp_path, "[dataset\nname = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML") as err:
        load_config(path)
    assert path in str(err.value)
    latin1 = tmp_path / "latin1.toml"  # TOML is UTF-8: a bare UnicodeDecodeError named no file
    latin1.write_bytes('name = "Straße"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not valid TOML.*'utf-8' codec") as err:
        load_config(latin1)
    assert str(latin1) in str(err.value)


def test_methods_are_canonicalised():
    cfg = config_from_dict({"dataset": {"name": "digits_lt"}, "methods": ["nsm", "dsb_st"]})
    assert cfg.methods == ["NSM", "DSB-ST"]


def test_dump_round_trips_every_shipped_config(tmp_path):
    for path in [default_config_path(), *BENCH_CONFIGS]:
        cfg = load_config(path)
        again = load_config(write(tmp_path, dump_config(cfg, header="x\ny"), "rt.toml"))
        assert again == cfg, path
        assert tomllib.loads(dump_config(cfg))  # valid TOML


def test_overrides():
    cfg = load_config(default_config_path())
    new = apply_overrides(cfg, epochs=2, seeds=[7], methods=["ST"], data_root="/data", num_threads=2, name="x")
    assert (new.training.epochs, new.seeds, new.methods, new.dataset.root, new.runtime.num_threads, new.name) == (
        2, [7], ["ST"], "/data", 2, "x")
    assert cfg.training.epochs != 2  # a copy
    assert apply_overrides(cfg) is cfg
    with pytest.raises(ConfigError):
        apply_overrides(cfg, epochs=0)
    # checked as a config file's values: "3" gave a bare '<' TypeError, 2.0 was taken
    for kwargs, words in ((dict(epochs="3"), "[training] epochs must be int, got '3'"),
                          (dict(epochs=2.0), "[training] epochs must be int, got 2.0"),
                          (dict(seeds="12"), "seeds must be list of int")):
        with pytest.raises(ConfigError) as info:
            apply_overrides(cfg, **kwargs)
        assert words in str(info.value)
    assert dataclasses.replace(cfg) == cfg


def test_build_loss_refuses_counts_and_sizes_it_would_misread():
    from pml_dsb.runner.methods import build_loss

    cfg = load_config(default_config_path())
    # [] built a loss of 0 classes, -3 shrank the memory, 5.7 and 9.9 were truncated, True was 1
    for args, kwargs, words in ((("ST", cfg, []), {}, "train_counts must be at least 2 whole numbers"),
                                (("DSB-ST", cfg, [5, -3, 2]), {}, "train_counts"),
                                (("DSB-ST", cfg, 100), {}, "train_counts must be at least 2"),  # a raw TypeError
                                (("CB-ST", cfg, [5.7, 3, 2]), {}, "train_counts"),
                                (("DSB-ST", cfg, [5, 3, 2]), dict(memory_size=9.9), "memory_size must be a whole"),
                                (("DSB-ST", cfg, [5, 3, 2]), dict(memory_size=True), "memory_size")):
        with pytest.raises(ValueError) as info:
            build_loss(*args, **kwargs)
        assert words in str(info.value)
    import numpy as np

    assert build_loss("DSB-ST", cfg, np.array([5, 3, 2])).memory.memory_size == 10


@pytest.mark.parametrize("epochs, needle", [(3, "never weighted; these runs will equal their parents'"),
                                            (5, "weighted at one batch at most"), (6, None)])
def test_a_dsb_run_within_its_warm_up_is_announced(caplog, epochs, needle):
    from pml_dsb.runner.bench import _check_against_data
    from pml_dsb.runner.builders import build_run_data

    cfg = config_from_dict({"dataset": {"name": "digits_lt"}, "methods": ["NSM", "DSB-NSM"],
                            "training": {"epochs": epochs}, "dsb": {"warmup_epochs": 5}})
    with caplog.at_level("WARNING", logger="pml_dsb.runner.bench"):
        _check_against_data(cfg, build_run_data(cfg))
    if needle is None:
        assert "warmup_epochs" not in caplog.text
    else:
        assert f"DSB-NSM: [training] epochs = {epochs} <= [dsb] warmup_epochs = 5: the loss is {needle}" in caplog.text


def test_class_balanced_beta_of_one_is_refused():
    """beta = 1 makes every CB weight (1 - beta) / (1 - beta ** n_c) zero: a loss that never trains."""
    with pytest.raises(ConfigError, match=r"\[class_balanced\] beta must be in \[0, 1\), got 1.0"):
        config_from_dict({"dataset": {"name": "digits_lt"}, "class_balanced": {"beta": 1.0}})
    for beta in (0.0, 0.9999):  # both ends of the allowed range
        assert config_from_dict({"dataset": {"name": "digits_lt"},
                                 "class_balanced": {"beta": beta}}).class_balanced.beta == beta


def test_softtriple_margin_of_zero_is_accepted():
    """A SoftTriple margin of 0 is a valid setting (no margin), unlike la and gamma."""
    cfg = config_from_dict({"dataset": {"name": "digits_lt"}, "softtriple": {"margin": 0.0}})
    assert cfg.softtriple.margin == 0.0
    with pytest.raises(ConfigError, match=r"\[softtriple\] margin must be a finite number >= 0, got -0.01"):
        config_from_dict({"dataset": {"name": "digits_lt"}, "softtriple": {"margin": -0.01}})


def test_m_per_class_batch_with_a_remainder_of_one_is_refused():
    """PML's MPerClassSampler needs whole groups of m_per_class in a batch: any remainder, 1 included."""
    with pytest.raises(ConfigError, match="batch_size=10 must be a multiple of m_per_class=3"):
        config_from_dict({"dataset": {"name": "digits_lt"},
                          "training": {"sampler": "m_per_class", "batch_size": 10, "m_per_class": 3}})
    config_from_dict({"dataset": {"name": "digits_lt"},
                      "training": {"sampler": "m_per_class", "batch_size": 12, "m_per_class": 3}})


@pytest.mark.parametrize("dataset", [{"name": "cub200"}, {"name": "cars196"},
                                     {"name": "cifar100_lt", "imbalance_factor": 50}],
                         ids=["cub200", "cars196", "cifar100_lt"])
def test_split_seed_is_unused_by_every_dataset_but_digits_lt(dataset):
    """CIFAR-100-LT is closed-set like digits-LT but has a fixed standard split:
    its split_seed changes nothing and must be reported as unused."""
    unused = config_from_dict({"dataset": {**dataset, "split_seed": 3}}).dataset.unused_settings()
    assert unused == [f"[dataset] split_seed applies to digits_lt only (the others have fixed standard splits), "
                      f"not to {dataset['name']!r}"]
    assert config_from_dict({"dataset": {"name": "digits_lt", "split_seed": 3}}).dataset.unused_settings() == []


def test_cli_seed_range_includes_both_ends():
    """--seeds 0-4 is documented as [0, 1, 2, 3, 4]: a range that dropped its last seed ran one seed fewer."""
    from pml_dsb.runner.cli import parse_seeds

    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("2-3,7") == [2, 3, 7]
    assert parse_seeds("5-5") == [5]


@pytest.mark.parametrize("normalize, expected", [("none", None), ("mean", "mean")])
def test_dsb_normalize_reaches_the_memory(normalize, expected):
    """[dsb] normalize = "none" (raw 1/S weights) must not be replaced by the default mean normalisation."""
    from pml_dsb.runner.methods import build_loss

    cfg = config_from_dict({"dataset": {"name": "digits_lt"}, "model": {"embedding_size": 8},
                            "dsb": {"normalize": normalize}})
    for method in ("DSB-NSM", "DSB-ST"):
        assert build_loss(method, cfg, [5, 3, 2]).memory.normalize == expected, method


def test_m_per_class_loader_over_a_training_set_smaller_than_one_batch_yields_one_batch():
    """The config allows a training set smaller than one batch (here 10 samples, batch 16): the sampler's
    length is then one batch, as samples_per_epoch counts, not the set's size, which PML's
    MPerClassSampler refuses with an AssertionError."""
    import numpy as np
    import torch
    from torch.utils.data import TensorDataset

    from pml_dsb.runner.builders import build_train_loader, samples_per_epoch

    labels = np.repeat(np.arange(5), 2)  # 10 samples, 5 classes: 5 * 4 >= 16 fills a batch
    dataset = TensorDataset(torch.zeros(10, 3), torch.as_tensor(labels))
    training = config_from_dict({"dataset": {"name": "digits_lt"},
                                 "training": {"sampler": "m_per_class", "batch_size": 16, "m_per_class": 4}}).training
    loader = build_train_loader(dataset, labels, training, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert [len(batch[0]) for batch in loader] == [16] == [samples_per_epoch(10, training)]


def test_a_key_error_is_logged_without_its_repr_quotes(monkeypatch, caplog):
    """str(KeyError("x")) is "'x'": a subcommand's KeyError message was logged wrapped in quotes."""
    from pml_dsb.cli import main

    def refuse(path):
        raise KeyError("method 'XYZ' is not in the run")

    monkeypatch.setattr("pml_dsb.runner.config.load_config", refuse)
    assert main(["bench", "--no-progress"]) == 2
    assert "KeyError: method 'XYZ' is not in the run (pml-dsb -v bench" in caplog.text
    assert "\"method 'XYZ' is not in the run\"" not in caplog.text


@pytest.mark.parametrize(
    "section, key, edge, beyond, needle",
    [
        ("training", "batch_size", 2, 1, "batch_size must be >= 2"),
        ("training", "momentum", 0.0, -0.1, "momentum must be a finite number >= 0"),
        ("training", "weight_decay", 0.0, float("inf"), "weight_decay must be a finite number >= 0"),
        ("training", "lr", 1e-300, float("inf"), "lr must be a finite number > 0"),
        ("training", "loss_lr", 1e-300, float("nan"), "loss_lr must be a finite number > 0"),
        ("dataset", "imbalance_factor", 1.0, 0.999, "imbalance_factor must be >= 1"),
        ("dataset", "imbalance_factor", 1e6, float("inf"), "imbalance_factor must be >= 1"),
        ("dsb", "warmup_epochs", 0, -1, "warmup_epochs must be >= 0"),
        ("dsb", "memory_size", 0, -1, "memory_size must be >= 0"),
        ("evaluation", "recall_ks", [1, 2, 3], [1, 2, 0], "recall_ks must be >= 1"),
        ("evaluation", "nredo", 1, 0, "nredo must be >= 1"),
        ("evaluation", "nmi_seed", 2**31 - 1, 2**31, "nmi_seed must be <= 2147483647"),
        ("softtriple", "centers_per_class", 1, 0, "centers_per_class must be >= 1"),
        ("softtriple", "margin", 0.0, -1e-3, "margin must be a finite number >= 0"),
        (None, "seeds", [2**32 - 1], [-1], r"seeds must be integers in \[0, 4294967295\]"),
    ],
)
def test_each_range_accepts_its_edge_and_refuses_the_value_beyond(section, key, edge, beyond, needle):
    """The documented ranges at their boundaries: the edge value loads (and is kept), the next one is refused."""

    def data(value):
        out = {"dataset": {"name": "digits_lt"}}
        if section is None:
            out[key] = value
        else:
            out.setdefault(section, {})[key] = value
        return out

    cfg = config_from_dict(data(edge))
    got = getattr(cfg, key) if section is None else getattr(getattr(cfg, section), key)
    assert got == edge
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(data(beyond))


def test_cli_counts_are_checked_at_their_lower_edges(tmp_path, monkeypatch, capsys):
    """--epochs and --stop-after-epoch start at 1 (0 would stop a run after epoch 1);
    --threads starts at 0 (leave the libraries' defaults)."""
    from pml_dsb.cli import main

    for option, value, words in (("--epochs", "0", "expected a positive integer, got '0'"),
                                 ("--stop-after-epoch", "0", "expected a positive integer, got '0'"),
                                 ("--threads", "-1", "expected an integer >= 0, got '-1'")):
        with pytest.raises(SystemExit) as info:
            main(["bench", option, value])
        assert info.value.code == 2 and words in capsys.readouterr().err
    seen = []
    monkeypatch.setattr("pml_dsb.runner.bench.run_benchmark",
                        lambda config, **kw: seen.append((config, kw["stop_after_epoch"])))
    path = write(tmp_path, dump_config(config_from_dict({"dataset": {"name": "digits_lt"}, "methods": ["NSM"]})))
    assert main(["bench", "--config", path, "--out", str(tmp_path / "out"), "--no-progress", "--epochs", "1",
                 "--stop-after-epoch", "1", "--threads", "0"]) == 0
    (config, stop), = seen
    assert (config.training.epochs, stop, config.runtime.num_threads) == (1, 1, 0)


@pytest.mark.parametrize(
    "data, needle",
    [({"name": ".."}, "name must be a non-empty folder name"),
     ({"name": "."}, "name must be a non-empty folder name"),
     ({"name": "a/b"}, "name must be a non-empty folder name"),
     ({"seeds": [1, 2, 1]}, "seeds lists a seed twice"),
     ({"methods": ["NSM", "nsm"]}, "methods lists a method twice")],
    ids=["dotdot", "dot", "slash", "seed-twice", "method-twice"],
)
def test_run_names_that_are_no_folder_and_repeated_runs_are_refused(data, needle):
    with pytest.raises(ConfigError, match=needle):
        config_from_dict({"dataset": {"name": "digits_lt"}, **data})
    assert config_from_dict({"dataset": {"name": "digits_lt"}, "name": "..a", "seeds": [1, 2]}).name == "..a"
