"""`maevit shards write | info | check`: turn images into webdataset shards and inspect them.

Layout written by `write`:

    OUT_DIR/<prefix>-000000.tar, <prefix>-000001.tar, ...
    OUT_DIR/dataset.json    index: shards + sample counts, total, class names, how it was made

Each sample is `<key>.<jpg|png|webp>` (+ `<key>.cls`, the class index as text,
for labeled sources) + `<key>.json` (`{"path": source path, "class": name}`).
Keys are the zero-padded sample index (`000000042`): stable and sortable.

Reproducible: the same input and options give byte-identical shards and index
(fixed member order, mtime 0, uid/gid 0, no user names, no timestamps in the
index; samples are ordered by a fixed-seed permutation of the sorted file
list, so shards mix classes even for class-per-folder sources). Without
`--resize-shorter`, JPEG / PNG / WebP bytes are stored as they are (no
re-encoding); other formats, and resized images, are encoded as JPEG at
`--quality`.

Safety: existing output is never overwritten unless `--overwrite`; each shard
is written to a temporary name and renamed when complete, and the index is
written last, so an interrupted run never leaves a shard or index that looks
complete. While writing, `dataset.incomplete.json` records the options and the
shards done so far: a folder holding it (and no `dataset.json`) is refused by
the loaders and by `shards check` as incomplete, and running the same command
again continues where the interrupted one stopped (same bytes as an
uninterrupted write); `--overwrite` starts over. Temporary files of a killed
write are removed by the next one. One writer per folder (`OUT_DIR/.lock`).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from maevit.config import Range, ranged
from maevit.dirlock import DirLockedError, lock_dir, unlock_dir
from maevit.fileio import atomic_write, publish, temporary_path

from . import bundled as _bundled, remote
from .sources import INCOMPLETE_NAME, INDEX_NAME, Source, _scan_tar, folder_source, read_index, resolve_source
from .tars import _Errors, _has_image, _image_of, _read_unit, _where
from .transforms import DEFAULT_MAX_PIXELS, ImageTooLargeError, check_pixels, to_rgb

KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def _encode(args: tuple[str, int | None, int]) -> tuple[bytes, str, int]:
    """Read one image file; re-encode only if resizing is asked or the format is not kept.

    Returns (bytes, extension, pixels stored). Raises on unreadable images (the caller
    reports and skips them). High bit depths (16-bit PNG / TIFF, float TIFF) are scaled to
    8 bits when re-encoding, not clipped (`transforms.to_rgb`).
    """
    path, resize_shorter, quality = args
    from PIL import Image

    data = Path(path).read_bytes()
    img = Image.open(io.BytesIO(data))
    fmt = img.format
    if resize_shorter is None and fmt in KEEP_FORMATS:
        img.verify()  # cheap integrity check of the header/structure; bytes stored unchanged
        return data, KEEP_FORMATS[fmt], img.size[0] * img.size[1]
    if resize_shorter is not None and fmt == "JPEG":
        img.draft("RGB", (resize_shorter, resize_shorter))  # DCT-scaled decode, still >= the target size
    img = to_rgb(img)
    if resize_shorter is not None and min(img.size) > resize_shorter:  # never upscale
        w, h = img.size
        s = resize_shorter / min(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue(), "jpg", img.size[0] * img.size[1]


def _tar_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


class _ShardSink:
    """Writes samples into numbered shards, each to a temp name and renamed when complete."""

    def __init__(self, out_dir: Path, prefix: str, max_count: int, max_bytes: int | None,
                 done: list[dict[str, Any]] | None = None,
                 on_close: Callable[[list[dict[str, Any]]], None] | None = None) -> None:
        self.out_dir, self.prefix, self.max_count, self.max_bytes = out_dir, prefix, max_count, max_bytes
        self.shards: list[dict[str, Any]] = [dict(d) for d in done or []]  # `done`: shards of an earlier attempt
        self.on_close = on_close
        self._tf: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = self._bytes = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = temporary_path(self.out_dir / name, hidden=True)
        self._tf = tarfile.open(self._tmp, "w", format=tarfile.GNU_FORMAT)
        self.shards.append({"name": name, "count": 0, "bytes": 0})
        self._count = self._bytes = 0

    def _close(self) -> None:
        if self._tf is None:
            return
        self._tf.close()
        final = publish(self._tmp, self.out_dir / self.shards[-1]["name"])
        self.shards[-1].update(count=self._count, bytes=final.stat().st_size)
        self._tf = None
        if self.on_close is not None:
            self.on_close(self.shards)

    def add(self, members: list[tuple[str, bytes]]) -> None:
        size = sum(len(d) + 512 for _, d in members)
        if self._tf is not None and (
            self._count >= self.max_count or (self.max_bytes and self._count and self._bytes + size > self.max_bytes)
        ):
            self._close()
        if self._tf is None:
            self._open()
        for name, data in members:
            _tar_member(self._tf, name, data)
        self._count += 1
        self._bytes += size

    def finish(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards

    def abort(self) -> None:
        if self._tf is not None:
            self._tf.close()
            self._tmp.unlink(missing_ok=True)
            self._tf = None


def _items(src: str) -> tuple[list[tuple[str, str, int | None]], list[str] | None, str]:
    """(path, relative path, label) of every image of an image-folder source, sorted; class names."""
    if _bundled.is_bundled_spec(src):
        folder = _bundled.resolve_bundled(src)
    else:
        folder = Path(src)
        if not folder.is_dir():
            raise FileNotFoundError(f"{src}: not a directory; SRC is an image folder, a class-per-folder tree "
                                    f"or 'bundled[:train|val]'.")
    source: Source = folder_source(folder)
    items = [(u.url, str(Path(u.url).relative_to(folder)), u.label) for u in source.units]
    return items, source.class_names, str(folder)


def write_shards(
    src: str,
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 1000,
    max_bytes: int | None = None,
    resize_shorter: int | None = None,
    quality: int = 95,
    workers: int | None = None,
    prefix: str = "shard",
    overwrite: bool = False,
    shuffle_seed: int | None = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write an image folder / class-per-folder tree / bundled split as webdataset shards.

    Args:
        src: image folder (recursive), class-per-folder tree, or "bundled[:split]".
        out_dir: output directory (created), or an fsspec URL prefix (``s3://bucket/prefix``): written in a
            local staging folder, then uploaded, ``dataset.json`` last.
        samples_per_shard: most samples per shard.
        max_bytes: most bytes per shard (approximate, tar headers included), or None.
        resize_shorter: resize so the shorter side is this many pixels (never upscales), or None.
        quality: JPEG quality when encoding.
        workers: encoding processes (default: all cores; only used when re-encoding).
        prefix: shard name prefix.
        overwrite: replace an existing dataset in out_dir.
        shuffle_seed: order samples by this fixed permutation (None: sorted path order).
        progress: show a tqdm bar.

    Returns:
        The index written to `out_dir/dataset.json`.
    """
    if remote.is_remote(str(out_dir)):
        return _write_remote(src, str(out_dir), overwrite=overwrite, samples_per_shard=samples_per_shard,
                             max_bytes=max_bytes, resize_shorter=resize_shorter, quality=quality, workers=workers,
                             prefix=prefix, shuffle_seed=shuffle_seed, progress=progress)
    items, classes, src_desc = _items(src)
    out = Path(out_dir)
    try:
        lock_dir(out, purpose="shard folder", advice="Wait for that `maevit shards write` to finish, or write to "
                                                     "another OUT_DIR.")
    except DirLockedError as exn:
        raise FileExistsError(str(exn)) from None
    try:
        return _write_locked(items, classes, src, src_desc, out, samples_per_shard, max_bytes, resize_shorter,
                             quality, workers, prefix, overwrite, shuffle_seed, progress)
    finally:
        unlock_dir(out)


