"""Reading raw samples from tars and image folders (no decoding), with the error accounting:
bad samples are counted by kind, logged at a limited rate, never raised."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence


from .remote import open_stream, redact
from .transforms import IMAGE_EXTS

from .sources import INDEX_NAME, STAT_KEYS, TEXT_EXTS, Unit

log = logging.getLogger("maevit.data.stream")  # the name the warnings have always had


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
        what = redact(what)  # shard URLs may carry user:password@ or signed query tokens
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
        stream = open_stream(unit.url)
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
        if getattr(stream, "error", None) is not None:  # a remote shard that stayed unreachable: the real cause
            state["error"] = str(stream.error)
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
    if unit.cached is not None:  # a label-fraction subset read once (split.select_fraction)
        for sample in unit.cached[max(start, 0):stop]:
            yield {k: v for k, v in sample.items() if k.startswith("__") or wanted(k.lower())}
        return
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
