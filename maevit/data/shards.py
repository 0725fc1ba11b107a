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
complete.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from . import bundled as _bundled
from .stream import INDEX_NAME, Source, _Errors, _image_of, _read_unit, folder_source, read_index, resolve_source

KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def _encode(args: tuple[str, int | None, int]) -> tuple[bytes, str]:
    """Read one image file; re-encode only if resizing is asked or the format is not kept.

    Returns (bytes, extension). Raises on unreadable images (the caller reports and skips them).
    """
    path, resize_shorter, quality = args
    from PIL import Image

    data = Path(path).read_bytes()
    img = Image.open(io.BytesIO(data))
    fmt = img.format
    if resize_shorter is None and fmt in KEEP_FORMATS:
        img.verify()  # cheap integrity check of the header/structure; bytes stored unchanged
        return data, KEEP_FORMATS[fmt]
    img = img.convert("RGB")
    if resize_shorter is not None and min(img.size) > resize_shorter:  # never upscale
        w, h = img.size
        s = resize_shorter / min(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue(), "jpg"


def _tar_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


class _ShardSink:
    """Writes samples into numbered shards, each to a temp name and renamed when complete."""

    def __init__(self, out_dir: Path, prefix: str, max_count: int, max_bytes: int | None) -> None:
        self.out_dir, self.prefix, self.max_count, self.max_bytes = out_dir, prefix, max_count, max_bytes
        self.shards: list[dict[str, Any]] = []
        self._tf: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = self._bytes = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = self.out_dir / f".{name}.tmp-{os.getpid()}"
        self._tf = tarfile.open(self._tmp, "w", format=tarfile.GNU_FORMAT)
        self.shards.append({"name": name, "count": 0, "bytes": 0})
        self._count = self._bytes = 0

    def _close(self) -> None:
        if self._tf is None:
            return
        self._tf.close()
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())
        final = self.out_dir / self.shards[-1]["name"]
        os.replace(self._tmp, final)
        self.shards[-1].update(count=self._count, bytes=final.stat().st_size)
        self._tf = None

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
        out_dir: output directory (created).
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
    from tqdm import tqdm

    items, classes, src_desc = _items(src)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob(f"{prefix}-*.tar")) + ([out / INDEX_NAME] if (out / INDEX_NAME).exists() else [])
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds a dataset ({existing[0].name}, ...); pass --overwrite to replace it, or "
            f"choose another OUT_DIR / --prefix."
        )
    if existing:
        (out / INDEX_NAME).unlink(missing_ok=True)  # no stale index while rewriting
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(items))
        items = [items[i] for i in order]
    workers = workers or os.cpu_count() or 1
    jobs = [(path, resize_shorter, quality) for path, _, _ in items]
    sink = _ShardSink(out, prefix, samples_per_shard, max_bytes)
    bad: list[str] = []
    pool = ProcessPoolExecutor(workers) if (workers > 1 and resize_shorter is not None) else None

    def encoded() -> Iterator[tuple[bytes, str] | Exception]:
        if pool is None:
            for job in jobs:
                try:
                    yield _encode(job)
                except Exception as exn:  # report and skip unreadable inputs
                    yield exn
        else:
            # Ordered results keep the output reproducible; chunks bound the memory in flight.
            for start in range(0, len(jobs), 256):
                futures = [pool.submit(_encode, j) for j in jobs[start:start + 256]]
                for f in futures:
                    try:
                        yield f.result()
                    except Exception as exn:
                        yield exn

    n = 0
    try:
        bar = tqdm(total=len(items), unit="file", desc=f"writing {out}", disable=not progress, smoothing=0.1)
        for (path, rel, label), res in zip(items, encoded()):
            bar.update(1)
            if isinstance(res, Exception):
                bad.append(f"{rel}: {res}")
                continue
            data, ext = res
            key = f"{n:09d}"
            meta = {"path": rel} | ({"class": classes[label]} if label is not None else {})
            members = [(f"{key}.{ext}", data)]
            if label is not None:
                members.append((f"{key}.cls", str(label).encode()))
            members.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
            sink.add(members)
            n += 1
        bar.close()
        shards = sink.finish()
    except BaseException:
        sink.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown()
    for stale in existing:  # overwrite: shards beyond the new count would otherwise linger
        if stale.name not in {s["name"] for s in shards} and stale.exists() and stale.name != INDEX_NAME:
            stale.unlink()
    index = {
        "format": "maevit-webdataset",
        "version": 1,
        "shards": shards,
        "total": n,
        "classes": classes,
        "skipped": len(bad),
        "made_with": {
            "source": src if _bundled.is_bundled_spec(src) else os.path.basename(os.path.normpath(src_desc)),
            "samples_per_shard": samples_per_shard, "max_bytes": max_bytes, "resize_shorter": resize_shorter,
            "quality": quality, "shuffle_seed": shuffle_seed, "prefix": prefix,
            "members": ["jpg|png|webp"] + (["cls"] if classes else []) + ["json"],
        },
    }
    tmp = out / f".{INDEX_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, out / INDEX_NAME)
    for line in bad[:20]:
        print(f"skipped unreadable image {line}", file=sys.stderr)
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


