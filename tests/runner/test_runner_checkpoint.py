"""Checkpoints: atomic writes, refusal of truncated and foreign files, all-or-nothing restore."""
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from pml_dsb import DSBSoftTripleLoss
from pml_dsb.runner.checkpoint import (
    FORMAT_TAG,
    FORMAT_VERSION,
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    restore_training_state,
    save_checkpoint,
)


def make(num_classes=3, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(5, dim)
    with torch.no_grad():
        model.weight.copy_(torch.randn(dim, 5, generator=g))
    loss = DSBSoftTripleLoss(num_classes, dim, centers_per_class=2, memory_size=8, warmup_epochs=1)
    with torch.no_grad():
        loss.fc.copy_(torch.randn(loss.fc.shape, generator=g))
    opt = torch.optim.Adam(list(model.parameters()) + list(loss.parameters()), lr=0.1)
    # one step so that the optimizer and the memory hold state
    labels = torch.arange(6) % num_classes
    out = loss(model(torch.randn(6, 5, generator=g)), labels)
    out.backward()
    opt.step()
    return model, loss, opt


def state_of(model, loss, opt, epoch=3, kind="last"):
    state = {
        "format": FORMAT_TAG, "version": FORMAT_VERSION, "kind": kind, "method": "DSB-ST", "seed": 0,
        "epoch": epoch, "model": model.state_dict(), "loss": loss.state_dict(), "metrics": {"recall_at_1": 0.5},
    }
    if kind == "last":
        state.update(optimizers={"all": opt.state_dict()}, schedulers={}, rng=capture_rng_state(),
                     sampler={}, history=[{"epoch": 1}], best={"epoch": 1}, config={"a": 1}, finished=False)
    return state


def snapshot(*objs):
    return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in o.state_dict().items()}
            if isinstance(o, torch.nn.Module) else repr(o.state_dict()) for o in objs]


def assert_same(a, b):
    for x, y in zip(a, b):
        if isinstance(x, dict):
            assert x.keys() == y.keys()
            for k in x:
                assert torch.equal(x[k], y[k]), k
        else:
            assert x == y


def test_round_trip_restores_everything(tmp_path):
    model, loss, opt = make()
    path = tmp_path / "last.pt"
    save_checkpoint(state_of(model, loss, opt), path)
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left
    model2, loss2, opt2 = make(seed=1)
    state = load_checkpoint(path, kind="last", method="DSB-ST", seed=0)
    restore_training_state(state, model2, loss2, {"all": opt2}, path=str(path))
    assert_same(snapshot(model, loss), snapshot(model2, loss2))
    assert loss2.memory.num_enqueued == loss.memory.num_enqueued == 6  # memory counters included
    assert repr(opt.state_dict()) == repr(opt2.state_dict())


def test_truncated_file_is_refused(tmp_path):
    model, loss, opt = make()
    path = tmp_path / "last.pt"
    save_checkpoint(state_of(model, loss, opt), path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated, corrupt or not a pml-dsb checkpoint"):
            load_checkpoint(path)


def test_flipped_bytes_inside_a_tensor_are_refused(tmp_path):
    # torch.load does not check the zip's checksums: other weights loaded silently
    import zipfile

    model, loss, opt = make()
    path = tmp_path / "last.pt"
    save_checkpoint(state_of(model, loss, opt), path)
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)  # the largest tensor's bytes
    data = bytearray(path.read_bytes())
    local = info.header_offset  # its local header: name and extra-field lengths at bytes 26 and 28
    start = local + 30 + int.from_bytes(data[local + 26 : local + 28], "little") + int.from_bytes(
        data[local + 28 : local + 30], "little")
    data[start + 8 : start + 24] = bytes(255 - b for b in data[start + 8 : start + 24])
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"corrupt \\(the checksum of '{info.filename}' does not match"):
        load_checkpoint(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_foreign_files_are_refused(tmp_path):
    model, loss, opt = make()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo should never run",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"format": FORMAT_TAG, "payload": Evil()}, fh)
    with pytest.raises(CheckpointError, match="cannot read the checkpoint"):
        load_checkpoint(path)

    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)  # a valid torch file, but not ours
    with pytest.raises(CheckpointError, match="format tag None"):
        load_checkpoint(plain)

    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError):
        load_checkpoint(text)


