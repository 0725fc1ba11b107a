"""Run directories: layout, metrics log, atomic checkpoints and exact resume.

Shared by pretraining and fine-tuning; nothing here knows about MAE. A run
directory looks like this::

    RUN_DIR/
      config.yaml                  the resolved config (maevit.config.save_config)
      metrics.jsonl                one JSON object per line, each with "step"
      images/                      PNGs written during training
      checkpoints/
        latest                     text: the name of the newest complete checkpoint
        step-00001200/             one complete training state
          model.safetensors        weights of the *prepared* model (Accelerate's
                                   save_state: under DDP the keys start with "module.")
          optimizer.bin            optimizer state (loaded back with weights_only=True)
          scheduler.bin            only if a scheduler was passed to accelerator.prepare
          scaler.pt                fp16 GradScaler, only with fp16
          random_states_<r>.pkl    python / numpy / torch / CUDA RNG of rank r, and
                                   Accelerate's accumulation counter
          generators_<r>.safetensors   extra torch.Generator states of rank r
          trainer_state.json       the caller's counters: step, epoch, batch, ...
        .tmp-step-00001300/        a checkpoint being written; never read
      previous-<time>/             an older run moved aside by ``fresh=True``

Typical use (every rank runs all of it; file writes happen where they must)::

    run, ckpt = open_run(cfg.run.dir, accelerator, cfg, fresh=cfg.run.fresh)
    state = {"step": 0, "epoch": 0, "batch": 0}
    if ckpt is not None:
        state = load_checkpoint(accelerator, ckpt, generators={"mask": gen})
    metrics = MetricsLogger(run.metrics_path, enabled=accelerator.is_main_process,
                            resume_step=state["step"] if ckpt else None)
    ...
    save_checkpoint(accelerator, run, step, state, keep_last=3, generators={"mask": gen})

Why a checkpoint cannot be corrupt: every rank writes into ``.tmp-step-N``;
after a barrier the main process fsyncs the files, renames the directory to
``step-N`` (atomic on POSIX) and only then rewrites ``latest`` (also by
rename). A kill at any moment leaves either the previous complete checkpoint
or the new one. All ranks must see the same file system (multi-node: put the
run directory on shared storage).

Resume is exact only when the caller's own state (data position, counters) is
in ``trainer_state.json`` and its randomness comes from RNGs saved here: the
global RNGs (Accelerate) or generators passed in ``generators``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from maevit.fileio import fsync_tree, write_text_atomic

logger = logging.getLogger(__name__)

CKPT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step of a checkpoint directory named ``step-00001200`` (-> 1200)."""
    name = Path(path).name
    if not name.startswith(CKPT_PREFIX) or not name[len(CKPT_PREFIX):].isdigit():
        raise ValueError(f"{str(path)!r} is not a checkpoint directory (expected a name like step-00001200)")
    return int(name[len(CKPT_PREFIX):])


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """True for a published checkpoint directory (its trainer state is written last)."""
    path = Path(path)
    return path.is_dir() and path.name.startswith(CKPT_PREFIX) and (path / STATE_FILE).is_file()


class RunDir:
    """Paths of one run directory (see the module docstring for the layout).

    Args:
        root: the run directory; created on demand by :func:`open_run`.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.iterdir() if is_complete_checkpoint(p)]
        return sorted(found, key=checkpoint_step)

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint named by ``latest``, else the newest complete one, else None."""
        pointer = self.checkpoints_dir / LATEST_FILE
        if pointer.is_file():
            named = self.checkpoints_dir / pointer.read_text().strip()
            if is_complete_checkpoint(named):
                return named
            logger.warning("%s names %s, which is missing or incomplete; using the newest complete one", pointer, named)
        found = self.checkpoints()
        return found[-1] if found else None

    def move_aside(self) -> Path | None:
        """Move everything of an old run into ``previous-<time>/``; returns it (None if empty)."""
        if not self.root.is_dir():
            return None
        items = [p for p in self.root.iterdir() if not p.name.startswith("previous-")]
        if not items:
            return None
        dest = self.root / time.strftime("previous-%Y%m%d-%H%M%S")
        n = 1
        while dest.exists():  # two fresh starts within one second
            dest = self.root / f"{time.strftime('previous-%Y%m%d-%H%M%S')}-{n}"
            n += 1
        dest.mkdir()
        for item in items:
            item.rename(dest / item.name)
        return dest


def open_run(
    root: str | os.PathLike, accelerator: Any, config: Any = None, *, fresh: bool = False
) -> tuple[RunDir, Path | None]:
    """Create or reopen a run directory on every rank; say what happens.

    Args:
        root: the run directory.
        accelerator: an ``accelerate.Accelerator`` (barriers, main-process writes).
        config: a config dataclass, written to ``config.yaml`` (None: not written).
        fresh: start over. An old run there is moved to ``previous-<time>/``, never deleted.

    Returns:
        ``(run, checkpoint)``: the checkpoint to resume from, or None to start at step 0.
    """
    run = RunDir(root)
    if accelerator.is_main_process:
        if fresh:
            moved = run.move_aside()
            if moved is not None:
                logger.info("run.fresh: moved the previous contents of %s to %s", run.root, moved)
        run.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        run.images_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    ckpt = run.latest_checkpoint()
    if accelerator.is_main_process and config is not None:
        from maevit.config import save_config, to_dict

        if ckpt is not None and run.config_path.is_file():
            import yaml

            changed = _diff(yaml.safe_load(run.config_path.read_text()) or {}, to_dict(config))
            changed = [c for c in changed if not c.startswith("run.fresh:")]
            if changed:
                logger.warning("resuming with a changed config: %s", "; ".join(changed))
        save_config(config, run.config_path)
    if ckpt is not None and accelerator.is_main_process:
        logger.info(
            "resuming from %s (step %d); pass run.fresh=true to start over (the old run is kept)",
            ckpt, checkpoint_step(ckpt),
        )
    return run, ckpt


