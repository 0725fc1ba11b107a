"""What a run records as it goes: ``metrics.jsonl`` (one JSON row per log step, cut back to the
checkpoint on resume) and the bad samples its loader skipped, by kind (continued on resume)."""
from __future__ import annotations

import errno
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from maevit.fileio import write_text_atomic

logger = logging.getLogger("maevit.train.runs")


class MetricsLogger:
    """Append-only ``metrics.jsonl``: one JSON object per call, with ``step`` first.

    Only the main process writes (``enabled``). Lines after ``resume_step``
    (steps that will be run again: after the checkpoint being resumed, or all of
    them when a run starts at step 0 over rows left by an attempt killed before
    its first checkpoint) and a torn last line from a killed run are dropped, so
    the file reads as one uninterrupted run.

    Args:
        path: the ``metrics.jsonl`` file.
        enabled: False on non-main processes (then every call is a no-op).
        resume_step: the step of the checkpoint being resumed; None for a run starting at step 0.
        resume_rows: how many rows the file had when that checkpoint was written (``rows``, saved in it):
            exactly those are kept, so a row written after the checkpoint at its own step (an evaluation
            at an epoch's last step) is not doubled when the resumed run writes it again. None (older
            checkpoints): the rows up to ``resume_step``.

    Attributes:
        rows: rows in the file so far (what a checkpoint records).
    """

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True, resume_step: int | None = None,
                 resume_rows: int | None = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._file = None
        self.rows = 0
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            start = 0 if resume_step is None else resume_step
            rows = read_metrics(self.path)
            if resume_step is not None and resume_rows is not None:
                kept, dropped = rows[:resume_rows], rows[resume_rows:]
            else:
                kept = [r for r in rows if r.get("step", 0) <= start]
                dropped = [r for r in rows if r.get("step", 0) > start]
            if dropped:  # kept aside, never deleted: they are the record of what happened
                replaced = self.path.with_name(self.path.stem + "-replaced.jsonl")
                with open(replaced, "a") as f:
                    f.writelines(json.dumps({**r, "replaced_at": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n"
                                 for r in dropped)
                logger.info("%s: %d rows after step %d, left by an interrupted run, moved to %s; those steps run "
                            "again", self.path, len(rows) - len(kept), start, replaced.name)
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            self.rows = len(kept)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a kill loses at most one line

    def log(self, step: int, **metrics: Any) -> None:
        """Write ``{"step": step, **metrics}``; tensors and numpy scalars become numbers."""
        if self._file is None:
            return
        row = {"step": int(step)}
        for key, value in metrics.items():
            row[key] = value.item() if hasattr(value, "item") else value
        try:
            self._file.write(json.dumps(row) + "\n")
            self.rows += 1
        except OSError as exn:
            if exn.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            from maevit.train.runs import DiskFullError  # (runs imports this module)

            raise DiskFullError(
                f"the disk is full: a metrics row of step {step} could not be appended to {self.path} ({exn}). "
                f"The rows written so far and the last checkpoint are intact. Free some space (or move run.dir "
                f"to a larger disk), then run the same command again to resume.") from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete rows of a ``metrics.jsonl`` (a torn last line is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class SkipTally:
    """Bad samples a run's loader skipped, by kind, summed over processes, continued on resume.

    Each process's ``StreamLoader.stats()`` counts the samples its batches skipped; the
    totals of the run so far are saved in the checkpoint (``state["skipped"]``) and added
    back on the main process when resuming, so the counts match an uninterrupted run.

    Args:
        accelerator: the run's ``Accelerator``.
        loaders: loaders with ``stats() -> {kind: count}`` (``maevit.data.stream.StreamLoader``): the
            training stream, and any other the task reads.
        saved: ``state.get("skipped")`` of the checkpoint being resumed, else None.
    """

    def __init__(self, accelerator: Any, loaders: Sequence[Any], saved: Mapping[str, int] | None = None) -> None:
        from maevit.data.stream import STAT_KEYS

        self.kinds = STAT_KEYS
        self.acc, self.loaders = accelerator, list(loaders)
        self.base = dict(saved or {}) if accelerator.is_main_process else {}

    def totals(self) -> dict[str, int]:
        """``{kind: samples}`` of all processes since step 0. Every process must call it (a reduce)."""
        local = [loader.stats() for loader in self.loaders if hasattr(loader, "stats")]
        counts = [sum(int(s.get(k, 0)) for s in local) + int(self.base.get(k, 0)) for k in self.kinds]
        if self.acc.num_processes > 1:
            t = torch.tensor(counts, dtype=torch.int64, device=self.acc.device)
            counts = self.acc.reduce(t, reduction="sum").tolist()
        return dict(zip(self.kinds, counts))

    def report(self) -> dict[str, int]:
        """The totals, also logged (main process) when any sample was skipped."""
        totals = self.totals()
        if self.acc.is_main_process and any(totals.values()):
            logger.warning("skipped bad samples: %s (see the warnings above, or `maevit shards check`)",
                           ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in totals.items() if v))
        return totals
