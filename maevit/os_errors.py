"""Operating-system errors a user causes and can fix (a read-only folder, a file where a folder belongs,
a full disk), turned into one paragraph for the command line instead of a traceback."""
from __future__ import annotations

import errno

# errno -> (what happened, what to do)
_EVERYDAY = {
    errno.EACCES: ("permission denied", "choose a path this user can write (or read), or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a path this user owns, or fix its permissions"),
    errno.EROFS: ("the file system is read-only", "write to a writable disk (e.g. another run.dir / OUT path)"),
    errno.EEXIST: ("a file is in the way", "a folder is expected there: pass another path, or move that file"),
    errno.ENOTDIR: ("a path component is a file, not a folder", "pass a folder path"),
    errno.EISDIR: ("a folder is where a file is expected", "pass a file path (e.g. OUT/name.safetensors)"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.ENOSPC: ("the disk is full", "free some space or use a larger disk, then run the same command again"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space or use another disk, then run the same command"),
    errno.ENAMETOOLONG: ("a file name is too long", "use a shorter path"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) or lower data.num_workers"),
}


def describe_os_error(exn: BaseException) -> str | None:
    """One paragraph for an everyday ``OSError`` (naming the path and what to do), else None."""
    if not isinstance(exn, OSError) or exn.errno not in _EVERYDAY:
        return None
    what, todo = _EVERYDAY[exn.errno]
    paths = [p for p in (exn.filename, exn.filename2) if p]
    where = f": {' -> '.join(str(p) for p in paths)}" if paths else ""
    return f"{what}{where} ({exn.strerror or exn}); {todo}. The command stopped at this step; what it wrote before is intact."


def exit_code_of(exn: OSError) -> int:
    """2 for a path the user gave, 1 for a full disk (the command was right; the machine was not)."""
    return 1 if exn.errno in (errno.ENOSPC, errno.EDQUOT) else 2
