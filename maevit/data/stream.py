"""Streaming data for pretraining, fine-tuning and evaluation, built on webdataset.

Sources: a shard directory holding `dataset.json` (written by `maevit shards
write`), a `dataset.json` path or URL, a shard pattern (`train-{000000..000099}.tar`),
a glob, a list of shards / URLs, a plain image folder (unlabeled, or one
sub-folder per class), "bundled[:train|val]" (procedural shapes) or
"sample[:train|val]" (the CIFAR-10 photos shipped in the package, `data/sample.py`).

What webdataset gives us and we use: URL expansion (braces, `::`), `gopen`
(local files, http(s) via curl, ...), tar member iteration and grouping of
members into samples, and the shuffle buffer. What we write by hand, and why:

* **The exact-epoch split.** webdataset splits whole shards by node and worker,
  so ranks get different sample counts (DDP hangs when one rank stops early)
  and `with_epoch` counts per worker. Here, every epoch, the *units* (shards, or
  files of an image folder) are permuted from `(seed, epoch)` identically on
  all ranks and concatenated into one virtual sequence of T samples. Rank r
  takes the contiguous range `[r*S, (r+1)*S)` with `S = N*B` samples, `N`
  batches per rank (`N = T // (world*B)` with `drop_last=True`: fewer than
  world*B samples at the end of the permuted sequence are left out this epoch;
  with `drop_last=False`, `N = ceil(T / (world*B))` and the range wraps to the
  start of the sequence, repeating fewer than world*B samples). Inside a rank,
  logical worker `l` owns batches `b` with `b % W == l` and reads the contiguous
  sub-range holding exactly those batches' samples. A unit that straddles two
  ranges is read by both, each skipping the other's samples without decoding.
* **Error handling.** webdataset's `warn_and_continue` sleeps 0.5 s per bad
  sample. Here bad samples are counted, logged at a limited rate, never sleep
  and never raise. Unreadable tars and samples without an image are dropped
  before the shuffle, and the worker refills its quota by wrapping around its
  own range. Images that fail to *decode* (or exceed `max_pixels`) are
  replaced, in the same batch, by another sample of that batch (its own
  augmentation), so batch counts and the data of every later batch do not
  depend on decoding; this is what makes resume exact without decoding skipped
  batches.
* **Skip counts.** Counts are of samples, by kind (`STAT_KEYS`), each sample
  once per epoch under one kind however often a refill re-reads it:
  `corrupt_image` (the image does not decode), `oversized_image` (over
  `max_pixels`), `missing_image` (no image member), `missing_label` (labeled
  data without `.cls`), `bad_member` (the sample's image member could not be
  read from its tar), `unreadable_shard` (the sample never came out of its
  shard: the tar or file is unreadable, cut short, or holds fewer samples than
  its index lists). Each batch carries the counts of the samples skipped while
  it was made, so the main process adds them up exactly once
  (`StreamLoader.stats()`); batches skipped on resume carry none.
* **Decoding.** Only image members (PIL) and `.cls` / `.txt` / `.json` (text)
  are read. `.pyd`, `.pth`, `.pickle`, ... are never even extracted from the
  tar, so nothing is unpickled or `torch.load`-ed.
* **Determinism.** Every random choice (unit permutation, shuffle buffer,
  resampled shards, per-sample augmentation) is seeded from
  `(seed, epoch, rank, logical worker, position)`; nothing from pid or time.
  The stream is therefore a function of (seed, epoch, rank, world_size,
  num_workers, batch_size); resume needs the same values.
* **Epochs and workers.** Workers are *not* persistent: each `iter()` starts
  fresh workers that receive the current epoch and start batch (persistent
  workers would not see `set_epoch`). Worker start-up is paid once per epoch.

Resampled mode (`mode="resampled"`): each worker draws units with
replacement from `(seed, epoch, rank, worker)`, infinitely; an epoch is
`samples_per_epoch // (world*B)` batches per rank.

Evaluation (`labeled_loader(train=False)`): no shuffle, no wrap, no padding:
rank r takes samples `[r*T//world, (r+1)*T//world)` in source order; every
sample is yielded exactly once across ranks; ranks may differ by one batch.

Do not pass a `StreamLoader` to `accelerate.Accelerator.prepare()`: it is
already split by rank and Accelerate would re-shard or broadcast it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import tarfile
import time
from dataclasses import dataclass, field, replace
from glob import glob
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import bundled as _bundled
from .labels import label_map
from .transforms import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTS,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ImageTooLargeError,
    PretrainTransform,
    apply_seeded,
    check_pixels,
    labeled_transform,
    normalize_batch,
    open_image,
    to_rgb,
)

log = logging.getLogger(__name__)

TEXT_EXTS = ("cls", "txt", "json")
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's default skip_meta
INDEX_NAME = "dataset.json"
INCOMPLETE_NAME = "dataset.incomplete.json"  # progress of a `maevit shards write` that has not finished
STAT_KEYS = ("corrupt_image", "oversized_image", "missing_image", "missing_label", "unreadable_shard", "bad_member")


class DataSourceError(ValueError):
    """A data source that cannot be used as given (missing, empty, refused, too small, unlabeled);
    the message says what was found and what to pass instead."""


class DataSourceNotFoundError(DataSourceError, FileNotFoundError):
    """A data source path that does not exist, or holds no images or shards."""


class IncompleteDatasetError(DataSourceError):
    """A shard directory left by an interrupted `maevit shards write` (no `dataset.json` yet)."""


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """One shard (`kind="tar"`) or one image file (`kind="file"`).

    `count` is the number of samples taken from it; for a tar, `select` (sorted
    sample positions inside the tar) restricts it to a subset (label_fraction).
    """

    url: str
    count: int
    kind: str = "tar"
    label: int | None = None  # files of a class-per-folder tree
    key: str = ""  # files: relative path without extension
    select: tuple[int, ...] | None = None


@dataclass
class Source:
    """A resolved data source: its units, class names (or None), and where it came from."""

    units: list[Unit]
    class_names: list[str] | None
    description: str
    counts_known: bool = True
    indexed: bool = False  # counts from a dataset.json (not from the shards themselves)

    @property
    def num_samples(self) -> int:
        return sum(u.count for u in self.units)


def _check_url(url: str, allow_pipe: bool) -> None:
    if url.startswith("pipe:") and not allow_pipe:
        raise DataSourceError(
            f"refusing shard URL {url!r}: 'pipe:' URLs run shell commands. If you trust it, pass "
            f"allow_pipe=True (config: data.allow_pipe=true)."
        )


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _list_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, in sorted walk order. Symlinked folders are followed once per real
    folder (a link back up the tree is no loop) and a file reached by several paths is listed once
    (the first path wins): os.walk(followlinks=True) alone does neither."""
    out, seen_dirs, seen_files = [], set(), set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and f.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                real_file = os.path.realpath(os.path.join(dirpath, f))
                if real_file not in seen_files:
                    seen_files.add(real_file)
                    out.append(Path(dirpath) / f)
    return out