def test_version_kind_keys_and_run_are_checked(tmp_path):
    model, loss, opt = make()
    path = tmp_path / "x.pt"
    bad = state_of(model, loss, opt)
    bad["version"] = 99
    torch.save(bad, path)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)
    bad = state_of(model, loss, opt)
    del bad["optimizers"]
    torch.save(bad, path)
    with pytest.raises(CheckpointError, match="missing optimizers"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="missing optimizers"):
        save_checkpoint(bad, tmp_path / "y.pt")  # checked before writing
    assert not (tmp_path / "y.pt").exists()
    save_checkpoint(state_of(model, loss, opt, kind="best"), path)
    with pytest.raises(CheckpointError, match="a 'best' checkpoint where a 'last' one was expected"):
        load_checkpoint(path, kind="last")
    with pytest.raises(CheckpointError, match="of method 'DSB-ST', expected 'ST'"):
        load_checkpoint(path, method="ST")
    with pytest.raises(CheckpointError, match="of seed 0, expected 1"):
        load_checkpoint(path, seed=1)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_restore_of_a_misfitting_checkpoint_applies_nothing(tmp_path):
    model, loss, opt = make(num_classes=3)
    path = tmp_path / "last.pt"
    save_checkpoint(state_of(model, loss, opt), path)
    state = load_checkpoint(path)
    # same model shape, a loss with another number of classes: the model loads first, then the loss fails
    model2, loss2, opt2 = make(num_classes=4, seed=5)
    before = snapshot(model2, loss2, opt2)
    torch_rng = torch.get_rng_state()
    with pytest.raises(CheckpointError, match="(?s)does not fit this run .*nothing was applied"):
        restore_training_state(state, model2, loss2, {"all": opt2})
    assert_same(before, snapshot(model2, loss2, opt2))
    assert torch.equal(torch_rng, torch.get_rng_state())
    with pytest.raises(CheckpointError, match="optimizers"):
        restore_training_state(state, model2, loss2, {"model": opt2, "loss": opt2})
    assert_same(before, snapshot(model2, loss2, opt2))
    # more optimizers in the checkpoint than given: not "exactly those given" either
    model3, loss3, opt3 = make(num_classes=3, seed=5)
    before = snapshot(model3, loss3, opt3)
    extra = {**state, "optimizers": {"all": state["optimizers"]["all"], "other": state["optimizers"]["all"]}}
    with pytest.raises(CheckpointError, match=r"optimizers \['all', 'other'\] in the checkpoint, expected \['all'\]"):
        restore_training_state(extra, model3, loss3, {"all": opt3})
    assert_same(before, snapshot(model3, loss3, opt3))


def test_a_failing_rng_restore_puts_every_rng_back():
    """A checkpoint whose torch RNG state is valid but numpy's is not: the
    restore fails after torch's was set, and torch's is put back too."""
    model, loss, opt = make()
    state = state_of(model, loss, opt)
    torch.manual_seed(999)
    state["rng"] = {**state["rng"], "torch": torch.get_rng_state()}
    state["rng"]["numpy"] = {**state["rng"]["numpy"], "name": "not-a-bitgen"}
    torch.manual_seed(123)
    torch_before, numpy_before = torch.get_rng_state(), np.random.get_state()
    before = snapshot(model, loss, opt)
    with pytest.raises(CheckpointError, match="nothing was applied"):
        restore_training_state(state, model, loss, {"all": opt})
    assert torch.equal(torch.get_rng_state(), torch_before)
    assert repr(np.random.get_state()) == repr(numpy_before)
    assert_same(before, snapshot(model, loss, opt))


def test_a_crash_during_the_write_keeps_the_previous_file(tmp_path, monkeypatch):
    model, loss, opt = make()
    path = tmp_path / "last.pt"
    save_checkpoint(state_of(model, loss, opt, epoch=1), path)
    good = path.read_bytes()

    def dying_save(obj, fh):
        fh.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("killed during the write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(state_of(model, loss, opt, epoch=2), path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["last.pt"]
    assert load_checkpoint(path)["epoch"] == 1
    # a temporary file left by a SIGKILL is removed by the next save
    (tmp_path / ".last.pt.tmp-stale").write_bytes(b"junk")
    save_checkpoint(state_of(model, loss, opt, epoch=3), path)
    assert os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX's")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_permissions_open_gives(tmp_path, umask, monkeypatch):
    """tempfile.mkstemp creates files readable by their owner only and
    os.replace keeps that: results.json, result.json and the checkpoints of
    a run came out 0600 beside its 0644 tables (unreadable to colleagues
    sharing the folder). An existing file keeps its mode, as with open."""
    from pml_dsb.runner.training import write_json_atomic

    model, loss, opt = make()
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as fh:  # the reference: what open gives
            fh.write("x")
        # the umask is read by the OS at creation: never set and put back (another
        # thread creating a file meanwhile would get mode 0666)
        monkeypatch.setattr(os, "umask", lambda *a: pytest.fail("os.umask called"))
        save_checkpoint(state_of(model, loss, opt, epoch=1), tmp_path / "last.pt")
        write_json_atomic({"a": 1}, tmp_path / "results.json")
        monkeypatch.undo()
        want = (tmp_path / "plain.txt").stat().st_mode & 0o777
        assert want == 0o666 & ~umask
        assert {(tmp_path / name).stat().st_mode & 0o777 for name in ("last.pt", "results.json")} == {want}
        os.chmod(tmp_path / "results.json", 0o640)
        write_json_atomic({"a": 2}, tmp_path / "results.json")
        assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_json_writes_work_where_modes_cannot_be_set_and_leave_other_writers_files(tmp_path, monkeypatch):
    """Some mounts (FUSE, CIFS, vfat) refuse chmod: the write still happens.
    Another process's temporary file of the same path, still being written,
    is not removed (two writers of one JSON file then failed in os.replace)."""
    from pml_dsb.runner.training import write_json_atomic

    (tmp_path / ".r.json.tmp-other").write_text("in progress")
    write_json_atomic({"a": 1}, tmp_path / "r.json")

    def refuse(*args, **kwargs):
        raise PermissionError("operation not permitted")

    monkeypatch.setattr(os, "chmod", refuse)
    write_json_atomic({"a": 2}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 2}
    assert sorted(os.listdir(tmp_path)) == [".r.json.tmp-other", "r.json"]


def test_rng_state_round_trip():
    saved = capture_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(saved)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_json_files_are_strict_and_a_file_that_is_not_text_is_named(tmp_path):
    import re

    from pml_dsb._json import read_json
    from pml_dsb.runner.training import write_json_atomic

    path = tmp_path / "r.json"
    write_json_atomic({np.int64(3): (np.float32(np.nan), np.inf, -np.inf), "a": np.array([1.5, np.nan]),
                       "b": np.float64(np.inf), "c": [np.int32(2), np.bool_(True)]}, path)
    strict = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"non-strict JSON {name}"))
    assert strict == {"3": [None, None, None], "a": [1.5, None], "b": None, "c": [2, True]}
    assert read_json(str(path)) == strict
    path.write_bytes(b"\xff\xfe\x00{")  # neither JSON nor UTF-8
    with pytest.raises(ValueError, match=re.escape(f"{path}: not valid JSON")):
        read_json(str(path))


