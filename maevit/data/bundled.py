"""The small built-in dataset used by the demo and the tests.

Ten classes of procedural 32x32 RGB images (shapes and textures with random
colours, positions, sizes, phases and pixel noise), generated deterministically
from a fixed seed, so every machine gets the same pictures without a download:

    <root>/train/<class>/<nnnn>.png   200 per class
    <root>/val/<class>/<nnnn>.png      50 per class
    <root>/bundled.json               marker + metadata, written last

Generation takes well under a second. The tree is built in a temporary sibling
directory and renamed into place, so a crash never leaves a half dataset that
looks complete; concurrent first calls (e.g. several test processes) are safe.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

VERSION = 1
CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "ring", "cross",
    "hstripes", "vstripes", "checker", "diagonal", "dots",
)
IMG_SIZE = 32
SPLITS: dict[str, int] = {"train": 200, "val": 50}  # images per class
_SEED = 20211111
_MARKER = "bundled.json"


def default_root() -> Path:
    """`$MAEVIT_CACHE/bundled-v1`, or `~/.cache/maevit/bundled-v1`."""
    cache = os.environ.get("MAEVIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "maevit")
    return Path(cache) / f"bundled-v{VERSION}"


# ---- procedural masks: each returns a float mask in [0, 1] of shape [S, S] -------------------

def _grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    return yy, xx


def _center(rng: np.random.Generator, s: int, margin: float) -> tuple[float, float]:
    lo, hi = margin, s - margin
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def _circle(rng, s):
    r = rng.uniform(5, 11)
    cy, cx = _center(rng, s, r * 0.8)
    yy, xx = _grid(s)
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.float32)


def _square(rng, s):
    h = rng.uniform(5, 10)
    cy, cx = _center(rng, s, h * 0.8)
    yy, xx = _grid(s)
    return ((np.abs(yy - cy) <= h) & (np.abs(xx - cx) <= h)).astype(np.float32)


def _triangle(rng, s):
    h = rng.uniform(7, 13)  # half base == height / 2
    cy, cx = _center(rng, s, h * 0.7)
    yy, xx = _grid(s)
    top, bottom = cy - h, cy + h
    t = np.clip((yy - top) / (bottom - top), 0, 1)  # 0 at apex, 1 at base
    inside = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= t * h)
    return inside.astype(np.float32)


def _ring(rng, s):
    r = rng.uniform(7, 12)
    w = rng.uniform(2, 3.5)
    cy, cx = _center(rng, s, r * 0.8)
    yy, xx = _grid(s)
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    return (np.abs(d - r) <= w / 2).astype(np.float32)


def _cross(rng, s):
    h = rng.uniform(7, 12)
    w = rng.uniform(1.5, 3)
    cy, cx = _center(rng, s, h * 0.7)
    yy, xx = _grid(s)
    vert = (np.abs(xx - cx) <= w) & (np.abs(yy - cy) <= h)
    horz = (np.abs(yy - cy) <= w) & (np.abs(xx - cx) <= h)
    return (vert | horz).astype(np.float32)


def _stripes(coord: np.ndarray, rng) -> np.ndarray:
    period = rng.uniform(4, 8)
    phase = rng.uniform(0, period)
    return (((coord + phase) % period) < period / 2).astype(np.float32)


def _hstripes(rng, s):
    yy, _ = _grid(s)
    return _stripes(yy, rng)


def _vstripes(rng, s):
    _, xx = _grid(s)
    return _stripes(xx, rng)


def _diagonal(rng, s):
    yy, xx = _grid(s)
    sign = 1 if rng.random() < 0.5 else -1  # both diagonal directions
    return _stripes((xx + sign * yy) / np.sqrt(2), rng)


def _checker(rng, s):
    cell = rng.uniform(3, 6)
    oy, ox = rng.uniform(0, 2 * cell, size=2)
    yy, xx = _grid(s)
    return ((np.floor((yy + oy) / cell) + np.floor((xx + ox) / cell)) % 2).astype(np.float32)


def _dots(rng, s):
    period = rng.uniform(6, 9)
    r = rng.uniform(1.3, 2.0)
    oy, ox = rng.uniform(0, period, size=2)
    yy, xx = _grid(s)
    dy = (yy + oy) % period - period / 2
    dx = (xx + ox) % period - period / 2
    return (dy * dy + dx * dx <= r * r).astype(np.float32)


_MASKS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "circle": _circle, "square": _square, "triangle": _triangle, "ring": _ring, "cross": _cross,
    "hstripes": _hstripes, "vstripes": _vstripes, "checker": _checker, "diagonal": _diagonal, "dots": _dots,
}


def render(class_name: str, rng: np.random.Generator, size: int = IMG_SIZE) -> np.ndarray:
    """One procedural image of `class_name` as uint8 `[size, size, 3]`.

    Args:
        class_name: one of `CLASSES`.
        rng: the source of all randomness (colours, geometry, noise).
        size: side length in pixels.
    """
    mask = _MASKS[class_name](rng, size)[..., None]  # [S, S, 1]
    # Foreground / background colours far enough apart that the shape is visible.
    while True:
        fg, bg = rng.uniform(0, 1, size=(2, 3)).astype(np.float32)
        if np.abs(fg - bg).sum() > 0.6:
            break
    img = bg * (1 - mask) + fg * mask  # [S, S, 3]
    img = img + rng.normal(0, rng.uniform(0.02, 0.08), size=img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _generate(dst: Path) -> None:
    for split_idx, (split, per_class) in enumerate(SPLITS.items()):
        for class_idx, name in enumerate(CLASSES):
            folder = dst / split / name
            folder.mkdir(parents=True)
            # One independent stream per (split, class): adding classes never changes others.
            rng = np.random.default_rng([_SEED, split_idx, class_idx])
            for i in range(per_class):
                Image.fromarray(render(name, rng)).save(folder / f"{i:04d}.png", compress_level=1)
    meta = {"version": VERSION, "classes": list(CLASSES), "splits": SPLITS, "img_size": IMG_SIZE, "seed": _SEED}
    (dst / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")


def bundled_dataset(root: str | os.PathLike | None = None) -> Path:
    """Return the root of the bundled dataset, generating it on first use.

    Args:
        root: where the tree lives; default `default_root()` (`$MAEVIT_CACHE` or
            `~/.cache/maevit`, then `bundled-v1`).

    Returns:
        The root path holding `train/` and `val/` class-per-folder trees.
    """
    root = Path(root) if root is not None else default_root()
    if (root / _MARKER).is_file():
        return root
    if root.exists() and any(root.iterdir()):
        # A directory without the marker (written last) is an interrupted or foreign tree.
        raise FileExistsError(
            f"{root} exists but holds no complete bundled dataset ({_MARKER} missing); "
            f"delete it or pass another root to bundled_dataset()."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _generate(tmp)
        if root.exists():
            root.rmdir()  # empty (checked above)
        os.replace(tmp, root)  # atomic on one filesystem
    except OSError:
        # Another process finished first (rename onto a non-empty directory fails): use theirs.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / _MARKER).is_file():
            raise
    return root


def resolve_bundled(spec: str) -> Path:
    """Map "bundled", "bundled:train" or "bundled:val" to its folder.

    Args:
        spec: the source string.
    """
    _, _, split = spec.partition(":")
    split = split or "train"
    if split not in SPLITS:
        raise ValueError(f"unknown bundled split {split!r} in {spec!r}; use one of {sorted(SPLITS)}.")
    return bundled_dataset() / split


def is_bundled_spec(source: object) -> bool:
    """True for the strings "bundled" / "bundled:<split>"."""
    return isinstance(source, str) and (source == "bundled" or source.startswith("bundled:"))
