"""Devices given by name, checked against this machine."""
from __future__ import annotations

import torch


def resolve_device(device) -> torch.device:
    """``device`` as a ``torch.device`` this machine has, else ``ValueError``
    naming it: torch raises only at the first tensor moved there (a runner had
    written its run folder by then, a calculator was built)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device: {err}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available in this torch installation/machine")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if resolved.type not in ("cpu", "cuda") and not _available(resolved.type):
        # xpu, mps, ... failed at the first tensor (an assertion); meta holds no data
        raise ValueError(f"device {device!r}: this machine has no {resolved.type} device; use cpu or cuda")
    return resolved


def _available(device_type: str) -> bool:
    if device_type == "mps":
        return torch.backends.mps.is_available()
    is_available = getattr(getattr(torch, device_type, None), "is_available", None)  # torch.xpu, torch.mtia, ...
    return bool(is_available()) if callable(is_available) else False
