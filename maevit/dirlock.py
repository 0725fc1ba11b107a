"""One writer per directory: an advisory lock on ``DIR/.lock``.

Run directories (``maevit pretrain | finetune | probe``) and shard output
directories (``maevit shards write``) are written by one process at a time. The
lock is a POSIX record lock (``fcntl.lockf``) on ``DIR/.lock``: the operating
system drops it when the holding process ends, however it ends (``kill -9``
included), so a lock never outlives its holder and never blocks the resume of
a killed run. (Not ``flock``: forked data-loader workers would inherit a
``flock`` and keep it for a few seconds after their parent was killed; record
locks belong to the process. They also work on NFS.) While held,
the file names the holder (host, pid, start time, command) for the message the
next process prints; it is emptied on release.

Within one process the lock is re-entrant (calling ``lock_dir`` again for a
held directory is a no-op), so library users may call ``train`` twice in a
row on one directory. Caveat of record locks: the process must not open and
close ``.lock`` elsewhere while it holds it. Where the file system cannot lock (some network
file systems, non-POSIX platforms) a warning says that concurrent writers are
not detected, and work goes on.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"

_held: dict[str, int] = {}  # real path of a lock file -> its open descriptor (this process holds it)


class DirLockedError(RuntimeError):
    """Another process holds the directory's lock; the message names it and says what to do."""


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("time", 0)))
    cmd = f", `{info['command']}`" if info.get("command") else ""
    return f"process {info['pid']} on host {info.get('host', '?')} (started {started}{cmd})"


def lock_dir(directory: str | os.PathLike, *, purpose: str, advice: str) -> Path:
    """Take the lock of ``directory`` (created if missing) for this process, or refuse.

    Args:
        directory: the directory to lock.
        purpose: what the directory is, for the message (e.g. "run directory").
        advice: what the user should do when it is taken (the last sentence of the message).

    Returns:
        The lock file.

    Raises:
        DirLockedError: another live process holds it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    key = os.path.realpath(path)
    if key in _held or fcntl is None:
        if fcntl is None:
            logger.warning("cannot lock %s on this platform: concurrent writers are not detected", directory)
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exn:
        if exn.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = _holder(fd)
            os.close(fd)
            raise DirLockedError(f"{purpose} {directory} is in use by {holder}. {advice}") from None
        os.close(fd)  # ENOLCK, EOPNOTSUPP, ...: the file system cannot lock
        logger.warning("cannot lock %s (%s): concurrent writers are not detected", path, exn.strerror or exn)
        return path
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    prog = "maevit" if argv0.parts[-2:] == ("maevit", "cli.py") else argv0.name  # `python -m maevit.cli`
    info = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
            "command": " ".join([prog, *sys.argv[1:]])[:500]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[key] = fd
    return path


def unlock_dir(directory: str | os.PathLike) -> None:
    """Release this process's lock of ``directory`` (no-op if it holds none)."""
    fd = _held.pop(os.path.realpath(Path(directory) / LOCK_NAME), None)
    if fd is None:
        return
    try:
        os.ftruncate(fd, 0)  # the holder's details are stale from now on
    except OSError:
        pass
    os.close(fd)  # closing the descriptor releases the lock