def folder_source(folder: str | os.PathLike) -> Source:
    """An image folder: class-per-folder when every image sits in a first-level sub-folder.

    Args:
        folder: the root directory (searched recursively).
    """
    folder = Path(folder)
    files = _list_images(folder)
    if not files:
        raise DataSourceNotFoundError(
            f"no images ({', '.join(IMAGE_EXTS)}) found under {folder}; expected an image folder, "
            f"a class-per-folder tree or a shard directory with {INDEX_NAME}."
        )
    rels = [f.relative_to(folder) for f in files]
    loose = [r for r in rels if len(r.parts) < 2]
    labeled = not loose
    if loose and len(loose) < len(rels):  # a mixed tree: say which reading was taken
        log.warning("%s mixes %d loose images (first: %s) with %d images in sub-folders: read as one unlabeled "
                    "folder. For class labels, move every image into a class folder (FOLDER/CLASS/IMAGE).",
                    folder, len(loose), loose[0], len(rels) - len(loose))
    classes = sorted({r.parts[0] for r in rels}) if labeled else None
    cidx = {c: i for i, c in enumerate(classes or [])}
    units = [
        Unit(str(f), 1, "file", cidx[r.parts[0]] if labeled else None, str(r.with_suffix("")))
        for f, r in zip(files, rels)
    ]
    return Source(units, classes, f"image folder {folder}")


def read_index(path_or_url: str) -> dict[str, Any]:
    """Load a `dataset.json` index (local path or URL)."""
    if _is_local(path_or_url):
        return json.loads(Path(path_or_url).read_text())
    import webdataset as wds

    with wds.gopen(path_or_url, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def check_complete(folder: str | os.PathLike) -> None:
    """Raise `IncompleteDatasetError` if `folder` was left by an interrupted `maevit shards write`.

    `dataset.json` is written last, so a folder that has one is complete. Without it, the
    progress file `dataset.incomplete.json` (or, from older versions, a `.*.tar.tmp-*` file)
    marks a write that did not finish: its shards are only part of the data.
    """
    folder = Path(folder)
    if (folder / INDEX_NAME).is_file():
        return
    progress = folder / INCOMPLETE_NAME
    if progress.is_file():
        try:
            info = json.loads(progress.read_text())
            done = f"{len(info['shards'])} shards with {sum(s['count'] for s in info['shards'])} samples of {info['items']} inputs"
        except (OSError, ValueError, KeyError, TypeError):
            done = "some shards"
        raise IncompleteDatasetError(
            f"{folder} holds an interrupted `maevit shards write` ({done} written, no {INDEX_NAME} yet): "
            f"its shards are only part of the data. Run the same `maevit shards write` command again to "
            f"finish it (it continues where it stopped), or pass --overwrite to start over."
        )
    tmp = sorted(folder.glob(".*.tar.tmp-*"))
    if tmp:
        raise IncompleteDatasetError(
            f"{folder} has no {INDEX_NAME} and holds {tmp[0].name}, a shard left half-written by an interrupted "
            f"`maevit shards write`: its shards are only part of the data. Write it again with --overwrite."
        )


def _index_source(index_url: str, allow_pipe: bool) -> Source:
    _check_url(index_url, allow_pipe)
    index = read_index(index_url)
    base = index_url.rsplit("/", 1)[0] if "/" in index_url else "."
    units = []
    for s in index["shards"]:
        url = s["url"] if "url" in s else f"{base}/{s['name']}"
        _check_url(url, allow_pipe)
        units.append(Unit(url, int(s["count"])))
    return Source(units, index.get("classes"), f"shard index {index_url}", indexed=True)


def count_tar_samples(url: str) -> int:
    """Number of samples (consecutive groups of members sharing a key) in a local tar.

    Reads headers only (random-access tar: data is seeked over). A truncated tar
    counts the samples before the damage, and a warning says it is damaged
    (without an index, the samples after the damage cannot be counted).
    """
    n, damage = _scan_tar(url)
    if damage:
        log.warning("%s is damaged (%s): %d samples can be read; write a %s index (maevit shards write) "
                    "to know how many were lost", url, damage, n, INDEX_NAME)
    return n


def _scan_tar(url: str) -> tuple[int, str | None]:
    """(samples whose first header is intact, what is wrong with the tar or None)."""
    from webdataset.tariterators import base_plus_ext

    n, last, damage = 0, None, None
    try:
        with tarfile.open(url, "r:") as tf:
            for m in tf:
                if not m.isreg() or _META.match(m.name) or (m.name.startswith("__") and m.name.endswith("__")):
                    continue  # skipped the same way by webdataset's tar_file_iterator
                key, _ = base_plus_ext(m.name)
                if key is not None and key != last:
                    n, last = n + 1, key
            end = tf.offset  # just after the last member's data: the end-of-archive blocks follow
        with open(url, "rb") as f:
            f.seek(end)
            tail = f.read(2 * tarfile.BLOCKSIZE)
        if len(tail) < 2 * tarfile.BLOCKSIZE or tail.strip(b"\0"):
            damage = "truncated: no end-of-archive marker"
    except (tarfile.TarError, OSError, EOFError) as exn:
        damage = f"{type(exn).__name__}: {exn}"
    return n, damage


def _shard_list_source(urls: list[str], allow_pipe: bool, need_counts: bool) -> Source:
    for u in urls:
        _check_url(u, allow_pipe)
    if not urls:
        raise DataSourceNotFoundError("the shard list is empty; check the pattern or directory.")
    known = all(_is_local(u) for u in urls)
    if known:
        for folder in sorted({os.path.dirname(os.path.abspath(u)) for u in urls}):
            check_complete(folder)
    if need_counts and not known:
        raise DataSourceError(
            "exact epochs need per-shard sample counts, and remote shards have no local index: "
            f"pass the URL of their {INDEX_NAME} as the source, or use mode='resampled' with "
            "samples_per_epoch (config: data.mode=resampled data.samples_per_epoch=N)."
        )
    units = [Unit(u, count_tar_samples(u) if known else 1) for u in urls]
    return Source(units, None, f"{len(urls)} shards", counts_known=known)


def resolve_source(source: Any, *, allow_pipe: bool = False, need_counts: bool = True) -> Source:
    """Turn any accepted `source` into a `Source` (list of units with counts).

    Args:
        source: shard dir / `dataset.json` / pattern / glob / list / image folder / "bundled[:split]" /
            "sample[:split]".
        allow_pipe: accept `pipe:` URLs.
        need_counts: per-unit sample counts are required (exact mode).
    """
    if isinstance(source, Source):
        return source
    if _bundled.is_bundled_spec(source):
        try:
            return folder_source(_bundled.resolve_bundled(source))
        except ValueError as e:  # an unknown split
            raise DataSourceError(str(e)) from None
    from . import sample as _sample  # here, so `python -m maevit.data.sample` imports it once

    if _sample.is_sample_spec(source):
        try:
            return _index_source(str(_sample.resolve_sample(source) / INDEX_NAME), allow_pipe)
        except ValueError as e:  # an unknown split
            raise DataSourceError(str(e)) from None
    if isinstance(source, (list, tuple)):
        import webdataset as wds

        urls = [u for s in source for u in wds.shardlists.expand_urls(str(s))]
        return _shard_list_source(urls, allow_pipe, need_counts)
    src = str(source)
    _check_url(src, allow_pipe)
    if src.endswith(".json"):
        return _index_source(src, allow_pipe)
    p = Path(src)
    if _is_local(src) and p.is_file():
        _refuse_single_file(p)
    if _is_local(src) and p.is_dir():
        check_complete(p)
        if (p / INDEX_NAME).is_file():
            return _index_source(str(p / INDEX_NAME), allow_pipe)
        tars = sorted(p.glob("*.tar"))
        if tars:
            return _shard_list_source([str(t) for t in tars], allow_pipe, need_counts)
        return folder_source(p)
    import webdataset as wds

    urls = wds.shardlists.expand_urls(src)
    if _is_local(src) and any(c in src for c in "*?["):
        urls = sorted(u for pat in urls for u in glob(pat))
        if not urls:
            raise DataSourceNotFoundError(
                f"data source {src!r}: the pattern matches no file (looked from {os.getcwd()}); check the "
                f"folder and the file names it expects (shards are usually NAME-000000.tar ... : e.g. "
                f"'shards/train-*.tar'), or pass the shard folder itself.")
        for u in urls:
            if Path(u).is_file():
                _refuse_single_file(Path(u), in_pattern=src)
    if _is_local(src):
        missing = [u for u in urls if not Path(u).exists()]
        if missing:
            raise DataSourceNotFoundError(
                f"data source {src!r}: {len(missing)} path(s) do not exist (first: {missing[0]}); expected "
                f"a shard directory, {INDEX_NAME}, a shard pattern, an image folder, 'bundled[:split]' or "
                f"'sample[:split]'."
            )
    return _shard_list_source(urls, allow_pipe, need_counts)


ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".zip", ".7z", ".rar",
                    ".gz", ".bz2", ".xz", ".zst")


