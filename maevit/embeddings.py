"""Embedding files: the features ``maevit embed`` writes, with their labels and keys, and reading them back.

``OUT.safetensors`` holds

- ``features``: float32 ``[N, D]`` (pooled) or ``[N, h, w, D]`` (the patch grid, ``--tokens``);
- ``labels``: int64 ``[N]``, when the source is labeled (indices into ``class_names``);
- ``keys``: uint8 ``[N, L]``, each sample's key in UTF-8, zero-padded (safetensors holds tensors
  only; ``bytes(row).rstrip(b"\\0").decode()`` reads one back);

and JSON metadata (``format``, ``class_names``, the model and source, ``pooling``). ``OUT.npy``
holds the features alone (``numpy.load``), with ``OUT.labels.npy``, ``OUT.keys.txt`` (one key a
line) and ``OUT.json`` (the metadata) beside it. :func:`read_embeddings` reads either.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from maevit.fileio import atomic_write, save_safetensors_atomic, write_text_atomic

FORMAT = "maevit-embeddings"
SUFFIXES = (".safetensors", ".npy")


class EmbeddingFileError(ValueError):
    """A file that is not an embedding file ``maevit embed`` wrote, or does not fit its use."""


@dataclass
class Embeddings:
    """Features of a set of images, with what identifies them."""

    features: torch.Tensor  # [N, D] or [N, h, w, D]
    labels: torch.Tensor | None = None  # [N] int64
    keys: list[str] = field(default_factory=list)
    class_names: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    order: torch.Tensor | None = None  # [N] int64: sorts the rows into source order (parts of `maevit embed`)

    def sorted(self) -> "Embeddings":
        """The rows in source order (``order`` dropped)."""
        if self.order is None:
            return self
        idx = torch.argsort(self.order)
        return Embeddings(self.features[idx], None if self.labels is None else self.labels[idx],
                          [self.keys[i] for i in idx.tolist()] if self.keys else [], self.class_names, self.meta)


def keys_to_tensor(keys: Sequence[str]) -> torch.Tensor:
    """Keys -> uint8 ``[N, L]`` (UTF-8, zero-padded)."""
    raw = [k.encode("utf-8") for k in keys]
    out = np.zeros((len(raw), max((len(b) for b in raw), default=0)), dtype=np.uint8)
    for i, b in enumerate(raw):
        out[i, :len(b)] = np.frombuffer(b, dtype=np.uint8)
    return torch.from_numpy(out)


def tensor_to_keys(t: torch.Tensor) -> list[str]:
    """uint8 ``[N, L]`` -> keys (inverse of :func:`keys_to_tensor`)."""
    return [bytes(row).rstrip(b"\0").decode("utf-8") for row in t.numpy()]


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name[: -len(".npy")] + suffix)


def write_embeddings(emb: Embeddings, path: str | os.PathLike) -> Path:
    """Write ``emb`` as ``.safetensors`` or ``.npy`` (+ sidecars), each file atomically."""
    path = Path(path)
    meta = {**emb.meta, "format": FORMAT, "class_names": emb.class_names, "num_samples": len(emb.features)}
    if path.suffix == ".safetensors":
        tensors = {"features": emb.features.float(), "keys": keys_to_tensor(emb.keys)}
        if emb.labels is not None:
            tensors["labels"] = emb.labels.long()
        if emb.order is not None:
            tensors["order"] = emb.order.long()
        return save_safetensors_atomic(tensors, path, {k: json.dumps(v) for k, v in meta.items()})
    if path.suffix != ".npy":
        raise EmbeddingFileError(f"{path}: embeddings are written as .safetensors or .npy")
    write_text_atomic(_sidecar(path, ".json"), json.dumps(meta, indent=1) + "\n")
    write_text_atomic(_sidecar(path, ".keys.txt"), "".join(f"{k}\n" for k in emb.keys))
    if emb.labels is not None:
        atomic_write(_sidecar(path, ".labels.npy"), lambda tmp: _save_npy(tmp, emb.labels.long().numpy()))
    return atomic_write(path, lambda tmp: _save_npy(tmp, emb.features.float().numpy()))


def _save_npy(tmp: Path, array: np.ndarray) -> None:
    with open(tmp, "wb") as f:  # an open file: np.save would append ".npy" to a path without it
        np.save(f, array)


def read_embeddings(path: str | os.PathLike) -> Embeddings:
    """Read a file :func:`write_embeddings` wrote.

    Raises:
        EmbeddingFileError: missing, unreadable, or not an embedding file.
    """
    path = Path(path)
    if not path.is_file():
        raise EmbeddingFileError(f"{path}: no such file (write one with `maevit embed SRC --model MODEL --out {path}`)")
    if path.suffix == ".npy":
        meta_file = _sidecar(path, ".json")
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        labels_file, keys_file = _sidecar(path, ".labels.npy"), _sidecar(path, ".keys.txt")
        return Embeddings(
            torch.from_numpy(np.load(path, allow_pickle=False)),
            torch.from_numpy(np.load(labels_file, allow_pickle=False)) if labels_file.is_file() else None,
            keys_file.read_text().splitlines() if keys_file.is_file() else [],
            meta.get("class_names"), meta)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: _json_or_text(v) for k, v in (f.metadata() or {}).items()}
            names = set(f.keys())
            if meta.get("format") != FORMAT or "features" not in names:
                raise EmbeddingFileError(f"{path} is not an embedding file written by `maevit embed` (it holds "
                                         f"{sorted(names)[:5]}; model weights are read with --model)")
            tensors = {n: f.get_tensor(n) for n in names}
    except EmbeddingFileError:
        raise
    except Exception as e:  # SafetensorError, OSError, JSONDecodeError
        raise EmbeddingFileError(f"could not read {path} as an embedding file ({type(e).__name__}: {e})") from e
    keys = tensor_to_keys(tensors["keys"]) if "keys" in tensors else []
    return Embeddings(tensors["features"], tensors.get("labels"), keys, meta.get("class_names"), meta,
                      tensors.get("order"))


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:  # other files' metadata (weights files: "format": "pt")
        return value


def concat(parts: Sequence[Embeddings], meta: dict[str, Any] | None = None) -> Embeddings:
    """One :class:`Embeddings` from parts of the same source, in order."""
    parts = [p for p in parts if len(p.features)] or list(parts[:1])  # empty parts: all samples unreadable
    if not parts:
        raise EmbeddingFileError("no embeddings to join")
    labels, order = [p.labels for p in parts], [p.order for p in parts]
    return Embeddings(torch.cat([p.features for p in parts]),
                      torch.cat(labels) if all(x is not None for x in labels) else None,
                      [k for p in parts for k in p.keys], parts[0].class_names, dict(meta or parts[0].meta),
                      torch.cat(order) if all(x is not None for x in order) else None)
