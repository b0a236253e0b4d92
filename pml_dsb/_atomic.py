"""Files written whole or not at all: what the run folder keeps (results, checkpoints)."""
from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from typing import IO, Iterator, Union


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and put back
    os.umask(mask)
    return mask


def fsync_dir(folder: str) -> None:
    """Flush ``folder``'s entries (a replaced file's new name) to disk, where the OS allows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Union[str, os.PathLike], binary: bool = False) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; when the block ends
    without an error it is flushed, synced and renamed to ``path`` (which so
    holds the old content or the new, never a part), else removed.

    The file gets the permissions a plain ``open`` would give (0666 less the
    umask): ``tempfile.mkstemp`` creates it readable by its owner only, and
    ``os.replace`` keeps that, so results in a shared folder were unreadable
    to others. Temporary files left by a process killed while writing
    ``path`` are removed first."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    for stale in glob.glob(os.path.join(folder, f".{glob.escape(base)}.tmp-*")):
        with contextlib.suppress(OSError):
            os.remove(stale)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp-", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(folder)