def _refuse_single_file(path: Path, in_pattern: str | None = None) -> None:
    """A local file that is not a shard (``.tar``) or an index: say what it is and what would work."""
    name = path.name.lower()
    where = f" (matched by {in_pattern!r})" if in_pattern else ""
    if name.endswith(".tar") or name.endswith(".json"):
        return
    if name.endswith(ARCHIVE_SUFFIXES):
        raise DataSourceError(
            f"{path}{where} is a compressed archive; maevit reads plain .tar shards (webdataset), image folders "
            f"and dataset.json indexes. Unpack it (e.g. `tar xf {path.name}` or `unzip {path.name}`) and pass the "
            f"folder, then `maevit shards write FOLDER OUT_DIR` for fast streaming.")
    if name.rsplit(".", 1)[-1] in IMAGE_EXTS:
        raise DataSourceError(
            f"{path}{where} is a single image; a data source is a folder of images (FOLDER/CLASS/IMAGE for "
            f"labels), a shard folder or pattern, or 'sample[:split]'. Pass the folder it is in: {path.parent}.")
    raise DataSourceError(
        f"{path}{where} is a file that is neither a .tar shard nor a dataset.json index; expected a shard "
        f"directory, {INDEX_NAME}, a shard pattern (e.g. 'shards/train-*.tar'), an image folder, or "
        f"'sample[:split]'.")


# ---------------------------------------------------------------------------------------------
# Reading raw samples (no decoding)
# ---------------------------------------------------------------------------------------------

class TransformError(RuntimeError):
    """An augmentation failed on an image that decoded fine: a bug, not bad data, so it is
    raised (with the sample's name) instead of being skipped and counted as corrupt."""


class _Errors:
    """Bad samples of one worker and epoch, by kind, with rate-limited logging (never sleeps, never raises).

    A sample (`where`: its unit URL and position) is counted once, under the first kind
    reported for it, however often a refill re-reads it (`dedupe`; off in resampled mode,
    where every draw is a sample of its own). `pending` holds the counts since the last
    `take_pending()`: they travel with the next batch to the main process.

    Args:
        first, every_s: log the first `first` messages, then at most one per `every_s` seconds.
        dedupe: count each `where` once.
        collect: a list to append every message to (no logging), e.g. for `maevit shards check`.
    """

    def __init__(self, first: int = 5, every_s: float = 30.0, dedupe: bool = True,
                 collect: list[str] | None = None) -> None:
        self.counts = dict.fromkeys(STAT_KEYS, 0)
        self.pending = dict.fromkeys(STAT_KEYS, 0)
        self._seen: set[tuple[str, int]] | None = set() if dedupe else None
        self._collect = collect
        self._first, self._every, self._logged, self._last, self._quiet = first, every_s, 0, 0.0, 0

    def skip(self, kind: str, where: tuple[str, int], what: str) -> None:
        """Count one skipped sample (unless already counted) and log `what`."""
        self.skip_many(kind, where[0], [where[1]], what)

    def skip_many(self, kind: str, url: str, positions: Sequence[int], what: str) -> None:
        """Count the samples at `positions` of `url` (those not counted yet) with one message."""
        if self._seen is not None:
            positions = [p for p in positions if (url, p) not in self._seen]
            self._seen.update((url, p) for p in positions)
        if not positions:
            return
        self.counts[kind] += len(positions)
        self.pending[kind] += len(positions)
        self.note(kind, what if len(positions) == 1 else f"{len(positions)} samples: {what}")

    def note(self, kind: str, what: str) -> None:
        """Log a problem (rate-limited) without counting a sample."""
        if self._collect is not None:
            self._collect.append(f"{what} [{kind}]")
            return
        now = time.monotonic()
        if self._logged < self._first or now - self._last >= self._every:
            more = f" (+{self._quiet} more not shown)" if self._quiet else ""
            log.warning("skipping bad sample (%s): %s%s", kind, what, more)
            self._logged, self._last, self._quiet = self._logged + 1, now, 0
        else:
            self._quiet += 1

    def take_pending(self) -> dict[str, int]:
        out, self.pending = self.pending, dict.fromkeys(STAT_KEYS, 0)
        return out


