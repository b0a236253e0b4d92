"""Issue 5, part 3: a run killed at any point resumes from its last complete
checkpoint with nothing lost; a truncated or foreign checkpoint is refused,
never half-loaded. Uses the runner's ``pml_dsb.runner.checkpoint``.
"""
import datetime
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint_testlib as lib

checkpoint = pytest.importorskip("pml_dsb.runner.checkpoint")
CheckpointError = checkpoint.CheckpointError

STEPS = 8


def _states(model, loss, optimizers):
    out = {"model": model.state_dict(), "loss": loss.state_dict()}
    out.update({f"opt.{k}": v.state_dict() for k, v in optimizers.items()})
    return {k: _clone(v) for k, v in out.items()}


def _clone(x):
    if torch.is_tensor(x):
        return x.clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def _assert_equal(a, b, where="state"):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def uninterrupted():
    model, loss, optimizers, losses = lib.run(STEPS)
    assert loss.memory.stage == 3  # the resumed part runs weighted
    return _states(model, loss, optimizers), losses


@pytest.fixture
def saved(tmp_path):
    """``last.pt`` after 3 steps, and live objects of another run (1 step) to load into."""
    path = tmp_path / "last.pt"
    lib.run(3, path=path)
    live = lib.run(1)[:3]
    return path, live


@pytest.mark.parametrize("keep", [0, 1, 64, 0.5, -1], ids=["empty", "1B", "64B", "half", "all-but-1"])
def test_truncated_checkpoint_is_refused_and_nothing_is_applied(saved, tmp_path, keep):
    path, live = saved
    data = path.read_bytes()
    cut = len(data) - 1 if keep == -1 else int(len(data) * keep) if isinstance(keep, float) else keep
    broken = tmp_path / "truncated.pt"
    broken.write_bytes(data[:cut])
    before = _states(*live)
    refused = "cannot read the checkpoint .*truncated, corrupt or not a pml-dsb checkpoint"
    with pytest.raises(CheckpointError, match=refused):
        state = checkpoint.load_checkpoint(broken, kind="last")
        checkpoint.restore_training_state(state, *live)  # never reached
    _assert_equal(before, _states(*live))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_foreign_checkpoints_are_refused(saved, tmp_path):
    path, live = saved
    before = _states(*live)
    plain = tmp_path / "plain.pt"
    torch.save({"model": live[0].state_dict()}, plain)
    with pytest.raises(CheckpointError, match="not a pml-dsb checkpoint"):
        checkpoint.load_checkpoint(plain)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(os.system))  # a raw pickle naming a function: never unpickled
    with pytest.raises(CheckpointError, match="cannot read the checkpoint"):
        checkpoint.load_checkpoint(evil)
    other = tmp_path / "other.pt"
    torch.save({"when": datetime.timedelta(days=1)}, other)  # a torch file with objects weights_only refuses
    with pytest.raises(CheckpointError, match="cannot read the checkpoint"):
        checkpoint.load_checkpoint(other)
    _assert_equal(before, _states(*live))


def test_checkpoint_of_another_memory_is_rolled_back_entirely(saved):
    path, live = saved
    state = checkpoint.load_checkpoint(path, kind="last")
    model, loss, optimizers = live
    # a loss whose memory has another size: the model loads first, then the loss fails
    from pml_dsb import DSBSoftTripleLoss

    torch.manual_seed(0)
    other = DSBSoftTripleLoss(lib.C, lib.D, centers_per_class=2, memory_size=lib.M + 1, warmup_epochs=1)
    optimizers = dict(optimizers, loss=torch.optim.SGD(other.parameters(), lr=0.05, momentum=0.9))
    before = _states(model, other, optimizers)
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointError, match="nothing was applied"):
        checkpoint.restore_training_state(state, model, other, optimizers)
    _assert_equal(before, _states(model, other, optimizers))
    assert torch.equal(rng, torch.get_rng_state())


def test_kill_during_a_write_leaves_the_previous_checkpoint(saved, monkeypatch):
    path, live = saved
    good = path.read_bytes()
    real_save = torch.save

    def torn_save(obj, fh, *args, **kwargs):  # half the bytes, then the process "dies"
        real_save(obj, fh, *args, **kwargs)
        fh.flush()
        fh.truncate(fh.tell() // 2)
        raise KeyboardInterrupt("killed during the write")

    monkeypatch.setattr(checkpoint.torch, "save", torn_save)
    model, loss, optimizers = live
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(lib.checkpoint_state(4, model, loss, optimizers, []), path)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert path.read_bytes() == good
    assert checkpoint.load_checkpoint(path, kind="last")["epoch"] == 3
    # what a SIGKILL leaves (no cleanup): a temporary file, removed by the next save
    leftover = path.parent / f".{path.name}.tmp-killed"
    leftover.write_bytes(good[: len(good) // 3])
    checkpoint.save_checkpoint(lib.checkpoint_state(4, model, loss, optimizers, []), path)
    assert not leftover.exists()
    assert checkpoint.load_checkpoint(path, kind="last")["epoch"] == 4


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted):
    path = tmp_path / "last.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(
        [sys.executable, lib.__file__, str(path), str(STEPS * 1000)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        deadline, line = time.monotonic() + 120, ""
        while line.strip() != "saved 3":
            assert time.monotonic() < deadline, "the training process did not reach step 3 in time"
            line = proc.stdout.readline()
            assert line or proc.poll() is None, f"the training process ended early (exit {proc.returncode})"
        proc.send_signal(signal.SIGKILL)  # between iterations or in the middle of a write
    finally:
        proc.kill()
        proc.wait(timeout=30)
    state = checkpoint.load_checkpoint(path, kind="last")
    assert state["epoch"] >= 3
    if state["epoch"] >= STEPS:
        pytest.skip(f"the process was killed too late (after step {state['epoch']})")
    model, loss, optimizers, losses = lib.run(STEPS, start_state=state)
    expected_states, expected_losses = uninterrupted
    assert losses == expected_losses
    _assert_equal(expected_states, _states(model, loss, optimizers))