def check_shards(path: str, allow_pipe: bool = False, progress: bool = True) -> dict[str, Any]:
    """Decode every sample; report corrupt ones without stopping.

    Returns:
        {"samples": decoded OK, "bad": [description, ...], "errors": counts by kind}.
    """
    from PIL import Image
    from tqdm import tqdm

    src = resolve_source(path, allow_pipe=allow_pipe, need_counts=False)
    errors = _Errors(first=0, every_s=float("inf"))  # this command prints its own report
    bad: list[str] = []
    ok = 0
    seen_keys = 0
    bar = tqdm(total=src.num_samples if src.counts_known else None, unit="sample", disable=not progress)
    for unit in src.units:
        before = dict(errors.counts)
        for sample in _read_unit(unit, 0, 1 << 62, errors):
            seen_keys += 1
            bar.update(1)
            where = f"{unit.url}:{sample['__key__']}"
            data = _image_of(sample)
            if data is None:
                bad.append(f"{where}: no image member ({', '.join(k for k in sample if not k.startswith('__'))})")
                continue
            try:
                with Image.open(io.BytesIO(data)) as img:
                    img.load()
                if "cls" in sample:
                    int(sample["cls"].decode().strip())
                ok += 1
            except Exception as exn:
                bad.append(f"{where}: {type(exn).__name__}: {exn}")
        for kind in ("unreadable_shard", "bad_member"):
            if errors.counts[kind] > before[kind]:
                bad.append(f"{unit.url}: {kind.replace('_', ' ')} (truncated or damaged tar)")
    bar.close()
    return {"samples": ok, "bad": bad, "errors": dict(errors.counts), "expected": src.num_samples}


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maevit shards", description="write / inspect / check webdataset shards")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="turn an image folder / class tree / bundled data into shards")
    w.add_argument("src", help="image folder (recursive), class-per-folder tree, or bundled[:train|val]")
    w.add_argument("out_dir")
    w.add_argument("--samples-per-shard", type=int, default=1000)
    w.add_argument("--max-bytes", type=int, default=None, help="most bytes per shard")
    w.add_argument("--resize-shorter", type=int, default=None, help="resize shorter side to S px (off by default)")
    w.add_argument("--quality", type=int, default=95, help="JPEG quality when encoding")
    w.add_argument("--workers", type=int, default=None, help="encoding processes (default: all cores)")
    w.add_argument("--prefix", default="shard")
    w.add_argument("--shuffle-seed", type=int, default=0, help="sample order permutation; -1 keeps sorted order")
    w.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUT_DIR")
    w.add_argument("--no-progress", action="store_true")
    for name, help_ in (("info", "counts, classes and sizes"), ("check", "decode every sample, report bad ones")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("path", help="shard directory, dataset.json, pattern (a-{000000..000009}.tar) or glob")
        c.add_argument("--allow-pipe", action="store_true", help="accept pipe: URLs (they run shell commands)")
        if name == "check":
            c.add_argument("--no-progress", action="store_true")
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
        report = check_shards(args.path, allow_pipe=args.allow_pipe, progress=not args.no_progress)
        for line in report["bad"]:
            print(f"BAD {line}")
        print(f"{report['samples']} samples OK, {len(report['bad'])} bad")
        return 1 if report["bad"] else 0
    except (FileExistsError, FileNotFoundError, ValueError) as exn:
        print(f"maevit shards {args.cmd}: {exn}", file=sys.stderr)
        return 2