def _wanted(ext: str) -> bool:
    last = ext.rsplit(".", 1)[-1]
    return last in IMAGE_EXTS or last in TEXT_EXTS


def _image_of(sample: dict[str, Any]) -> bytes | None:
    for ext, value in sample.items():
        if not ext.startswith("__") and ext.rsplit(".", 1)[-1] in IMAGE_EXTS:
            return value
    return None


def _where(sample: dict[str, Any]) -> tuple[str, int]:
    return sample.get("__url__", ""), sample.get("__pos__", -1)


def _has_image(sample: dict[str, Any], errors: _Errors) -> bool:
    """True if `sample` has an image member; else counts it (bad_member if that member failed)."""
    if _image_of(sample) is not None:
        return True
    if "__bad__" in sample:
        errors.skip("bad_member", _where(sample), f"{sample.get('__url__')}:{sample['__key__']}: {sample['__bad__']}")
    else:
        members = ", ".join(k for k in sample if not k.startswith("__")) or "none read"
        errors.skip("missing_image", _where(sample), f"{sample.get('__url__')}:{sample['__key__']}: no image "
                                                     f"member ({members})")
    return False


def _read_tar(
    unit: Unit, start: int, stop: int, errors: _Errors, wanted: Callable[[str], bool] = _wanted
) -> Iterator[dict[str, Any]]:
    """Samples at positions [start, stop) of a tar (positions among `unit.select` if set).

    Members of samples outside the range, and members that are neither images nor
    text (`wanted`), are never extracted (`select_files` sees each name first), so
    skipping costs no decoding and nothing else (pickles, tensors) is ever read.
    Each sample carries `__pos__`, its position in the tar.
    """
    import webdataset as wds
    from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

    if unit.select is not None:
        expected: Sequence[int] = unit.select[start:stop]
        keep = set(expected)
        in_range = keep.__contains__
    else:
        expected = range(max(start, 0), min(stop, unit.count))
        in_range = lambda pos: start <= pos < stop  # noqa: E731
    state = {"pos": -1, "key": None, "error": None}
    positions: dict[str, int] = {}  # key -> position, until its sample is grouped
    listed: set[int] = set()  # positions in range whose members the tar listed
    failed: dict[int, str] = {}  # position -> why one of its members could not be read
    yielded: set[int] = set()

    def select(fname: str) -> bool:
        key, ext = base_plus_ext(fname)
        if key is None:
            return False
        if key != state["key"]:
            state["key"], state["pos"] = key, state["pos"] + 1
        if not in_range(state["pos"]):
            return False
        listed.add(state["pos"])
        ok = wanted(ext.lower())
        if ok:
            positions[key] = state["pos"]
        return ok

    def handler(exn: Exception) -> bool:
        if in_range(state["pos"]):
            failed.setdefault(state["pos"], f"{type(exn).__name__}: {exn}")
        return True

    def members(stream) -> Iterator[dict[str, Any]]:
        try:
            for f in tar_file_iterator(stream, handler=handler, select_files=select):
                f["__url__"] = unit.url
                yield f
        except Exception as exn:  # truncated / unreadable tar: keep what was read, go on
            state["error"] = f"{type(exn).__name__}: {exn}"

    try:
        stream = wds.gopen(unit.url, "rb")
    except Exception as exn:
        state["error"] = f"{type(exn).__name__}: {exn}"
    else:
        with stream:
            for sample in group_by_keys(members(stream), handler=handler):
                pos = sample["__pos__"] = positions.pop(sample["__key__"], -1)
                yielded.add(pos)
                if pos in failed:
                    sample["__bad__"] = failed[pos]
                yield sample
    # The tar has ended (not the consumer): account for the samples of the range that never came out.
    # Samples cut by the damage that ended the tar count with the samples after it: one message per shard.
    lost = []
    for pos in expected:
        if pos in yielded:
            continue
        if pos not in listed or (state["error"] and pos in failed):
            lost.append(pos)
        elif pos in failed:
            errors.skip("bad_member", (unit.url, pos), f"{unit.url}: sample {pos}: {failed[pos]}")
        else:
            errors.skip("missing_image", (unit.url, pos), f"{unit.url}: sample {pos}: no image member")
    if lost:
        why = (f"truncated or unreadable shard ({state['error']})" if state["error"]
               else f"the shard holds fewer samples than its {INDEX_NAME} index lists")
        errors.skip_many("unreadable_shard", unit.url, lost,
                         f"{unit.url}: {len(lost)} of {len(expected)} samples lost (positions {lost[0]}..{lost[-1]}): "
                         f"{why}")
    elif state["error"]:
        errors.note("unreadable_shard", f"{unit.url}: truncated or damaged shard ({state['error']})")


