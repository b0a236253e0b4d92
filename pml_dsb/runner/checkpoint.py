"""Checkpoints that survive a kill: atomic writes, validated all-or-nothing loads.

:func:`save_checkpoint` writes to a temporary file in the target's folder,
flushes and ``fsync``\\ s it, then ``os.replace``\\ s it over the target (and
syncs the folder), so that a reader sees either the previous complete file or
the new complete file, never a partial one. A kill during the write leaves at
most a ``.<name>.tmp-*`` file, which the next save removes. The file gets the
permissions a plain ``open`` gives (a new one 0666 less the umask).

:func:`load_checkpoint` reads with ``torch.load(weights_only=True)`` (no code
runs from the file), then refuses, with :class:`CheckpointError`, a file that
is truncated or not a torch file, that lacks this package's format tag, has
another format version, or misses a required key. :func:`restore_training_state`
applies a checkpoint to live objects transactionally: it snapshots every
target first and puts the snapshots back if any part fails, so nothing is
ever half-loaded.

Format (``FORMAT_TAG``, ``FORMAT_VERSION`` = 1): a dict with ``format``,
``version``, ``kind`` (``"last"`` or ``"best"``), ``method``, ``seed``,
``epoch`` and ``model`` (a state_dict), plus, by kind, the keys listed in
``REQUIRED_KEYS``. Everything else in it is plain data (dicts, lists,
numbers, strings, tensors), so it loads with ``weights_only=True``.
"""
from __future__ import annotations

import copy
import logging
import os
import pickle
import random
import zipfile
import zlib
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

from .._atomic import atomic_file

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "FORMAT_TAG",
    "FORMAT_VERSION",
    "REQUIRED_KEYS",
    "save_checkpoint",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "restore_training_state",
]

FORMAT_TAG = "pml-dsb-checkpoint"
FORMAT_VERSION = 1
_COMMON = ("format", "version", "kind", "method", "seed", "epoch", "model", "loss", "metrics")
REQUIRED_KEYS = {
    "best": _COMMON,
    "last": _COMMON + ("optimizers", "schedulers", "rng", "sampler", "history", "best", "config", "finished"),
}


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: truncated, foreign, wrong version or incomplete."""


def save_checkpoint(state: Mapping[str, Any], path: Union[str, os.PathLike]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, ``os.replace``).

    ``state`` must carry ``format``/``version`` (use :data:`FORMAT_TAG`,
    :data:`FORMAT_VERSION`) and the keys its ``kind`` requires; this is
    checked before anything is written.
    """
    _validate(state, os.fspath(path))
    with atomic_file(path, binary=True, remove_stale=True) as fh:
        torch.save(dict(state), fh)


def _validate(state: Any, path: str, kind: Optional[str] = None) -> None:
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: not a pml-dsb checkpoint (holds a {type(state).__name__}, not a dict)")
    if state.get("format") != FORMAT_TAG:
        raise CheckpointError(
            f"{path}: not a pml-dsb checkpoint (format tag {state.get('format')!r}, expected {FORMAT_TAG!r})"
        )
    if state.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {state.get('version')!r}; this pml-dsb reads version "
            f"{FORMAT_VERSION}"
        )
    found = state.get("kind")
    if found not in REQUIRED_KEYS:
        raise CheckpointError(f"{path}: unknown checkpoint kind {found!r}, expected one of {sorted(REQUIRED_KEYS)}")
    if kind is not None and found != kind:
        raise CheckpointError(f"{path}: a {found!r} checkpoint where a {kind!r} one was expected")
    missing = [k for k in REQUIRED_KEYS[found] if k not in state]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    for key in ("model", "loss"):
        if not isinstance(state[key], Mapping) or not all(torch.is_tensor(v) for v in state[key].values()):
            raise CheckpointError(f"{path}: {key!r} is not a state_dict of tensors")
    if not isinstance(state["epoch"], int) or state["epoch"] < 0:
        raise CheckpointError(f"{path}: epoch must be a non-negative int, got {state['epoch']!r}")


