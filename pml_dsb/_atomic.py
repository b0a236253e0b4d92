"""Files written whole or not at all: what the run folder keeps (results, checkpoints)."""
from __future__ import annotations

import contextlib
import glob
import os
import secrets
import stat
from typing import IO, Iterator, Union


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


def _create_beside(path: str) -> tuple[int, str]:
    """A new, empty ``.<name>.tmp-<random>`` file in ``path``'s folder, opened for
    writing, with the mode a plain ``open`` gives a new file (0666 less the
    umask: ``tempfile.mkstemp`` makes it 0600, and ``os.replace`` keeps that)."""
    folder, base = os.path.split(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(folder, f".{base}.tmp-{secrets.token_hex(6)}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_file(path: Union[str, os.PathLike], binary: bool = False, remove_stale: bool = False) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; when the block ends
    without an error it is flushed, synced and renamed to ``path`` (which so
    holds the old content or the new, never a part), else removed.

    The file gets the permissions a plain ``open`` would give: a new file
    0666 less the umask, an existing one its own mode (as far as the file
    system lets it be set). ``remove_stale``: first remove the temporary
    files of ``path`` that a process killed while writing it left (only for
    a path no other process writes at the same time)."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    if remove_stale:
        for stale in glob.glob(os.path.join(folder, f".{glob.escape(os.path.basename(path))}.tmp-*")):
            with contextlib.suppress(OSError):
                os.remove(stale)
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(OSError):  # FileNotFoundError: a new file; others: a file system without modes
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(folder)