def _read_unit(
    unit: Unit, start: int, stop: int, errors: _Errors, wanted: Callable[[str], bool] = _wanted
) -> Iterator[dict[str, Any]]:
    """Raw samples `{"__key__", "__pos__", "<ext>": bytes, ...}` of positions [start, stop) of a unit.

    `wanted(ext)` picks the members read from tars (default: images and text).
    """
    if unit.kind == "file":
        if start > 0 or stop <= 0:
            return
        try:
            data = Path(unit.url).read_bytes()
        except OSError as exn:
            errors.skip("unreadable_shard", (unit.url, 0), f"{unit.url}: {exn}")
            return
        ext = unit.url.rsplit(".", 1)[-1].lower()
        sample: dict[str, Any] = {"__key__": unit.key or unit.url, "__url__": unit.url, "__pos__": 0, ext: data}
        if unit.label is not None:
            sample["cls"] = str(unit.label).encode()
        yield sample
        return
    yield from _read_tar(unit, start, stop, errors, wanted)


def _segments(counts: Sequence[int], start: int, n: int) -> list[tuple[int, int, int]]:
    """Cover `n` samples of the virtual sequence from `start`, wrapping modulo its length.

    Returns (unit index, first position, end position) triples.
    """
    total = sum(counts)
    ends = np.cumsum(counts)
    out, pos, left = [], start % total, n
    while left > 0:
        u = int(np.searchsorted(ends, pos, side="right"))
        u_start = int(ends[u]) - counts[u]
        take = min(left, int(ends[u]) - pos)
        out.append((u, pos - u_start, pos - u_start + take))
        left -= take
        pos = (pos + take) % total
    return out


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


# ---------------------------------------------------------------------------------------------
# The dataset each worker runs
# ---------------------------------------------------------------------------------------------

@dataclass
class _Spec:
    """Everything a worker needs; a plain picklable record."""

    units: list[Unit]
    batch_size: int
    seed: int
    rank: int
    world_size: int
    num_workers: int
    mode: str  # "exact" | "resampled" | "eval"
    drop_last: bool
    shuffle_buffer: int
    samples_per_epoch: int | None
    labeled: bool
    transform: Any  # PretrainTransform or a PIL transform (labeled)
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD
    epoch: int = 0
    start_batch: int = 0
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    counts: list[int] = field(default_factory=list)
    label_map: tuple[int, ...] | None = None  # data label -> model label (matched by class name)

    def __post_init__(self) -> None:
        self.counts = [u.count for u in self.units]


def batches_per_rank(spec: _Spec, rank: int | None = None) -> int:
    """Batches one rank yields per epoch (identical on all ranks except in eval mode)."""
    total, world, b = sum(spec.counts), spec.world_size, spec.batch_size
    if spec.mode == "eval":
        r = spec.rank if rank is None else rank
        n = (r + 1) * total // world - r * total // world
        return math.ceil(n / b)
    if spec.mode == "resampled":
        per_epoch = spec.samples_per_epoch or total
        return per_epoch // (world * b) if spec.drop_last else math.ceil(per_epoch / (world * b))
    return total // (world * b) if spec.drop_last else math.ceil(total / (world * b))


def _worker_batches(n_batches: int, num_workers: int, lw: int) -> int:
    """How many of batches 0..n-1 belong to logical worker `lw` (batch b -> worker b % W)."""
    return len(range(lw, n_batches, num_workers))


