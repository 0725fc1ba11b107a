"""The rest of an epoch after a resume on a different number of processes, without repeats.

An exact-mode epoch is one virtual sequence of samples (units permuted from
``(seed, epoch)``, the same for any number of processes), cut into one range per
rank and per logical worker, each read through its own seeded shuffle buffer
(:mod:`maevit.data.split`). Which samples a run on ``world`` processes has seen
after ``batch`` batches per rank therefore depends only on numbers: replaying
each old worker's shuffle over the *positions* of its range (no reading, no
decoding) gives the exact set. The resumed run streams the rest: the epoch's
sequence without those positions, cut among the new ranks and workers as usual,
``n - offset`` batches per rank (``offset``: the batches that correspond to what
was seen, ``batch * world / new world``).

Exact while no sample was dropped before the shuffle (an unreadable shard or a
sample without an image makes a worker refill from its own range, which the
replay cannot see); then the rest of the epoch may leave out a few unseen
samples but still repeats none of the seen ones outside the dropped neighbourhood.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ElasticResume:
    """Where a run on another number of processes stopped inside ``epoch`` (saved in checkpoints).

    Attributes:
        epoch: the epoch it applies to (later epochs are whole).
        world: processes of the run that stopped.
        batch: batches per rank it had consumed in ``epoch``.
        offset: the same position in batches per rank of the resumed run.
        workers: loader workers per rank of the run that stopped (None: as now).
    """

    epoch: int
    world: int
    batch: int
    offset: int
    workers: int | None = None


def seen_positions(spec: Any, resume: ElasticResume) -> np.ndarray:
    """Sorted positions of the virtual sequence of ``spec.epoch`` that ``resume.world`` ranks (with
    ``resume.workers`` loader workers each) had consumed after ``resume.batch`` batches each (with ``spec``'s
    batch size, seed and shuffle buffer)."""
    import webdataset as wds

    from .split import _StreamDataset, _rng, _worker_batches

    s = replace(spec, num_workers=spec.num_workers if resume.workers is None else resume.workers)
    w = max(1, s.num_workers)
    seen: list[np.ndarray] = []
    for rank in range(resume.world):
        old = replace(s, world_size=resume.world, rank=rank, elastic=None, n_batches=None, start_batch=0)
        ds = _StreamDataset(old)
        for lw in range(w):
            start, length = ds._range(lw)
            take = _worker_batches(resume.batch, w, lw) * s.batch_size
            positions: Any = iter(range(start, start + length))
            if s.shuffle_buffer > 1:  # the same buffer, seed and order as the worker's (split.__iter__)
                positions = wds.filters._shuffle(
                    positions, bufsize=s.shuffle_buffer, initial=min(s.shuffle_buffer, 100),
                    rng=random.Random(int(_rng(s.seed, s.epoch, rank, lw, 0x5B).integers(1 << 62))))
            seen.append(np.fromiter((p for _, p in zip(range(take), positions)), dtype=np.int64))
    return np.unique(np.concatenate(seen)) if seen else np.zeros(0, dtype=np.int64)


def rest_of_epoch(spec: Any, order: list[int]) -> Any:
    """``spec`` for the rest of ``spec.elastic.epoch``: its units in ``order`` without the seen samples
    (``Unit.select``), not permuted again, ``n - offset`` batches per rank, started at ``start_batch - offset``."""
    from .split import batches_per_rank

    resume: ElasticResume = spec.elastic
    seen = seen_positions(spec, resume)
    units, at = [], 0
    for i in order:
        unit = spec.units[i]
        lo, hi = np.searchsorted(seen, [at, at + unit.count])
        gone = set((seen[lo:hi] - at).tolist())
        at += unit.count
        if not gone:
            units.append(unit)
        elif len(gone) < unit.count:
            keep = [p for p in range(unit.count) if p not in gone]
            sel = tuple(unit.select[p] for p in keep) if unit.select is not None else tuple(keep)
            units.append(replace(unit, count=len(sel), select=sel))
    n = batches_per_rank(replace(spec, elastic=None, n_batches=None)) - resume.offset
    return replace(spec, units=units, elastic=None, n_batches=max(0, n), permute=False,
                   start_batch=max(0, spec.start_batch - resume.offset))
