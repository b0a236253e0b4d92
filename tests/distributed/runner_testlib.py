"""Launching ``pml-dsb bench`` under torchrun for the runner's distributed tests.

:func:`torchrun` starts ``python -m torch.distributed.run --nproc_per_node=N
... -m pml_dsb.cli <args>`` (or this file) on 127.0.0.1 with gloo, and kills
the whole process group after a time limit. Run as a script, this file is
``pml-dsb`` with the runner's embedding network stripped of its BatchNorm
layers (:func:`build_without_batchnorm`): BatchNorm normalises each rank's
slice of the batch with that slice's statistics, the one part of a
distributed run that differs from one process by more than rounding.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from typing import NamedTuple, Optional, Sequence

import torch
from distributed_testlib import free_port

LAUNCH_TIMEOUT_S = 150  # one torchrun launch: startup, 2 methods x 2 tiny epochs, the run folder
_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def tiny_config(path, epochs: int = 2, methods: Sequence[str] = ("NSM", "DSB-NSM")):
    """The built-in digits-LT config made small (DSB weights from epoch 2 on), written to ``path``."""
    from pml_dsb.runner.config import default_config_path, dump_config, load_config

    cfg = load_config(default_config_path())
    cfg = dataclasses.replace(
        cfg, name="tiny", methods=list(methods), seeds=[0],
        model=dataclasses.replace(cfg.model, width=4, embedding_size=16),
        training=dataclasses.replace(cfg.training, epochs=epochs),
        dsb=dataclasses.replace(cfg.dsb, warmup_epochs=1),
        evaluation=dataclasses.replace(cfg.evaluation, nredo=2),
    )
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(dump_config(cfg))
    return str(path), cfg


class Launch(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    wall_s: float


def torchrun(args: Sequence[str], nproc: int = 2, script: Optional[str] = None,
             timeout_s: float = LAUNCH_TIMEOUT_S, attempts: int = 2) -> Launch:
    """``torchrun --nproc_per_node=nproc -m pml_dsb.cli *args`` (or ``script *args``) on CPU/gloo.

    Raises ``TimeoutError`` (after killing torchrun and its workers) when it
    runs past ``timeout_s``; retries once when the port was taken meanwhile.
    """
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    target = ["-m", "pml_dsb.cli"] if script is None else [script]
    for attempt in range(attempts):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *target, *args]
        t0 = time.perf_counter()
        # a session of its own: on timeout the workers go with torchrun
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise TimeoutError(f"{' '.join(cmd)} ran past {timeout_s} s\n--- stdout\n{out}\n--- stderr\n{err}")
        launch = Launch(proc.returncode, out, err, time.perf_counter() - t0)
        if launch.returncode == 0 or "address already in use" not in err.lower() or attempt == attempts - 1:
            return launch
    raise AssertionError("unreachable")


def strip_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every BatchNorm layer of ``model`` by ``nn.Identity``, in place."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
                setattr(module, name, torch.nn.Identity())
    return model


def build_without_batchnorm(config):
    """The runner's ``build_embedding_model`` without BatchNorm (draws the same random numbers)."""
    from pml_dsb.runner.builders import build_embedding_model

    return strip_batchnorm(build_embedding_model(config))


if __name__ == "__main__":
    from pml_dsb.runner import training

    training.build_embedding_model = build_without_batchnorm
    from pml_dsb.cli import main

    sys.exit(main(sys.argv[1:]))