def _write_remote(src: str, url: str, *, overwrite: bool, **options: Any) -> dict[str, Any]:
    """`write_shards` to an object store (any fsspec URL): write the shards in a local staging folder
    (``$TMPDIR``: it must hold the whole dataset), upload them, then upload ``dataset.json`` last, so
    the prefix reads as a dataset only when every shard is there. Each upload is one PUT (an object
    appears whole or not at all); an interrupted write leaves shards without an index, which the
    loaders refuse, and is redone from the start."""
    import tempfile

    fs, path = remote._filesystem(url)
    base = url.rstrip("/")
    if fs.exists(f"{path.rstrip('/')}/{INDEX_NAME}") and not overwrite:
        raise FileExistsError(f"{remote.redact(base)} already holds a dataset ({INDEX_NAME}); pass --overwrite to "
                              f"replace it, or choose another prefix.")
    with tempfile.TemporaryDirectory(prefix="maevit-shards-") as stage:
        index = write_shards(src, stage, overwrite=True, **options)
        if overwrite and fs.exists(f"{path.rstrip('/')}/{INDEX_NAME}"):
            fs.rm_file(f"{path.rstrip('/')}/{INDEX_NAME}")  # first: a half-replaced prefix must not read as a dataset
        for shard in index["shards"]:
            remote.upload(os.path.join(stage, shard["name"]), f"{base}/{shard['name']}")
        names = {s["name"] for s in index["shards"]}
        for stale in fs.glob(f"{path.rstrip('/')}/{options.get('prefix', 'shard')}-*.tar"):  # (--overwrite)
            if stale.rsplit("/", 1)[-1] not in names:
                fs.rm_file(stale)
        remote.upload(os.path.join(stage, INDEX_NAME), f"{base}/{INDEX_NAME}")  # last: now it is a dataset
    return index


