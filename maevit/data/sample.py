"""A small real-photo sample shipped inside the package: ``sample:train`` / ``sample:val``.

A class-balanced subset of CIFAR-10 (Krizhevsky, 2009), the original 32x32 JPEG
bytes of ``cifar10-jpg.tar.gz`` (quality about 75), as gzipped webdataset shards
read in place, no download and no cache:

    maevit/data/sample/train/dataset.json, train-00000{0..9}.tar.gz   5,000 images (500 per class)
    maevit/data/sample/val/dataset.json,   val-000000.tar.gz          1,000 images (100 per class,
                                                                       from CIFAR-10's test split)
    maevit/data/sample/README.md                                      source, licence, how it was made

Each sample is ``<key>.jpg`` + ``<key>.cls`` (+ ``<key>.json`` with the original
path); class indices follow CIFAR-10's order (airplane ... truck). The procedural
``bundled`` set stays for tests that need no real images.

Rebuild (reproducible: same images, same bytes)::

    python -m maevit.data.sample_build ../shared/data/cifar10-jpg.tar.gz

(The builder lives apart, in :mod:`maevit.data.sample_build`: it writes shards, and the
shard writer reads sources, which resolve ``sample:...`` here.)
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent / "sample"
SPLITS: dict[str, tuple[str, int, int]] = {  # split -> (CIFAR-10 split, images per class, shards)
    "train": ("train", 500, 10),
    "val": ("test", 100, 1),
}
CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


def is_sample_spec(source: object) -> bool:
    """True for the strings "sample" / "sample:<split>"."""
    return isinstance(source, str) and (source == "sample" or source.startswith("sample:"))


def resolve_sample(spec: str) -> Path:
    """Map "sample", "sample:train" or "sample:val" to its shard directory (with ``dataset.json``).

    Args:
        spec: the source string.
    """
    _, _, split = spec.partition(":")
    split = split or "train"
    if split not in SPLITS:
        raise ValueError(f"unknown sample split {split!r} in {spec!r}; use one of {sorted(SPLITS)}.")
    folder = ROOT / split
    if not (folder / "dataset.json").is_file():
        raise FileNotFoundError(
            f"{folder / 'dataset.json'} is missing: this maevit was installed without its package data; "
            f"reinstall it (pip install maevit) or rebuild the sample with `python -m maevit.data.sample_build ARCHIVE`."
        )
    return folder
