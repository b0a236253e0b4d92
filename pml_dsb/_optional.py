"""The one place where optional dependencies are imported.

Each helper returns the module or raises ``ModuleNotFoundError`` with the
exact pip command that installs it, instead of failing later with a
``NameError`` the way a silently skipped import does.
"""
from __future__ import annotations

import importlib
from types import ModuleType

# module name -> pip command that provides it: the package itself, and the extra
# of pml-dsb that brings it (installed from a checkout, as README's quick start
# does, "pml-dsb[...]" names a distribution pip cannot find)
_INSTALL = {
    "faiss": 'pip install faiss-cpu  (or faiss-gpu; the extra "pml-dsb[cpu]"/"[gpu]", '
             'pip install -e ".[cpu]" in a checkout)',
    "matplotlib": 'pip install matplotlib  (the extra "pml-dsb[plot]", pip install -e ".[plot]" in a checkout)',
    "record_keeper": 'pip install record-keeper  (the extra "pml-dsb[record]", '
                     'pip install -e ".[record]" in a checkout)',
    "torch.utils.tensorboard": 'pip install tensorboard  (the extra "pml-dsb[tensorboard]", '
                               'pip install -e ".[tensorboard]" in a checkout)',
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
