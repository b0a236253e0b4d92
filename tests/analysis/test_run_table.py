"""Reading a run folder's per_class.csv and results.json into arrays."""
import json
import re

import numpy as np
import pytest

from pml_dsb.analysis import load_run_table

HEADER = "method,seed,class,train_count,semantic_scale,scale_source,recall_at_1\n"


def write_run(folder, rows, results=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "per_class.csv").write_text(HEADER + "".join(",".join(map(str, r)) + "\n" for r in rows))
    if results is not None:
        (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_arrays_per_method_and_seed(tmp_path):
    rows = [("NSM", s, c, 10 * (c + 1), 1.0 + c + 0.1 * s, "train", 0.5 + 0.1 * c) for s in (0, 1) for c in range(3)]
    rows += [("ST", 0, c, 10 * (c + 1), 2.0 + c, "train", "" if c == 2 else 0.9) for c in range(3)]
    table = load_run_table(write_run(tmp_path / "run", rows, {"dataset": "digits_lt", "imbalance_factor": 50.0}))
    assert table.dataset == "digits_lt" and table.imbalance_factor == 50.0 and table.scale_source == "train"
    assert table.methods == ["NSM", "ST"] and table.seeds == {"NSM": [0, 1], "ST": [0]}
    np.testing.assert_array_equal(table.train_count, [10, 20, 30])
    np.testing.assert_allclose(table.scale["NSM"], [[1, 2, 3], [1.1, 2.1, 3.1]])
    classes, counts, scale, acc = table.complete("ST")  # class 2 has no Recall@1
    assert classes.tolist() == [0, 1] and scale.shape == (1, 2) and acc.tolist() == [[0.9, 0.9]]


def test_classes_without_a_scale_are_left_out(tmp_path):
    # S = 0 is "no scale yet" (one training sample): not a value to correlate
    rows = [("NSM", s, c, 1 if c == 0 else 10, 0.0 if (c == 0 or (c == 3 and s == 1)) else 2.0 + c, "train", 0.5)
            for s in (0, 1) for c in range(5)]
    table = load_run_table(write_run(tmp_path / "run", rows))
    classes, counts, scale, acc = table.complete("NSM")
    assert classes.tolist() == [1, 2, 4] and counts.tolist() == [10, 10, 10] and (scale > 0).all()


def test_open_set_run_has_no_counts(tmp_path):
    rows = [("NSM", 0, c, "", 3.0 + c, "test", 0.4) for c in range(4)]
    table = load_run_table(write_run(tmp_path / "cub", rows))
    assert np.isnan(table.train_count).all() and table.scale_source == "test" and table.dataset is None


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="per_class.csv"):
        load_run_table(tmp_path)
    (tmp_path / "per_class.csv").write_text("method,seed,class\nNSM,0,0\n")
    with pytest.raises(ValueError, match="missing column"):
        load_run_table(tmp_path)
    write_run(tmp_path / "x", [("NSM", 0, 0, 5, 1.0, "train", 0.5), ("NSM", 1, 0, 6, 1.0, "train", 0.5)])
    with pytest.raises(ValueError, match="train counts"):
        load_run_table(tmp_path / "x")
    # two runs' CSVs concatenated: the later row used to overwrite the earlier silently
    write_run(tmp_path / "dup", [("NSM", 0, 1, 5, 1.0, "train", 0.5), ("NSM", 0, 1, 5, 9.9, "train", 0.1)])
    with pytest.raises(ValueError, match="more than one row for method NSM, seed 0, class 1"):
        load_run_table(tmp_path / "dup")
    # float('abc') and int('') named no file or line; json's error named neither the file
    for row, words in ((("NSM", 0, 1, 5, "abc", "train", 0.5), "line 3: column 'semantic_scale': 'abc' is not a number"),
                       (("NSM", 0, "", 5, 1.0, "train", 0.5), "line 3: column 'class': '' is not a number")):
        folder = write_run(tmp_path / "cell", [("NSM", 0, 0, 5, 1.0, "train", 0.5), row])
        with pytest.raises(ValueError, match=re.escape(f"{folder / 'per_class.csv'}, {words}")):
            load_run_table(folder)
    folder = write_run(tmp_path / "json", [("NSM", 0, 0, 5, 1.0, "train", 0.5)])
    (folder / "results.json").write_text('{"dataset": ')
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'results.json'}: not valid JSON")):
        load_run_table(folder)


def test_rows_in_any_order_give_seeds_in_increasing_order(tmp_path):
    """Seeds (the arrays' rows) are sorted whatever the order of the CSV's
    rows, e.g. a file merged from per-seed files; null cells read as missing."""
    values = {(s, c): (1.0 + c + 0.1 * s, 0.5 + 0.1 * s) for s in (0, 1, 2) for c in range(2)}
    rows = [("NSM", s, c, 10, *values[s, c][:1], "train", values[s, c][1]) for s in (2, 0, 1) for c in (1, 0)]
    rows[0] = ("NSM", 2, 1, 10, "null", "train", "null")
    table = load_run_table(write_run(tmp_path / "run", rows))
    assert table.seeds == {"NSM": [0, 1, 2]}
    want_scale = [[values[s, c][0] for c in range(2)] for s in (0, 1, 2)]
    want_scale[2][1] = np.nan
    np.testing.assert_allclose(table.scale["NSM"], want_scale)
    np.testing.assert_allclose(table.accuracy["NSM"], [[0.5, 0.5], [0.6, 0.6], [0.7, np.nan]])


def test_scales_of_train_and_test_features_are_not_mixed(tmp_path):
    """per_class.csv concatenated from a closed-set and an open-set run: its
    scales measure different features, so the table refuses it."""
    rows = [("NSM", 0, 0, 5, 1.0, "train", 0.5), ("NSM", 0, 1, "", 2.0, "test", 0.6)]
    with pytest.raises(ValueError, match=r"mixed scale_source values \['test', 'train'\]"):
        load_run_table(write_run(tmp_path / "mixed", rows))
    same = [("NSM", 0, 0, 5, 1.0, "test", 0.5), ("NSM", 0, 1, "", 2.0, "", 0.6)]  # an empty cell says nothing
    assert load_run_table(write_run(tmp_path / "same", same)).scale_source == "test"


def test_a_dataset_recorded_as_a_table_gives_its_name(tmp_path):
    rows = [("NSM", 0, 0, 5, 1.0, "train", 0.5)]
    table = load_run_table(write_run(tmp_path / "run", rows, {"dataset": {"name": "cifar100_lt", "root": "x"},
                                                             "imbalance_factor": 10.0}))
    assert (table.dataset, table.imbalance_factor) == ("cifar100_lt", 10.0)
