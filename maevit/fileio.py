"""Crash-safe file writes, shared by model export and run directories.

A reader sees either the old file or the complete new one, never a torn one:
write to a temporary name beside the target, fsync, ``os.replace`` onto the
real name, fsync the directory.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside ``directory`` durable (a no-op where the OS cannot)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file under ``root`` (or ``root`` itself when it is a file)."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], Any]) -> Path:
    """Write ``path`` so that readers see either the old file or the complete new one.

    ``write_fn(tmp)`` writes ``path.tmp-<pid>`` (a file, or a directory for
    multi-file outputs); it is fsynced and renamed onto ``path``. On any error
    (or Ctrl-C) the temporary is removed and the old ``path`` is untouched. A
    directory can only replace a missing or empty directory (POSIX ``rename``).

    Args:
        path: final location.
        write_fn: called with the temporary path; must create it.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write_fn(tmp)
        if not tmp.exists():
            raise FileNotFoundError(f"atomic_write: write_fn did not create {tmp}")
        fsync_tree(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` for a small text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` through :func:`atomic_write`.

    Args:
        tensors: name -> tensor; copied to contiguous CPU tensors first (safetensors
            refuses views and shared storage).
        path: destination ``.safetensors`` file.
        metadata: string -> string, stored in the file header.
    """
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=meta))
