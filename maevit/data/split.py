"""Split arithmetic and the worker dataset: which samples each rank and worker reads, every epoch,
exactly once (see :mod:`maevit.data.stream` for the design)."""
from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .transforms import (
    DEFAULT_MAX_PIXELS,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ImageTooLargeError,
    PretrainTransform,
    apply_seeded,
    check_pixels,
    normalize_batch,
    open_image,
    to_rgb,
)

from .sources import Source, Unit
from .tars import TransformError, _Errors, _has_image, _image_of, _read_unit, _tar_labels, _where

log = logging.getLogger("maevit.data.stream")  # the name the warnings have always had


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
    elastic: Any = None  # an elastic.ElasticResume: the rest of that epoch, without what another layout saw
    n_batches: int | None = None  # batches per rank, when not from the counts (the rest of an epoch)
    permute: bool = True  # permute the units from (seed, epoch) (the rest of an epoch is already in order)

    def __post_init__(self) -> None:
        self.counts = [u.count for u in self.units]


def batches_per_rank(spec: _Spec, rank: int | None = None) -> int:
    """Batches one rank yields per epoch (identical on all ranks except in eval mode)."""
    total, world, b = sum(spec.counts), spec.world_size, spec.batch_size
    if spec.n_batches is not None:
        return spec.n_batches
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

    @staticmethod
    def _order(s: _Spec) -> list[int]:
        """The units in the order of this epoch's virtual sequence."""
        if s.mode == "eval" or not s.permute:
            return list(range(len(s.units)))
        return [int(i) for i in _rng(s.seed, s.epoch, 0xE90C).permutation(len(s.units))]

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
        if s.elastic is not None and s.elastic.epoch == s.epoch and s.mode == "exact":
            from .elastic import rest_of_epoch  # resumed on another number of processes inside this epoch

            s = self.spec = rest_of_epoch(s, self._order(s))
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
            raw = self._exact_source(self._order(s), lw, errors)
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
        keys, order = [], []
        if s.mode == "eval":  # each sample's key, and where it comes in source order (see StreamLoader.records)
            keys = [str(raw[i].get("__key__", "")) for i in good]
            order = [(lw << 40) + slot0 + i for i in good]
        return {"images": x, "labels": y, "keys": keys, "order": order, "worker": lw,
                "skipped": errors.take_pending()}


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
    return Source(_read_once(units), source.class_names, f"{source.description} ({fraction:g} of labels, seed {seed})")


SUBSET_CACHE_BYTES = 64 << 20  # local shards up to this size in all: a label subset is read once, then kept


def _read_once(units: list[Unit]) -> list[Unit]:
    """Keep the raw members of a label subset in memory when its local shards are small.

    Each epoch of a subset would otherwise read every shard to the end (a tar, gzipped or not, is read in
    order) to use a fraction of it: at 10% of the labels, nine tenths of the data loader's work (measured:
    ~1.4 s per epoch of the demo's 7-step fine-tuning epochs, on the cores the model trains on). The members
    are the same bytes, so the batches are too. A unit with any unreadable sample keeps streaming, so bad
    samples are counted where they are met, as before.
    """
    tars = [u for u in units if u.kind == "tar"]
    try:
        size = sum(os.path.getsize(u.url) for u in tars)
    except (OSError, ValueError):  # remote, or gone: stream as usual
        return units
    if not tars or size > SUBSET_CACHE_BYTES:
        return units
    out = []
    for unit in units:
        if unit.kind == "tar" and unit.select is not None:
            samples = tuple(_read_unit(unit, 0, unit.count, _Errors(collect=[])))
            whole = [s.get("__pos__") for s in samples] == list(unit.select) and all(
                "__bad__" not in s and _image_of(s) is not None for s in samples)
            unit = replace(unit, cached=samples) if whole else unit
        out.append(unit)
    return out
