"""Data sources: what a `data.*` string names (shard folder, `dataset.json`, pattern, list, image folder,
"bundled[:split]", "sample[:split]") as a list of units with sample counts; class-balanced label fractions."""
from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any


from . import bundled as _bundled, sample as _sample
from .remote import holds_credentials, is_remote, read_bytes, redact
from .transforms import IMAGE_EXTS

log = logging.getLogger("maevit.data.stream")  # the name the warnings have always had


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
    sample positions inside the tar) restricts it to a subset (label_fraction), and
    `cached` may hold those samples' raw members, read once (see `split.select_fraction`).
    """

    url: str
    count: int
    kind: str = "tar"
    label: int | None = None  # files of a class-per-folder tree
    key: str = ""  # files: relative path without extension
    select: tuple[int, ...] | None = None
    cached: tuple[dict, ...] | None = field(default=None, repr=False, compare=False)


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
    if is_remote(url) and holds_credentials(url):
        raise DataSourceError(
            f"refusing shard URL {redact(url)!r}: it holds credentials (a user name / password or a token / signature "
            f"in the query), which would be saved in the run's config and logs. Give them to the storage back-end "
            f"instead (its usual environment variables or config file: ~/.aws/credentials, "
            f"GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*, HF_TOKEN, ...) and drop them from the URL."
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
    """Load a `dataset.json` index (local path, or any URL :mod:`~maevit.data.remote` reads)."""
    if _is_local(path_or_url):
        return json.loads(Path(path_or_url).read_text())
    try:
        return json.loads(read_bytes(path_or_url).decode("utf-8"))
    except (OSError, ValueError) as exn:
        raise DataSourceError(f"cannot read the shard index {redact(path_or_url)}: {redact(str(exn))}. Check the "
                              f"URL, the network and the storage credentials (from the back-end's usual "
                              f"environment / config, never from maevit's config).") from None


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
    path = index_url.split("?", 1)[0] if is_remote(index_url) else index_url  # shards get no query of the index
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    units = []
    for s in index["shards"]:
        url = s["url"] if "url" in s else f"{base}/{s['name']}"
        _check_url(url, allow_pipe)
        units.append(Unit(url, int(s["count"])))
    return Source(units, index.get("classes"), f"shard index {redact(index_url)}", indexed=True)


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
    if (src.split("?", 1)[0] if is_remote(src) else src).endswith(".json"):
        return _index_source(src, allow_pipe)
    if is_remote(src) and not src.split("?", 1)[0].endswith(".tar") and not any(c in src for c in "{*"):
        return _index_source(f"{src.rstrip('/')}/{INDEX_NAME}", allow_pipe)  # a remote shard folder (prefix)
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