def _diff(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def save_checkpoint(
    accelerator: Any,
    run: RunDir,
    step: int,
    state: Mapping[str, Any],
    *,
    keep_last: int = 3,
    generators: Mapping[str, torch.Generator] | None = None,
) -> Path:
    """Save the full training state atomically; keep the newest ``keep_last``.

    Call on every rank at an optimizer-step boundary (not in the middle of a
    gradient-accumulation cycle). Model, optimizer, prepared schedulers, scaler
    and per-rank RNGs come from ``accelerator.save_state`` (weights as
    safetensors); ``state`` (JSON-serialisable: step, epoch, batch index,
    counters) and ``generators`` (per rank) are added.

    Args:
        accelerator: the ``Accelerator`` that prepared the model and optimizer.
        run: the run directory.
        step: optimizer steps done; names the checkpoint ``step-%08d``.
        state: the caller's counters, returned by :func:`load_checkpoint`.
        keep_last: complete checkpoints to keep (>= 1); older ones are removed.
        generators: named ``torch.Generator`` objects of this rank to save.

    Returns:
        The published checkpoint directory.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    name = f"{CKPT_PREFIX}{step:08d}"
    final, tmp = run.checkpoints_dir / name, run.checkpoints_dir / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left behind by a killed run
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if generators:
        states = {k: g.get_state() for k, g in generators.items()}  # uint8 tensors
        save_file(states, str(tmp / f"generators_{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = {**dict(state), "step": step, "num_processes": accelerator.num_processes}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1))  # last file: marks completeness
        # Accelerate does not fsync; do it before the rename that publishes the checkpoint (not through
        # atomic_write: every rank writes into it, so its temporary name is the same on all ranks)
        fsync_tree(tmp)
        if final.exists():  # the same step saved twice (e.g. a final save): replace it
            old = run.checkpoints_dir / f".old-{name}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        write_text_atomic(run.checkpoints_dir / LATEST_FILE, name + "\n")
        for stale in run.checkpoints()[:-keep_last]:
            if stale != final:
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    accelerator: Any,
    ckpt: str | os.PathLike,
    *,
    generators: Mapping[str, torch.Generator] | None = None,
) -> dict[str, Any]:
    """Restore a state written by :func:`save_checkpoint`; returns its ``state`` dict.

    Call after ``accelerator.prepare``. Restores model, optimizer, prepared
    schedulers, scaler, Accelerate's accumulation counter, this rank's RNGs and
    ``generators``. With a different number of processes than at save time the
    weights and optimizer still load, but RNG streams cannot continue exactly
    (logged as a warning).

    Raises:
        FileNotFoundError: ``ckpt`` is not a complete checkpoint.
    """
    ckpt = Path(ckpt)
    if not is_complete_checkpoint(ckpt):
        raise FileNotFoundError(
            f"{ckpt} is not a complete checkpoint (no {STATE_FILE}); pass a RUN_DIR/checkpoints/step-* directory"
        )
    state = json.loads((ckpt / STATE_FILE).read_text())
    rank = accelerator.process_index
    saved_procs = state.get("num_processes", accelerator.num_processes)
    if saved_procs != accelerator.num_processes:
        logger.warning(
            "checkpoint %s was written by %d processes, resuming with %d: weights and optimizer load, "
            "but random streams and the data position differ from an uninterrupted run",
            ckpt, saved_procs, accelerator.num_processes,
        )
    accelerator.load_state(str(ckpt))  # loads with weights_only=True (Accelerate's `load`)
    gen_file = ckpt / f"generators_{rank}.safetensors"
    if generators:
        if gen_file.is_file():
            saved = load_file(str(gen_file))
            for key, gen in generators.items():
                if key in saved:
                    gen.set_state(saved[key])
                else:
                    logger.warning("checkpoint %s has no generator %r; it keeps its seeded state", ckpt, key)
        else:
            logger.warning("checkpoint %s has no generator states for rank %d", ckpt, rank)
    return state


class MetricsLogger:
    """Append-only ``metrics.jsonl``: one JSON object per call, with ``step`` first.

    Only the main process writes (``enabled``). On resume, lines after
    ``resume_step`` (steps that will be run again) and a torn last line from a
    killed run are dropped, so the file reads as one uninterrupted run.

    Args:
        path: the ``metrics.jsonl`` file.
        enabled: False on non-main processes (then every call is a no-op).
        resume_step: the step of the checkpoint being resumed; None for a new run.
    """

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._file = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a kill loses at most one line

    def log(self, step: int, **metrics: Any) -> None:
        """Write ``{"step": step, **metrics}``; tensors and numpy scalars become numbers."""
        if self._file is None:
            return
        row = {"step": int(step)}
        for key, value in metrics.items():
            row[key] = value.item() if hasattr(value, "item") else value
        self._file.write(json.dumps(row) + "\n")

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
