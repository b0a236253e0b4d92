"""A tiny DSB training loop that checkpoints with ``pml_dsb.runner.checkpoint``.

Imported by ``test_checkpoint_faults.py``; run as a script (``python
checkpoint_testlib.py <last.pt> <steps>``) it trains, writes ``last.pt``
after every step and prints ``saved <step>``, so that a test can SIGKILL it
at any point and resume from what is on disk.
"""
from __future__ import annotations

import sys

import torch

C, D, IN, M, BATCH = 4, 6, 5, 20, 8


def build(seed: int = 0):
    """Model, DSB loss (with its memory), optimizers: the same on every call."""
    from pml_dsb import DSBSoftTripleLoss

    torch.manual_seed(seed)
    model = torch.nn.Linear(IN, D)
    loss = DSBSoftTripleLoss(C, D, centers_per_class=2, memory_size=M, warmup_epochs=1)
    optimizers = {
        "model": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        "loss": torch.optim.SGD(loss.parameters(), lr=0.05, momentum=0.9),
    }
    return model, loss, optimizers


def train_step(step: int, model, loss, optimizers) -> torch.Tensor:
    """One iteration; the batch comes from the step number, the noise from the global RNG."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, IN, generator=g) + 0.1 * torch.randn(BATCH, IN)  # global RNG: must resume too
    y = torch.randint(0, C, (BATCH,), generator=g)
    value = loss(model(x), y)
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    value.backward()
    for opt in optimizers.values():
        opt.step()
    return value.detach()


def checkpoint_state(step: int, model, loss, optimizers, losses) -> dict:
    """A ``"last"`` checkpoint as the runner writes it."""
    from pml_dsb.runner.checkpoint import FORMAT_TAG, FORMAT_VERSION, capture_rng_state

    return {
        "format": FORMAT_TAG,
        "version": FORMAT_VERSION,
        "kind": "last",
        "method": "dsb_st",
        "seed": 0,
        "epoch": step,
        "model": model.state_dict(),
        "loss": loss.state_dict(),
        "metrics": {},
        "optimizers": {k: v.state_dict() for k, v in optimizers.items()},
        "schedulers": {},
        "rng": capture_rng_state(),
        "sampler": {},
        "history": [float(v) for v in losses],
        "best": {},
        "config": {},
        "finished": False,
    }


def run(steps: int, path=None, start_state=None, announce=False):
    """Train ``steps`` steps (from a checkpoint's state when given); return the
    objects and the losses of every step. Saves ``last.pt`` after each step."""
    from pml_dsb.runner.checkpoint import restore_training_state, save_checkpoint

    model, loss, optimizers = build()
    torch.manual_seed(123)  # the run's global RNG
    losses, first = [], 1
    if start_state is not None:
        restore_training_state(start_state, model, loss, optimizers)
        losses, first = list(start_state["history"]), start_state["epoch"] + 1
    for step in range(first, steps + 1):
        losses.append(float(train_step(step, model, loss, optimizers)))
        if path is not None:
            save_checkpoint(checkpoint_state(step, model, loss, optimizers, losses), path)
            if announce:
                print(f"saved {step}", flush=True)
    return model, loss, optimizers, losses


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(int(sys.argv[2]), path=sys.argv[1], announce=True)