class _StreamDataset(IterableDataset):
    def __init__(self, spec: _Spec) -> None:
        self.spec = spec

    # ---- raw sample sources --------------------------------------------------------------
    def _range(self, lw: int) -> tuple[int, int]:
        """Start (in the virtual sequence) and length of logical worker `lw`'s samples."""
        s, b, w = self.spec, self.spec.batch_size, max(1, self.spec.num_workers)
        n = batches_per_rank(s)
        sizes = [_worker_batches(n, w, l) * b for l in range(w)]
        if s.mode == "eval":
            total = sum(s.counts)
            r0, r1 = s.rank * total // s.world_size, (s.rank + 1) * total // s.world_size
            if n:
                sizes[(n - 1) % w] -= n * b - (r1 - r0)  # the one short batch, no padding
            rank_start = r0
        else:
            rank_start = s.rank * n * b
        return rank_start + sum(sizes[:lw]), sizes[lw]

    def _exact_source(self, order: list[int], lw: int, errors: _Errors) -> Iterator[dict[str, Any]]:
        s = self.spec
        start, length = self._range(lw)
        if length <= 0:
            return
        counts = [s.counts[i] for i in order]
        segs = _segments(counts, start, length)
        yielded = 0
        while yielded < length:
            got = 0
            for u, a, e in segs:
                for sample in _read_unit(s.units[order[u]], a, e, errors):
                    if not _has_image(sample, errors):
                        continue
                    got += 1
                    yielded += 1
                    yield sample
                    if yielded == length:
                        return
            if got == 0 or s.mode == "eval":
                if got == 0 and s.mode != "eval":
                    log.error("worker %d of rank %d: no readable sample in its range", lw, s.rank)
                return
            # Wrap around within this worker's own range, only to refill samples dropped above
            # (missing image, unreadable tar), so the batch count stays exact.

    def _resampled_source(self, lw: int, errors: _Errors) -> Iterator[dict[str, Any]]:
        s = self.spec
        rng = _rng(s.seed, s.epoch, s.rank, lw, 0x5E5A)
        empty_in_a_row = 0
        while empty_in_a_row < 1000:
            unit = s.units[int(rng.integers(len(s.units)))]
            got = 0
            for sample in _read_unit(unit, 0, 1 << 62, errors):
                if not _has_image(sample, errors):
                    continue
                got += 1
                yield sample
            empty_in_a_row = 0 if got else empty_in_a_row + 1
        log.error("worker %d of rank %d: 1000 units in a row without a readable sample", lw, s.rank)

    # ---- decoding --------------------------------------------------------------------------
    def _decode(self, sample: dict[str, Any], seed_key: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        s = self.spec
        data = _image_of(sample)
        label = -1
        if s.labeled:
            if "cls" not in sample:
                raise KeyError("no .cls label")
            label = int(sample["cls"].decode("utf-8").strip())
            if s.label_map is not None:
                if not 0 <= label < len(s.label_map):
                    raise KeyError(f"label {label} is outside the data's {len(s.label_map)} classes")
                label = s.label_map[label]
        header = open_image(data)  # header only: the size is known before decoding
        check_pixels(header, s.max_pixels)
        if isinstance(s.transform, PretrainTransform):
            img = s.transform(data, _rng(*seed_key), img=header)  # [3, H, W] uint8
        else:
            header.load()  # decodes: errors here are bad data
            pil = to_rgb(header)
            seed = int(_rng(*seed_key).integers(1 << 31))
            try:
                img = apply_seeded(s.transform, pil, seed)  # [3, H, W] float, normalized
            except Exception as exn:
                raise TransformError(f"the transform failed on {sample.get('__url__')}:{sample['__key__']}, "
                                     f"which decoded fine: {type(exn).__name__}: {exn}") from exn
        return img, label

    def __iter__(self) -> Iterator[dict[str, Any]]:
        s = self.spec
        info = get_worker_info()
        w = max(1, s.num_workers)
        phys = info.id if info is not None else 0
        # Rotate so that physical worker 0 (which the DataLoader asks first) serves batch start_batch.
        lw = (phys + s.start_batch) % w
        errors = _Errors(dedupe=s.mode != "resampled")
        n = batches_per_rank(s)
        quota = _worker_batches(n, w, lw)
        skip = _worker_batches(min(s.start_batch, n), w, lw)  # this worker's batches before start
        if quota - skip <= 0:
            return
        if s.mode == "resampled":
            raw = self._resampled_source(lw, errors)
        else:
            if s.mode == "eval":
                order = list(range(len(s.units)))
            else:
                order = [int(i) for i in _rng(s.seed, s.epoch, 0xE90C).permutation(len(s.units))]
            raw = self._exact_source(order, lw, errors)
        if s.mode != "eval" and s.shuffle_buffer > 1:
            import webdataset as wds

            raw = wds.filters._shuffle(  # shuffle raw bytes, before decoding (less memory)
                raw, bufsize=s.shuffle_buffer, initial=min(s.shuffle_buffer, 100),
                rng=random.Random(int(_rng(s.seed, s.epoch, s.rank, lw, 0x5B).integers(1 << 62))),
            )
        slot = 0
        for k in range(quota):
            batch = []
            for sample in raw:
                batch.append(sample)
                if len(batch) == s.batch_size:
                    break
            if not batch:
                return
            if k < skip:  # resume: drop without decoding (and without counting: counted before the checkpoint)
                errors.take_pending()
                slot += len(batch)
                continue
            yield self._make_batch(batch, slot, lw, errors)
            slot += len(batch)

    def _make_batch(self, raw: list[dict[str, Any]], slot0: int, lw: int, errors: _Errors) -> dict[str, Any]:
        s = self.spec
        imgs: list[torch.Tensor | None] = []
        labels: list[int] = []
        for i, sample in enumerate(raw):
            try:
                img, label = self._decode(sample, (s.seed, s.epoch, s.rank, lw, slot0 + i))
            except TransformError:
                raise
            except KeyError as exn:
                errors.skip("missing_label", _where(sample), f"{sample.get('__url__')}:{sample['__key__']}: {exn}")
                img, label = None, -1
            except ImageTooLargeError as exn:
                errors.skip("oversized_image", _where(sample), f"{sample.get('__url__')}:{sample['__key__']}: {exn}")
                img, label = None, -1
            except Exception as exn:
                errors.skip("corrupt_image", _where(sample), f"{sample.get('__url__')}:{sample['__key__']}: {exn}")
                img, label = None, -1
            imgs.append(img)
            labels.append(label)
        good = [i for i, x in enumerate(imgs) if x is not None]
        if s.mode != "eval" and good and len(good) < len(imgs):
            # Keep the batch size: re-use good samples of this batch with their own new augmentation.
            for j, i in enumerate([i for i, x in enumerate(imgs) if x is None]):
                src = good[j % len(good)]
                try:
                    imgs[i], labels[i] = self._decode(raw[src], (s.seed, s.epoch, s.rank, lw, slot0 + i, 1))
                except Exception:  # decoded fine a moment ago; fall back to an exact copy
                    imgs[i], labels[i] = imgs[src], labels[src]
            good = list(range(len(imgs)))
        if not good:
            x = torch.zeros(0)
            y = torch.zeros(0, dtype=torch.int64)
        else:
            if hasattr(s.transform, "collate"):  # data.decode=device: JPEGs stay encoded (device_decode)
                x = s.transform.collate([imgs[i] for i in good], s.mean, s.std)
            elif imgs[good[0]].dtype == torch.uint8:
                x = normalize_batch([imgs[i] for i in good], s.mean, s.std)  # [B, 3, H, W] float
            else:
                x = torch.stack([imgs[i] for i in good])  # [B, 3, H, W], normalized by the transform
            y = torch.tensor([labels[i] for i in good], dtype=torch.int64)  # [B]
        return {"images": x, "labels": y, "worker": lw, "skipped": errors.take_pending()}


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------

def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C reaches every process of the terminal's group, and schedulers send SIGTERM / SIGUSR1 to every
    # process of a job: the training loop handles them (saves a checkpoint at the next step), so loader
    # workers must keep serving batches until it is done (they end with the loader, or when it dies)
    import signal

    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


class StreamLoader:
    """Iterable over batches of one rank; see the module docstring for the split rules.

    Yields `images [B, 3, H, W]` (float32, normalized) for pretraining, or
    `(images, labels [B] int64)` for labeled data.

    Attributes:
        num_samples: samples in the source (after `label_fraction`), all ranks together.
        class_names: class names (labeled sources) or None.
        batch_size, rank, world_size, epoch.
    """

    def __init__(self, spec: _Spec, source: Source, *, pin_memory: bool = False, prefetch_factor: int = 2) -> None:
        if source.num_samples == 0:
            raise DataSourceError(
                f"{source.description} has no readable samples (see the warnings above for why); check that it "
                f"is the data you meant, or rewrite it with `maevit shards write`.")
        if spec.mode != "eval" and batches_per_rank(spec) == 0:
            most = source.num_samples // spec.world_size
            raise DataSourceError(
                f"{source.description}: {source.num_samples} samples are fewer than one batch of "
                f"{spec.batch_size} per process ({spec.world_size} process(es)): lower the batch size "
                f"(data.batch_size) to at most {most}, or use more data."
            )
        self._spec, self._source = spec, source
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.class_names = source.class_names
        self.num_samples = source.num_samples
        self.batch_size, self.rank, self.world_size = spec.batch_size, spec.rank, spec.world_size
        self._skipped = dict.fromkeys(STAT_KEYS, 0)
        self._position = 0  # batches yielded in the current epoch (state_dict)

    @property
    def epoch(self) -> int:
        return self._spec.epoch

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) if self.class_names is not None else None

    def __len__(self) -> int:
        return batches_per_rank(self._spec)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next `iter()` streams (reshuffles units, buffer and augmentation)."""
        self._spec.epoch = int(epoch)

    def skip_batches(self, n: int) -> None:
        """Make the next `iter()` start at batch `n` of the epoch, with the data an uninterrupted
        run would see from there. Skipped batches are read but not decoded."""
        if n < 0:
            raise ValueError(f"skip_batches(n) needs n >= 0, got {n}.")
        self._spec.start_batch = int(n)

    def state_dict(self) -> dict[str, int]:
        """Position to resume from: `{"epoch", "batch"}` (batches already yielded this epoch)."""
        return {"epoch": self._spec.epoch, "batch": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_epoch(state["epoch"])
        self.skip_batches(state["batch"])

    def stats(self) -> dict[str, int]:
        """Samples skipped so far by the batches this loader yielded, by kind (`STAT_KEYS`;
        all epochs, all workers of this rank; each sample once per epoch)."""
        return dict(self._skipped)

    def _loader(self, spec: _Spec) -> Any:
        ds = _StreamDataset(spec)
        if spec.num_workers <= 0:
            return iter(ds)
        return iter(DataLoader(
            ds, batch_size=None, num_workers=spec.num_workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor, persistent_workers=False,
            # A private generator: creating the loader must not consume the training RNG.
            generator=torch.Generator().manual_seed(spec.seed),
            worker_init_fn=_ignore_sigint,
        ))

    def __iter__(self) -> Iterator[Any]:
        spec = replace(self._spec)  # snapshot: set_epoch during iteration affects the next one only
        self._spec.start_batch = 0  # skip_batches applies to one iteration
        self._position = spec.start_batch
        before, yielded = dict(self._skipped), 0
        for item in self._loader(spec):
            for k, v in item["skipped"].items():
                self._skipped[k] += v
            self._position += 1
            if len(item["images"]) == 0:
                continue
            yielded += 1
            yield (item["images"], item["labels"]) if spec.labeled else item["images"]
        if yielded == 0 and spec.start_batch == 0 and batches_per_rank(spec) > 0:
            # a whole pass without one sample: another pass would find the same (and loop forever)
            kinds = {k: self._skipped[k] - before.get(k, 0) for k in self._skipped}
            why = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in kinds.items() if v) or "no sample was read"
            raise DataSourceError(
                f"{self._source.description}: a whole pass (epoch {spec.epoch}, process {spec.rank}) found no "
                f"readable sample ({why}). Stopping instead of repeating it: check the data with "
                f"`maevit shards check`, or rewrite it with `maevit shards write`.")


# ---------------------------------------------------------------------------------------------
# Public constructors
# ---------------------------------------------------------------------------------------------

def _check_rank(rank: int, world_size: int, batch_size: int, num_workers: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}.")
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}.")


def _pretrain_transform(decode: str) -> type:
    if decode == "device":
        from .device_decode import DeviceDecodeTransform

        return DeviceDecodeTransform
    return PretrainTransform


def pretrain_loader(
    source: Any,
    *,
    img_size: int | Sequence[int],
    batch_size: int,
    num_workers: int = 2,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    mode: str = "exact",
    samples_per_epoch: int | None = None,
    shuffle_buffer: int = 1000,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    scale: tuple[float, float] = (0.2, 1.0),
    allow_pipe: bool = False,
    drop_last: bool = True,
    draft: bool = True,
    pin_memory: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    decode: str = "worker",
) -> StreamLoader:
    """MAE pretraining stream: crop-aware RandomResizedCrop + flip + normalize.

    Args:
        source: shard dir / dataset.json / pattern / list / URL / image folder / "bundled[:split]".
        img_size: output size (int or (H, W)).
        batch_size: per-rank batch size.
        num_workers: DataLoader worker processes (0: in this process).
        seed: base seed; the stream is a function of (seed, epoch, rank, world_size, num_workers).
        rank, world_size: this process and the number of processes.
        mode: "exact" (each sample once per epoch, see module docstring) or "resampled".
        samples_per_epoch: epoch length for "resampled" (all ranks together; default: dataset size).
        shuffle_buffer: samples held for shuffling (raw bytes, before decoding).
        mean, std: normalization.
        scale: RandomResizedCrop area range.
        allow_pipe: accept `pipe:` shard URLs (they run shell commands).
        drop_last: True: leave out the incomplete tail; False: wrap around to fill it.
        draft: crop-aware reduced-scale JPEG decoding.
        pin_memory: pin batches (GPU training).
        max_pixels: images with more pixels are skipped and counted (`oversized_image`); None / 0: no limit.
        decode: "worker" (decode + crop in the loader workers) or "device": workers only draw the
            crop and flip; JPEGs are decoded by `batch.to(device)` (see `maevit.data.device_decode`).

    Returns:
        A `StreamLoader` yielding float tensors `[B, 3, H, W]` (with decode="device", batches
        whose `.to(device)` gives that tensor).
    """
    if mode not in ("exact", "resampled"):
        raise ValueError(f"mode must be 'exact' or 'resampled', got {mode!r}.")
    if decode not in ("worker", "device"):
        raise ValueError(f"decode must be 'worker' or 'device', got {decode!r}.")
    _check_rank(rank, world_size, batch_size, num_workers)
    src = resolve_source(source, allow_pipe=allow_pipe, need_counts=mode == "exact")
    if mode == "resampled" and samples_per_epoch is None and not src.counts_known:
        raise DataSourceError("mode='resampled' on shards without counts needs samples_per_epoch "
                              "(data.samples_per_epoch, all processes together).")
    spec = _Spec(
        src.units, batch_size, seed, rank, world_size, num_workers, mode, drop_last, shuffle_buffer,
        samples_per_epoch, False, _pretrain_transform(decode)(img_size, scale=scale, draft=draft),
        tuple(mean), tuple(std), max_pixels=max_pixels,
    )
    return StreamLoader(spec, src, pin_memory=pin_memory)


def _first_tar_has_labels(src: Source, members: int = 64) -> bool:
    """Whether the first local tar of ``src`` holds ``.cls`` members among its first ``members`` files
    (remote tars: assumed labeled; their samples are checked as they stream)."""
    tar = next(u for u in src.units if u.kind == "tar")
    if not _is_local(tar.url):
        return True
    try:
        with tarfile.open(tar.url, "r:") as tf:
            for i, m in enumerate(tf):
                if m.name.endswith(".cls"):
                    return True
                if i >= members:
                    break
    except (tarfile.TarError, OSError, EOFError):
        return True  # a damaged tar is counted as it streams, not judged here
    return False


def _tar_labels(unit: Unit, errors: _Errors) -> list[int]:
    """Labels of every sample position of a tar (-1 where missing), reading only `.cls` members."""
    labels = [-1] * unit.count
    for sample in _read_unit(unit, 0, 1 << 62, errors, wanted=lambda ext: ext.rsplit(".", 1)[-1] == "cls"):
        try:
            if 0 <= sample["__pos__"] < unit.count:
                labels[sample["__pos__"]] = int(sample["cls"].decode().strip())
        except (KeyError, ValueError):
            pass
    return labels


def select_fraction(source: Source, fraction: float, seed: int) -> Source:
    """A fixed class-balanced subset: `round(fraction * n_c)` (at least 1) samples of each class c,
    chosen by `seed` alone.

    Args:
        source: a labeled source (image folder or shards with `.cls`).
        fraction: in (0, 1].
        seed: picks the subset (independent of the training seed).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}.")
    # (unit index, position) of every sample, grouped by label.
    by_class: dict[int, list[tuple[int, int]]] = {}
    errors = _Errors(collect=[])  # a label scan: the training stream reports bad samples
    for ui, unit in enumerate(source.units):
        labels = [unit.label if unit.label is not None else -1] if unit.kind == "file" else _tar_labels(unit, errors)
        for pos, lab in enumerate(labels):
            if lab >= 0:
                by_class.setdefault(lab, []).append((ui, pos))
    rng = _rng(seed, 0x1AB)
    keep: dict[int, list[int]] = {}
    for lab in sorted(by_class):
        items = by_class[lab]
        n = max(1, int(round(fraction * len(items))))
        for idx in sorted(rng.permutation(len(items))[:n]):
            ui, pos = items[idx]
            keep.setdefault(ui, []).append(pos)
    units = []
    for ui, unit in enumerate(source.units):
        if ui not in keep:
            continue
        if unit.kind == "file":
            units.append(unit)
        else:
            sel = tuple(sorted(keep[ui]))
            units.append(replace(unit, count=len(sel), select=sel))
    return Source(units, source.class_names, f"{source.description} ({fraction:g} of labels, seed {seed})")


