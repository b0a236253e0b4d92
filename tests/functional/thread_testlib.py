"""Run a Python snippet in a fresh process with 2 torch/BLAS threads, under a
time limit: torch 2.14.1's CPU LAPACK hung there on matrices of size >= 256."""
import json
import os
import subprocess
import sys

import pytest


def run_with_two_threads(script: str, cwd, what: str, timeout: float = 120) -> dict:
    """Run ``script`` (which must set 2 threads and print one JSON line last) in ``cwd``;
    fail the test, naming ``what``, if it does not finish in ``timeout`` seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not finish in {timeout:.0f} s with 2 torch threads (LAPACK hang?)")
    assert proc.returncode == 0, proc.stderr
    assert "SLASWP" not in proc.stderr  # LAPACK's complaint before the float32 hang
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["threads"] == 2
    return out