def load_checkpoint(
    path: Union[str, os.PathLike],
    kind: Optional[str] = None,
    map_location: Union[str, torch.device, None] = "cpu",
    method: Optional[str] = None,
    seed: Optional[int] = None,
) -> dict:
    """Read and validate a checkpoint; nothing is applied to any object.

    Args:
        kind: ``"last"`` or ``"best"`` to require that kind.
        method, seed: when given, the checkpoint must be of that run.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: truncated or unreadable file, foreign content (any
            pickle this package did not write, which ``weights_only`` loading
            also keeps from running code), wrong format version, missing keys,
            another run's checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    # torch.load does not check the zip's CRC-32s: flipped bytes in a tensor loaded as other weights
    damaged = _damaged_member(path)
    if damaged is not None:
        raise CheckpointError(f"{path}: corrupt (the checksum of {damaged!r} does not match its bytes)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile,
            AttributeError, ImportError, TypeError, KeyError, IndexError) as err:
        size = os.path.getsize(path)
        raise CheckpointError(
            f"{path}: cannot read the checkpoint ({size} bytes): it is truncated, corrupt or not a "
            f"pml-dsb checkpoint ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    _validate(state, path, kind)
    if method is not None and state["method"] != method:
        raise CheckpointError(f"{path}: checkpoint of method {state['method']!r}, expected {method!r}")
    if seed is not None and state["seed"] != seed:
        raise CheckpointError(f"{path}: checkpoint of seed {state['seed']!r}, expected {seed!r}")
    return state


def _damaged_member(path: str) -> Optional[str]:
    """The first member of a zip checkpoint whose CRC-32 fails (None: all pass,
    or not a zip, which torch.load then judges)."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as err:
        return f"the archive ({type(err).__name__})"


# --------------------------------------------------------------- RNG state
def capture_rng_state(device: Union[str, torch.device] = "cpu") -> dict:
    """torch (CPU and, on a CUDA device, all GPUs), numpy and ``random`` global
    states as plain data that ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
        "cuda": [],
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state((
        np_state["name"], np_state["keys"].cpu().numpy().astype(np.uint32), np_state["pos"],
        np_state["has_gauss"], np_state["cached_gaussian"],
    ))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    if state.get("cuda"):
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _snapshot(obj: Any) -> Any:
    return copy.deepcopy(obj.state_dict())


def restore_training_state(
    state: Mapping[str, Any],
    model: torch.nn.Module,
    loss: torch.nn.Module,
    optimizers: Mapping[str, torch.optim.Optimizer] = (),
    schedulers: Mapping[str, Any] = (),
    rng: bool = True,
    path: str = "<checkpoint>",
) -> None:
    """Apply a validated checkpoint to live objects, all or nothing.

    Model and loss state_dicts are loaded strictly; the optimizers and
    schedulers named in the checkpoint must be exactly those given. Every
    object is snapshotted first; if any load fails, all of them get their
    snapshot back and :class:`CheckpointError` is raised. The RNG states are
    set last, once everything else succeeded.
    """
    optimizers = dict(optimizers)
    schedulers = dict(schedulers)
    if optimizers and set(state.get("optimizers", {})) != set(optimizers):
        raise CheckpointError(
            f"{path}: optimizers {sorted(state.get('optimizers', {}))} in the checkpoint, "
            f"expected {sorted(optimizers)}"
        )
    if schedulers and set(state.get("schedulers", {})) != set(schedulers):
        raise CheckpointError(
            f"{path}: schedulers {sorted(state.get('schedulers', {}))} in the checkpoint, "
            f"expected {sorted(schedulers)}"
        )
    targets = [("model", model, state["model"]), ("loss", loss, state["loss"])]
    targets += [(f"optimizers.{k}", v, state["optimizers"][k]) for k, v in optimizers.items()]
    targets += [(f"schedulers.{k}", v, state["schedulers"][k]) for k, v in schedulers.items()]
    snapshots = [(name, obj, _snapshot(obj)) for name, obj, _ in targets]
    current = None
    try:
        for name, obj, sd in targets:
            current = name
            if isinstance(obj, torch.nn.Module):
                obj.load_state_dict(sd, strict=True)
            else:
                obj.load_state_dict(sd)
        if rng:
            current = "rng"
            rng_snapshot = capture_rng_state()
            try:
                restore_rng_state(state["rng"])
            except Exception:
                restore_rng_state(rng_snapshot)
                raise
    except Exception as err:
        for _, obj, sd in snapshots:
            obj.load_state_dict(sd)
        raise CheckpointError(
            f"{path}: the checkpoint does not fit this run ({current}: {type(err).__name__}: {err}); "
            f"nothing was applied"
        ) from err