def test_rng_states_mid_stream_and_with_cached_gaussians_round_trip_through_a_checkpoint(tmp_path):
    # numpy's legacy generator mid-block (pos 22 of 624) and holding the second value of a
    # Box-Muller pair; Python's random holding gauss_next: a resume must replay them exactly
    def advance():
        np.random.seed(3)
        np.random.rand(5)
        np.random.standard_normal()
        random.seed(3)
        random.gauss(0.0, 1.0)
        torch.manual_seed(3)
        torch.rand(2)

    def draws():
        return (torch.rand(3).tolist(), np.random.standard_normal(3).tolist(), np.random.rand(2).tolist(),
                random.gauss(0.0, 1.0), random.random())

    model, loss, opt = make()
    advance()
    assert 0 < np.random.get_state()[2] < 624 and np.random.get_state()[3] == 1 and random.getstate()[2] is not None
    path = tmp_path / "last.pt"
    save_checkpoint(state_of(model, loss, opt), path)  # captures the RNG states
    advance()
    expected = draws()
    np.random.seed(99), random.seed(99), torch.manual_seed(99)
    restore_rng_state(load_checkpoint(path)["rng"])
    assert draws() == expected


def test_a_checkpoint_of_epoch_zero_is_valid_and_a_negative_epoch_is_not(tmp_path):
    # "epoch must be a non-negative int": epoch 0 (the untrained network) is a checkpoint too
    model, loss, opt = make()
    path = tmp_path / "best.pt"
    save_checkpoint(state_of(model, loss, opt, epoch=0, kind="best"), path)
    assert load_checkpoint(path, kind="best")["epoch"] == 0
    with pytest.raises(CheckpointError, match="epoch must be a non-negative int, got -1"):
        save_checkpoint(state_of(model, loss, opt, epoch=-1, kind="best"), tmp_path / "neg.pt")
    for epoch in (2.0, "2"):  # an epoch count, not a number that looks like one
        with pytest.raises(CheckpointError, match=f"epoch must be a non-negative int, got {epoch!r}"):
            save_checkpoint(state_of(model, loss, opt, epoch=epoch, kind="best"), tmp_path / "odd.pt")


def test_schedulers_must_be_exactly_those_in_the_checkpoint():
    model, loss, opt = make()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    state = state_of(model, loss, opt)
    state["schedulers"] = {"all": sched.state_dict()}
    model2, loss2, opt2 = make(seed=5)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    before = snapshot(model2, loss2, opt2, sched2)
    with pytest.raises(CheckpointError, match=r"schedulers \['all'\] in the checkpoint, expected \['model'\]"):
        restore_training_state(state, model2, loss2, {"all": opt2}, {"model": sched2})
    assert_same(before, snapshot(model2, loss2, opt2, sched2))
    with pytest.raises(CheckpointError, match=r"schedulers \[\] in the checkpoint, expected \['all'\]"):
        restore_training_state({**state, "schedulers": {}}, model2, loss2, {"all": opt2}, {"all": sched2})
    assert_same(before, snapshot(model2, loss2, opt2, sched2))


def test_a_loss_state_that_is_not_all_tensors_is_refused(tmp_path):
    model, loss, opt = make()
    state = state_of(model, loss, opt, kind="best")
    state["loss"] = {**state["loss"], "note": "not a tensor"}
    with pytest.raises(CheckpointError, match="'loss' is not a state_dict of tensors"):
        save_checkpoint(state, tmp_path / "best.pt")
    torch.save(state, tmp_path / "best.pt")  # written by something else
    with pytest.raises(CheckpointError, match="'loss' is not a state_dict of tensors"):
        load_checkpoint(tmp_path / "best.pt")
