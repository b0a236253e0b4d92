"""The one place where optional dependencies are imported.

Each helper returns the module or raises ``ModuleNotFoundError`` with the
exact pip command that installs it, instead of failing later with a
``NameError`` the way a silently skipped import does.
"""
from __future__ import annotations

import importlib
from types import ModuleType

# module name -> pip command that provides it
_INSTALL = {
    "faiss": 'pip install "pml-dsb[cpu]"  (or "pml-dsb[gpu]" for faiss-gpu)',
    "matplotlib": 'pip install "pml-dsb[plot]"',
    "record_keeper": 'pip install "pml-dsb[record]"',
    "torch.utils.tensorboard": 'pip install "pml-dsb[tensorboard]"',
}


def require(module: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise ``ModuleNotFoundError`` naming the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError as err:  # ModuleNotFoundError or a broken install
        why = f" for {purpose}" if purpose else ""
        hint = _INSTALL.get(module, f"pip install {module.split('.')[0]}")
        raise ModuleNotFoundError(
            f"{module!r} is required{why} but could not be imported ({err}). "
            f"Install it with: {hint}"
        ) from err


def faiss() -> ModuleType:
    return require("faiss", "nearest-neighbour search and k-means")


def matplotlib_pyplot() -> ModuleType:
    mpl = require("matplotlib", "plots")
    mpl.use("Agg")  # headless: never open a window
    return importlib.import_module("matplotlib.pyplot")


def record_keeper() -> ModuleType:
    return require("record_keeper", "logging with PML's HookContainer")
