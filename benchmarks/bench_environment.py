"""What a benchmark's JSON records about its run, so that a figure can be traced
to the code, versions and settings that gave it."""
from __future__ import annotations

import os
import platform
import subprocess
from typing import Optional

_HERE = os.path.dirname(os.path.abspath(__file__))


def git_revision() -> tuple[str, Optional[bool]]:
    """(HEAD of this checkout, whether its tracked files differ from it)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=_HERE).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, cwd=_HERE).stdout
    except OSError:
        return "unknown", None
    return rev or "unknown", (status.strip() != "") if rev else None


def run_settings(args=None) -> dict:
    """Versions, threads, git revision and the command line's arguments."""
    import torch

    rev, dirty = git_revision()
    return dict(
        python=platform.python_version(), platform=platform.platform(), cpu_count=os.cpu_count(),
        torch=torch.__version__, threads=torch.get_num_threads(), git_revision=rev, git_dirty=dirty,
        arguments=None if args is None else {k: v for k, v in vars(args).items() if not k.startswith("_")},
    )
