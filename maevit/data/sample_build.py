"""Rebuild the CIFAR-10 sample shipped in the package (:mod:`maevit.data.sample`), reproducibly::

    python -m maevit.data.sample_build ../shared/data/cifar10-jpg.tar.gz
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from maevit.fileio import write_text_atomic

from .sample import CLASSES, ROOT, SPLITS
from .shards import write_shards


def _first_per_class(root: Path, per_class: int) -> Path:
    """A class-per-folder tree (symlinks) of the first ``per_class`` images of each class."""
    out = Path(tempfile.mkdtemp(prefix="maevit-sample-"))
    for cls in CLASSES:
        files = sorted((root / cls).glob("*.jpg"))[:per_class]
        if len(files) < per_class:
            raise FileNotFoundError(f"{root / cls} holds {len(files)} JPEGs, fewer than {per_class}")
        (out / cls).mkdir()
        for f in files:
            (out / cls / f.name).symlink_to(f.resolve())
    return out


def _gzip(path: Path) -> Path:
    """``x.tar`` -> ``x.tar.gz`` with a fixed header (no name, mtime 0): the same bytes every build."""
    gz = path.with_name(path.name + ".gz")
    with open(path, "rb") as src, open(gz, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as dst:
        shutil.copyfileobj(src, dst)
    path.unlink()
    return gz


def build_sample(cifar10: str | os.PathLike, out: str | os.PathLike = ROOT) -> dict[str, int]:
    """Write the sample from CIFAR-10 JPEGs (``cifar10-jpg.tar.gz`` or its extracted folder).

    Args:
        cifar10: the archive, or a folder holding ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``.
        out: where ``train/`` and ``val/`` go (default: inside the package).

    Returns:
        Images written per split.
    """
    src, tmp = Path(cifar10), None
    if src.is_file():
        tmp = Path(tempfile.mkdtemp(prefix="maevit-cifar10-"))
        with tarfile.open(src) as tar:
            tar.extractall(tmp, filter="data")
        src = tmp
    counts = {}
    try:
        for split, (cifar_split, per_class, shards) in SPLITS.items():
            tree = _first_per_class(src / cifar_split, per_class)
            dst = Path(out) / split
            try:
                index = write_shards(str(tree), dst, samples_per_shard=per_class * len(CLASSES) // shards,
                                     prefix=split, overwrite=True, shuffle_seed=0, progress=False)
            finally:
                shutil.rmtree(tree)
            for shard in index["shards"]:
                gz = _gzip(dst / shard["name"])
                shard.update(name=gz.name, bytes=gz.stat().st_size)
            index["made_with"].pop("quality")  # not re-encoded: the original bytes
            index["made_with"].update(source=f"CIFAR-10 {cifar_split} split, first {per_class} images per class",
                                      jpeg="original CIFAR-10 JPEG bytes (quality about 75)", gzip=True)
            write_text_atomic(dst / "dataset.json", json.dumps(index, indent=1) + "\n")
            counts[split] = index["total"]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp)
    return counts


def main(argv: list[str] | None = None) -> int:
    """``python -m maevit.data.sample_build CIFAR10 [--out DIR]``: rebuild the shipped sample."""
    p = argparse.ArgumentParser(prog="python -m maevit.data.sample_build", description=main.__doc__)
    p.add_argument("cifar10", help="cifar10-jpg.tar.gz or its extracted folder (train/, test/)")
    p.add_argument("--out", default=str(ROOT), help=f"output folder (default: {ROOT})")
    a = p.parse_args(argv)
    print(build_sample(a.cifar10, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