def _write_locked(items, classes, src, src_desc, out: Path, samples_per_shard, max_bytes, resize_shorter, quality,
                  workers, prefix, overwrite, shuffle_seed, progress) -> dict[str, Any]:
    from tqdm import tqdm

    for tmp in out.glob(f".{prefix}-*.tar.tmp-*"):  # half-written shards of a killed write
        tmp.unlink(missing_ok=True)
    for tmp in out.glob(f".{INDEX_NAME}.tmp-*"):
        tmp.unlink(missing_ok=True)
    made_with = {
        "source": src if _bundled.is_bundled_spec(src) else os.path.basename(os.path.normpath(src_desc)),
        "samples_per_shard": samples_per_shard, "max_bytes": max_bytes, "resize_shorter": resize_shorter,
        "quality": quality, "shuffle_seed": shuffle_seed, "prefix": prefix,
        "members": ["jpg|png|webp"] + (["cls"] if classes else []) + ["json"],
    }
    # what an interrupted write must share with this one to be continued: options and input files
    plan = {**made_with, "source_path": os.path.abspath(src_desc), "items": len(items),
            "inputs_sha1": hashlib.sha1("\n".join(rel for _, rel, _ in items).encode()).hexdigest()}
    progress_file = out / INCOMPLETE_NAME
    resume = None
    if progress_file.is_file() and not (out / INDEX_NAME).exists() and not overwrite:
        try:
            resume = json.loads(progress_file.read_text())
        except ValueError:
            resume = None
        if resume is None or resume.get("plan") != plan:
            raise FileExistsError(
                f"{out} holds an interrupted `maevit shards write` of another source or with other options "
                f"({progress_file.name}); run that command again to finish it, or pass --overwrite to start over."
            )
    existing = sorted(out.glob(f"{prefix}-*.tar")) + ([out / INDEX_NAME] if (out / INDEX_NAME).exists() else [])
    if existing and not overwrite and resume is None:
        raise FileExistsError(
            f"{out} already holds a dataset ({existing[0].name}, ...); pass --overwrite to replace it, or "
            f"choose another OUT_DIR / --prefix."
        )

    def save_progress(shards: list[dict[str, Any]], items_done: int, bad: list[str]) -> None:
        text = json.dumps({"format": "maevit-shards-write-progress", "plan": plan, "items": len(items),
                           "items_done": items_done, "shards": shards, "bad": bad}, indent=1) + "\n"
        atomic_write(progress_file, lambda tmp: tmp.write_text(text), hidden=True)

    start = resume["items_done"] if resume else 0
    bad: list[str] = list(resume["bad"]) if resume else []
    done_shards = resume["shards"] if resume else []
    save_progress(done_shards, start, bad)  # from here on the folder reads as incomplete ...
    (out / INDEX_NAME).unlink(missing_ok=True)  # ... and an old index is gone
    if resume:
        print(f"continuing an interrupted write of {out}: {len(done_shards)} shards done, "
              f"{start} of {len(items)} inputs", file=sys.stderr)
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(items))
        items = [items[i] for i in order]
    workers = workers or os.cpu_count() or 1
    jobs = [(path, resize_shorter, quality) for path, _, _ in items[start:]]
    cursor = [start]  # index of the input being added: a shard closed now holds the inputs before it
    sink = _ShardSink(out, prefix, samples_per_shard, max_bytes, done=done_shards,
                      on_close=lambda shards: save_progress(shards, cursor[0], [b for b in bad]))
    pool = ProcessPoolExecutor(workers) if (workers > 1 and resize_shorter is not None) else None
    big: list[str] = []

    def encoded() -> Iterator[tuple[bytes, str, int] | Exception]:
        if pool is None:
            for job in jobs:
                try:
                    yield _encode(job)
                except Exception as exn:  # report and skip unreadable inputs
                    yield exn
        else:
            # Ordered results keep the output reproducible; chunks bound the memory in flight.
            for first in range(0, len(jobs), 256):
                futures = [pool.submit(_encode, j) for j in jobs[first:first + 256]]
                for f in futures:
                    try:
                        yield f.result()
                    except Exception as exn:
                        yield exn

    n = sum(s["count"] for s in done_shards)
    try:
        bar = tqdm(total=len(items), initial=start, unit="file", desc=f"writing {out}", disable=not progress,
                   smoothing=0.1)
        for idx, ((path, rel, label), res) in enumerate(zip(items[start:], encoded()), start=start):
            bar.update(1)
            if isinstance(res, Exception):
                bad.append(f"{rel}: {res}")
                continue
            data, ext, pixels = res
            if pixels > DEFAULT_MAX_PIXELS:
                big.append(rel)
            cursor[0] = idx
            key = f"{n:09d}"
            meta = {"path": rel} | ({"class": classes[label]} if label is not None else {})
            members = [(f"{key}.{ext}", data)]
            if label is not None:
                members.append((f"{key}.cls", str(label).encode()))
            members.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
            sink.add(members)
            n += 1
        bar.close()
        cursor[0] = len(items)  # the last shard closes with every input done
        shards = sink.finish()
    except BaseException:
        sink.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown()
    if n == 0 and items:  # nothing readable: no index, so no folder that looks like an empty dataset
        progress_file.unlink(missing_ok=True)
        raise ValueError(f"none of the {len(items)} images under {src} could be read (first: {bad[0]}); "
                         f"no shards were written. Check that the files are images (JPEG / PNG / WebP / BMP).")
    names = {s["name"] for s in shards}
    for stale in out.glob(f"{prefix}-*.tar"):  # overwrite: shards beyond the new count would otherwise linger
        if stale.name not in names:
            stale.unlink()
    index = {
        "format": "maevit-webdataset",
        "version": 1,
        "shards": shards,
        "total": n,
        "classes": classes,
        "skipped": len(bad),
        "made_with": made_with,
    }
    # written last: from now on the folder is a complete dataset
    atomic_write(out / INDEX_NAME, lambda tmp: tmp.write_text(json.dumps(index, indent=1) + "\n"), hidden=True)
    progress_file.unlink(missing_ok=True)
    for line in bad[:20]:
        print(f"skipped unreadable image {line}", file=sys.stderr)
    if big:
        print(f"{len(big)} images are over the loaders' pixel limit of {DEFAULT_MAX_PIXELS / 1e6:.0f} MP "
              f"(first: {big[0]}) and will be skipped in training: write the shards with --resize-shorter "
              f"(e.g. 512) to store them smaller", file=sys.stderr)
    return index


