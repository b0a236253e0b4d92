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


def test_toml_syntax_error_names_the_file(tmp_path):
    path = write(tmp_path, "[dataset\nname = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML") as err:
        load_config(path)
    assert path in str(err.value)


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
    assert dataclasses.replace(cfg) == cfg