def labeled_loader(
    source: Any,
    *,
    img_size: int | Sequence[int],
    batch_size: int,
    train: bool,
    num_workers: int = 2,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    label_fraction: float | None = None,
    label_seed: int = 0,
    shuffle_buffer: int = 1000,
    drop_last: bool | None = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    re_prob: float = 0.25,
    color_jitter: float | None = None,
    scale: tuple[float, float] | None = None,
    hflip: float = 0.5,
    interpolation: str = "bicubic",
    crop_pct: float | None = None,
    allow_pipe: bool = False,
    pin_memory: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    class_names: Sequence[str] | None = None,
    classes_from: str = "the model",
) -> StreamLoader:
    """Labeled stream for fine-tuning (train=True) or evaluation (train=False).

    train=True: exact epochs like `pretrain_loader` with timm's training transform.
    train=False: resize + center crop, source order, every sample exactly once across
    ranks, no padding (ranks may differ by one batch; the last batch may be short).

    Args:
        source: a labeled source: class-per-folder tree, shards with `.cls`, "bundled:train|val".
        img_size: output size.
        batch_size: per-rank batch size.
        train: training augmentation + shuffling, or evaluation.
        num_workers, seed, rank, world_size, shuffle_buffer, allow_pipe, pin_memory, max_pixels: as in
            `pretrain_loader`.
        label_fraction: use a fixed class-balanced fraction of the labels (e.g. 0.1).
        label_seed: picks that subset; kept separate from `seed` so runs with different seeds
            see the same labeled samples.
        drop_last: train only (default True); eval never drops.
        mean, std, auto_augment, re_prob, color_jitter, scale, hflip, interpolation, crop_pct:
            transform options (see `transforms.labeled_transform`).
        class_names: the model's classes (e.g. the training data's, or a classifier file's): labels
            are mapped to them by name, and a class outside them is an error before any batch.
        classes_from: what ``class_names`` come from, for that error message.

    Returns:
        A `StreamLoader` yielding `(images [B, 3, H, W], labels [B] int64)`.
    """
    _check_rank(rank, world_size, batch_size, num_workers)
    src = resolve_source(source, allow_pipe=allow_pipe, need_counts=True)
    if src.class_names is None and (src.indexed or not any(u.kind == "tar" for u in src.units)
                                    or not _first_tar_has_labels(src)):
        hint = ""
        if src.description.startswith("image folder "):
            hint = (f" If {src.description[len('image folder '):]} is the folder of one class, pass the folder "
                    f"above it (the one whose sub-folders are the classes).")
        raise DataSourceError(
            f"{src.description} has no labels (unlabeled data given to a labeled command): labeled data is a "
            f"class-per-folder tree (root/<class>/<image>) or shards with .cls members (`maevit shards write` of "
            f"a class-per-folder tree writes them).{hint}"
        )
    mapping = None
    if class_names is not None and src.class_names is not None:
        mapping = label_map(src.class_names, class_names, data=src.description, model=classes_from)
    elif class_names is not None:
        log.warning("%s carries no class names: its integer labels are taken as indices into %s's classes",
                    src.description, classes_from)
    if label_fraction is not None and label_fraction < 1:
        src = select_fraction(src, label_fraction, label_seed)
    if mapping is not None:  # the loader reports the model's classes: its labels are now theirs
        src = replace(src, class_names=list(class_names))
    tf = labeled_transform(
        img_size, train, mean=mean, std=std, auto_augment=auto_augment, re_prob=re_prob,
        color_jitter=color_jitter, scale=scale, hflip=hflip, interpolation=interpolation, crop_pct=crop_pct,
    )
    spec = _Spec(
        src.units, batch_size, seed, rank, world_size, num_workers, "exact" if train else "eval",
        True if drop_last is None else drop_last, shuffle_buffer, None, True, tf, tuple(mean), tuple(std),
        max_pixels=max_pixels, label_map=mapping,
    )
    return StreamLoader(spec, src, pin_memory=pin_memory)