# ---------------------------------------------------------------------------------------------
# Inspecting
# ---------------------------------------------------------------------------------------------

def shard_info(path: str, allow_pipe: bool = False) -> dict[str, Any]:
    """Counts, classes and sizes of a shard directory / index / pattern."""
    src = resolve_source(path, allow_pipe=allow_pipe, need_counts=True)
    sizes = [os.path.getsize(u.url) if os.path.exists(u.url) else None for u in src.units]
    index = None
    if os.path.isdir(path) and os.path.exists(os.path.join(path, INDEX_NAME)):
        index = read_index(os.path.join(path, INDEX_NAME))
    elif str(path).endswith(".json"):
        index = read_index(str(path))
    return {
        "source": src.description,
        "shards": len(src.units),
        "samples": src.num_samples,
        "classes": src.class_names,
        "bytes": sum(s for s in sizes if s) if all(s is not None for s in sizes) else None,
        "made_with": index.get("made_with") if index else None,
    }


def check_shards(path: str, allow_pipe: bool = False, progress: bool = True,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Decode every sample as the loaders do; report the bad ones without stopping.

    Bad samples are counted once each, by the loaders' kinds (`stream.STAT_KEYS`). A
    damaged shard is one line saying how many of its samples were lost: exactly when a
    `dataset.json` lists its count; without one, the samples after the damage cannot be
    counted and the line says the shard is damaged. A folder left by an interrupted
    `shards write` raises `IncompleteDatasetError`.

    Returns:
        {"samples": decoded OK, "bad": [one line per problem], "errors": bad samples by kind,
         "expected": samples listed, "lost": samples that never came out of their shard}.
    """
    from PIL import Image
    from tqdm import tqdm

    src = resolve_source(path, allow_pipe=allow_pipe, need_counts=False)
    lines: list[str] = []
    errors = _Errors(collect=lines)  # this command prints its own report
    ok = 0
    bar = tqdm(total=src.num_samples if src.counts_known else None, unit="sample", disable=not progress)
    for unit in src.units:
        first_line = len(lines)
        for sample in _read_unit(unit, 0, 1 << 62, errors):
            bar.update(1)
            if not _has_image(sample, errors):
                continue
            where = f"{unit.url}:{sample['__key__']}"
            try:
                with Image.open(io.BytesIO(_image_of(sample))) as img:
                    check_pixels(img, max_pixels)
                    img.load()
                    to_rgb(img)
            except ImageTooLargeError as exn:
                errors.skip("oversized_image", _where(sample), f"{where}: {exn}")
                continue
            except Exception as exn:
                errors.skip("corrupt_image", _where(sample), f"{where}: {type(exn).__name__}: {exn}")
                continue
            if "cls" in sample:
                try:
                    int(sample["cls"].decode().strip())
                except (ValueError, UnicodeDecodeError) as exn:
                    errors.skip("missing_label", _where(sample), f"{where}: unreadable .cls ({exn})")
                    continue
            ok += 1
        shard_lines = [x for x in lines[first_line:] if x.endswith("[unreadable_shard]")]
        if unit.kind == "tar" and "://" not in unit.url and not unit.url.startswith("pipe:") and not shard_lines:
            _, damage = _scan_tar(unit.url)  # e.g. cut exactly between two members: tar readers stop silently
            if damage:
                errors.note("unreadable_shard", f"{unit.url}: damaged ({damage}); the samples after the damage are "
                                                f"lost{'' if src.indexed else ', and without a dataset.json index their number is unknown'}")
    bar.close()
    return {"samples": ok, "bad": lines, "errors": dict(errors.counts), "expected": src.num_samples,
            "lost": errors.counts["unreadable_shard"]}


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maevit shards", description="write / inspect / check webdataset shards")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="turn an image folder / class tree / bundled data into shards")
    w.add_argument("src", help="image folder (recursive), class-per-folder tree, or bundled[:train|val]")
    w.add_argument("out_dir", help="output folder, or an object-store prefix (s3://bucket/prefix, gs://..., any "
                                   "fsspec URL: staged locally, uploaded, dataset.json last)")
    w.add_argument("--samples-per-shard", type=ranged(int, Range(1)), default=1000)
    w.add_argument("--max-bytes", type=ranged(int, Range(1)), default=None, help="most bytes per shard")
    w.add_argument("--resize-shorter", type=ranged(int, Range(1)), default=None,
                   help="resize shorter side to S px (off by default); the cure for very large images, which "
                        "cost seconds and GBs per decode in every epoch")
    w.add_argument("--quality", type=ranged(int, Range(1, 100)), default=95, help="JPEG quality when encoding")
    w.add_argument("--workers", type=ranged(int, Range(1)), default=None,
                   help="encoding processes (default: all cores)")
    w.add_argument("--prefix", default="shard")
    w.add_argument("--shuffle-seed", type=ranged(int, Range(-1)), default=0, help="sample order permutation; -1 keeps sorted order")
    w.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUT_DIR")
    w.add_argument("--no-progress", action="store_true")
    for name, help_ in (("info", "counts, classes and sizes"), ("check", "decode every sample, report bad ones")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("path", help="shard directory, dataset.json, pattern (a-{000000..000009}.tar) or glob")
        c.add_argument("--allow-pipe", action="store_true", help="accept pipe: URLs (they run shell commands)")
        if name == "check":
            c.add_argument("--no-progress", action="store_true")
            c.add_argument("--max-pixels", type=ranged(int, Range(0)), default=DEFAULT_MAX_PIXELS,
                           help=f"report images with more pixels, which the loaders skip (default {DEFAULT_MAX_PIXELS}"
                                f" = data.max_pixels; 0: no limit)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `maevit shards`. Returns the exit code (check: 1 if any sample is bad)."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.cmd == "write":
            index = write_shards(
                args.src, args.out_dir, samples_per_shard=args.samples_per_shard, max_bytes=args.max_bytes,
                resize_shorter=args.resize_shorter, quality=args.quality, workers=args.workers, prefix=args.prefix,
                overwrite=args.overwrite, shuffle_seed=None if args.shuffle_seed < 0 else args.shuffle_seed,
                progress=not args.no_progress,
            )
            print(f"wrote {index['total']} samples in {len(index['shards'])} shards to {args.out_dir}"
                  + (f" ({index['skipped']} unreadable images skipped)" if index["skipped"] else ""))
            return 0
        if args.cmd == "info":
            info = shard_info(args.path, allow_pipe=args.allow_pipe)
            print(f"source:  {info['source']}")
            print(f"shards:  {info['shards']}")
            print(f"samples: {info['samples']}")
            if info["bytes"] is not None:
                print(f"bytes:   {info['bytes']} ({info['bytes'] / 2**20:.1f} MiB)")
            classes = info["classes"]
            print(f"classes: {len(classes)}: {', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''}"
                  if classes else "classes: none (unlabeled)")
            if info["made_with"]:
                print(f"made with: {json.dumps(info['made_with'], sort_keys=True)}")
            return 0
        report = check_shards(args.path, allow_pipe=args.allow_pipe, progress=not args.no_progress,
                              max_pixels=args.max_pixels or None)
        for line in report["bad"]:
            print(f"BAD {line}")
        kinds = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in report["errors"].items() if v)
        print(f"{report['samples']} samples OK, {sum(report['errors'].values())} bad" + (f" ({kinds})" if kinds else ""))
        return 1 if report["bad"] else 0
    except (FileExistsError, FileNotFoundError, ValueError, remote.RemoteReadError) as exn:
        print(f"maevit shards {args.cmd}: {exn}", file=sys.stderr)
        return 2
