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


def temporary_path(path: str | os.PathLike, *, hidden: bool = False) -> Path:
    """Where :func:`atomic_write` writes ``path`` first: ``path.tmp-<pid>`` beside it
    (``.name.tmp-<pid>`` with ``hidden``, for folders whose listings must not show it)."""
    path = Path(path)
    return path.with_name(f"{'.' if hidden else ''}{path.name}.tmp-{os.getpid()}")


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """fsync the written temporary ``tmp`` and rename it onto ``path`` (then fsync the folder).

    The second half of :func:`atomic_write`, for writers that fill ``tmp`` over time (a tar
    shard written sample by sample)."""
    path = Path(path)
    fsync_tree(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], Any], *, hidden: bool = False) -> Path:
    """Write ``path`` so that readers see either the old file or the complete new one.

    ``write_fn(tmp)`` writes ``path.tmp-<pid>`` (a file, or a directory for
    multi-file outputs); it is fsynced and renamed onto ``path``. On any error
    (or Ctrl-C) the temporary is removed and the old ``path`` is untouched. A
    directory can only replace a missing or empty directory (POSIX ``rename``).
    Every file the toolkit writes goes through here (or :func:`publish`).

    Args:
        path: final location.
        write_fn: called with the temporary path; must create it.
        hidden: name the temporary ``.name.tmp-<pid>`` (see :func:`temporary_path`).

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path, hidden=hidden)
    try:
        write_fn(tmp)
        if not tmp.exists():
            raise FileNotFoundError(f"atomic_write: write_fn did not create {tmp}")
        publish(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` for a small text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def save_image_atomic(img: Any, path: str | os.PathLike, **save_kwargs: Any) -> Path:
    """A PIL image through :func:`atomic_write`, in the format its suffix names (``.png``, ``.jpg``, ...)."""
    from PIL import Image

    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    return atomic_write(path, lambda tmp: img.save(tmp, format=fmt, **save_kwargs))


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
