"""Run directories: the layout, atomic checkpoints and exact resume; the only owner of the layout.

Shared by every command on the training loop (:mod:`maevit.train.engine`); nothing
here knows about MAE. The names live in :mod:`maevit.runlayout` (so that
``maevit.models`` can find weights in a run directory without importing this
package); the paths are built here (:class:`RunDir`). What a run records as it
goes (``metrics.jsonl``, skipped samples) is :mod:`maevit.train.metrics`. A run
directory looks like this::

    RUN_DIR/
      .lock                        held by the process writing the run (maevit.dirlock)
      config.yaml                  the resolved config (maevit.config.save_config)
      metrics.jsonl                one JSON object per line, each with "step"
      curves.png                   training curves (maevit.train.curves)
      images/                      PNGs written during training
      encoder.safetensors          what the command exports: pretrain; classifier.safetensors
                                   (+ classifier_ema.safetensors) finetune; probe_head.safetensors probe
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
          trainer_state.json       the caller's counters: step, epoch, batch, ...; written
                                   last, with the name, size and SHA-256 of every other file
        ema-00001200.safetensors   EMA weights beside that checkpoint (fine-tuning with run.ema)
        .tmp-step-00001300/        a checkpoint being written; never read
        .trash-step-00001000/      a checkpoint being deleted; never read
        damaged-step-00001100/     a checkpoint whose files no longer match their digests,
                                   moved aside (never deleted) when a run resumed past it
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
rename). Old checkpoints are pruned the same way in reverse: renamed to
``.trash-step-N`` first (one atomic rename), then deleted. A kill at any moment
therefore leaves either the previous complete checkpoint or the new one, and
leftovers under hidden names are removed by the next :func:`open_run`. A
checkpoint is *complete* when ``trainer_state.json`` is there and every file it
lists is there (:func:`is_complete_checkpoint`); nothing else is listed. Before a
resume its files are checked by content (:func:`checkpoint_problem`: size and
SHA-256 recorded at save time): :func:`open_run` resumes from the newest
checkpoint that passes, moves newer damaged ones aside to ``damaged-step-N``
with a warning naming the file, and stops with :class:`ResumeError` (changing
nothing) when no checkpoint passes. All ranks must see the same file system
(multi-node: put the run directory on shared storage).

One process at a time: :func:`open_run` takes ``RUN_DIR/.lock`` on the main
process and every rank stops with :class:`RunLockedError` (naming the holder)
when another live process has it. A full disk while checkpointing raises
:class:`DiskFullError` (where, how much is free and needed), after removing the
partial checkpoint; the previous one stays intact. A checkpoint file that safe
loading refuses stops the resume with :class:`ResumeError`; a refused or
missing RNG state is loaded around with a warning that the resume is not exact.

Resume is exact only when the caller's own state (data position, counters) is
in ``trainer_state.json`` and its randomness comes from RNGs saved here: the
global RNGs (Accelerate) or generators passed in ``generators``.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from maevit.config import ConfigError, to_dict
from maevit.dirlock import DirLockedError, lock_dir, unlock_dir
from maevit.fileio import fsync_tree, write_text_atomic
from maevit.runlayout import (  # the names; this module builds the paths (re-exported: runs.CKPT_PREFIX, ...)
    CHECKPOINTS_DIR, CKPT_PREFIX, CLASSIFIER_EMA_FILE, CLASSIFIER_FILE, CONFIG_FILE, CURVES_FILE, EMA_PREFIX,
    DAMAGED_PREFIX, ENCODER_FILE, IMAGES_DIR, LATEST_FILE, METRICS_FILE, PROBE_HEAD_FILE, STATE_FILE, TMP_PREFIX,
    TRASH_PREFIX,
)
from maevit.train.metrics import MetricsLogger, SkipTally, read_metrics  # noqa: F401  (also here: runs.MetricsLogger)

logger = logging.getLogger(__name__)

_LEFTOVER_PREFIXES = (TMP_PREFIX, TRASH_PREFIX, ".old-")  # hidden names of killed saves / prunes


class RunError(RuntimeError):
    """A run directory problem with a one-paragraph message (CLIs print it, no traceback)."""


class RunLockedError(RunError):
    """Another live process is writing the run directory."""


class DiskFullError(RunError):
    """A checkpoint could not be written because its file system is full."""


class ResumeError(RunError):
    """A checkpoint cannot be resumed from (a file was refused or does not fit the model)."""


def run_root_of(path: str | os.PathLike) -> Path | None:
    """The run directory that holds ``path`` (the run itself, an exported file at its top, a
    checkpoint directory or a file in one), found by its ``config.yaml``; None for files outside runs."""
    path = Path(path)
    start = path if path.is_dir() else path.parent
    for folder in (start, start.parent, start.parent.parent):
        if RunDir(folder).config_path.is_file():
            return folder
    return None


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step of a checkpoint directory named ``step-00001200`` (-> 1200)."""
    name = Path(path).name
    if not name.startswith(CKPT_PREFIX) or not name[len(CKPT_PREFIX):].isdigit():
        raise ValueError(f"{str(path)!r} is not a checkpoint directory (expected a name like step-00001200)")
    return int(name[len(CKPT_PREFIX):])


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """True for a published checkpoint directory: ``trainer_state.json`` (written last) is
    readable and every file it lists is there (checkpoints written before the list existed:
    the trainer state alone). Whether the files still have their sizes is checked on resume."""
    path = Path(path)
    if not (path.is_dir() and path.name.startswith(CKPT_PREFIX)):
        return False
    try:
        files = json.loads((path / STATE_FILE).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return False
    return files is None or all((path / name).is_file() for name in files)


def _file_sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_digests(root: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"}}`` of every file under ``root`` (written with a checkpoint)."""
    return {str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(root.rglob("*")) if p.is_file()}


def checkpoint_problem(path: str | os.PathLike, *, digests: bool = True) -> str | None:
    """What is wrong with checkpoint ``path`` by content, or None when every file it lists is there with
    the size and SHA-256 recorded when it was written (older checkpoints recorded sizes only;
    ``digests=False``: sizes only)."""
    path = Path(path)
    try:
        files = json.loads((path / STATE_FILE).read_text()).get("files")
    except (OSError, ValueError, AttributeError) as exn:
        return f"{STATE_FILE} cannot be read ({type(exn).__name__})"
    for name, rec in (files or {}).items():
        f = path / name
        size, digest = (rec.get("size"), rec.get("sha256")) if isinstance(rec, dict) else (rec, None)
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, but {size} were written"
        if digests and digest is not None and _sha256(f) != digest:
            return f"{name} has the size it was written with but not the content (its SHA-256 differs)"
    return None


def _remove_dir(path: Path) -> None:
    """Delete a directory so that no reader ever sees it half-deleted: one atomic rename to a
    hidden ``.trash-`` name first (``checkpoints()`` no longer lists it), then the deletion."""
    trash = path.with_name(TRASH_PREFIX + path.name)
    shutil.rmtree(trash, ignore_errors=True)  # left by a kill during an earlier prune
    path.rename(trash)
    shutil.rmtree(trash)


class RunDir:
    """Paths of one run directory (see the module docstring for the layout).

    Args:
        root: the run directory; created on demand by :func:`open_run`.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def images_dir(self) -> Path:
        return self.root / IMAGES_DIR

    @property
    def curves_path(self) -> Path:
        return self.root / CURVES_FILE

    @property
    def encoder_path(self) -> Path:
        """What ``maevit pretrain`` exports."""
        return self.root / ENCODER_FILE

    @property
    def classifier_path(self) -> Path:
        """What ``maevit finetune`` exports (and ``classifier_ema_path`` with ``run.ema``)."""
        return self.root / CLASSIFIER_FILE

    @property
    def classifier_ema_path(self) -> Path:
        return self.root / CLASSIFIER_EMA_FILE

    @property
    def probe_head_path(self) -> Path:
        """What ``maevit probe`` exports."""
        return self.root / PROBE_HEAD_FILE

    def checkpoint_path(self, step: int) -> Path:
        """Where the checkpoint of ``step`` is published: ``checkpoints/step-%08d``."""
        return self.checkpoints_dir / f"{CKPT_PREFIX}{step:08d}"

    def damaged_path(self, step: int) -> Path:
        """Where the checkpoint of ``step`` goes when it is set aside (damaged, or suspected of divergence)."""
        return self.checkpoints_dir / f"{DAMAGED_PREFIX}{CKPT_PREFIX}{step:08d}"

    def ema_path(self, step: int) -> Path:
        """EMA weights saved beside the checkpoint of ``step``: ``checkpoints/ema-%08d.safetensors``."""
        return self.checkpoints_dir / f"{EMA_PREFIX}{step:08d}.safetensors"

    def prune_beside_checkpoints(self) -> None:
        """Delete files kept beside checkpoints (EMA weights) whose checkpoint was removed."""
        kept = {checkpoint_step(p) for p in self.checkpoints()}
        for p in self.checkpoints_dir.glob(f"{EMA_PREFIX}*.safetensors"):
            if int(p.stem[len(EMA_PREFIX):]) not in kept:
                p.unlink()

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
            found = self.checkpoints()
            if found:
                logger.warning("%s names %s, which is missing or incomplete; using the newest complete one, %s",
                               pointer, named.name, found[-1].name)
            return found[-1] if found else None
        found = self.checkpoints()
        return found[-1] if found else None

    def newest_good_checkpoint(self) -> tuple[Path | None, list[tuple[Path, str]]]:
        """``(the newest checkpoint that passes checkpoint_problem, [(newer damaged one, problem)])``.

        Every ``step-*`` folder counts, complete or not: one that lost a listed file is damaged,
        not absent. Older checkpoints than the good one are not read (their digests are checked
        when they are resumed from)."""
        if not self.checkpoints_dir.is_dir():
            return None, []
        found = []
        for p in self.checkpoints_dir.iterdir():
            try:
                found.append((checkpoint_step(p), p))
            except ValueError:
                continue
        damaged = []
        for _, p in sorted(found, reverse=True):
            problem = checkpoint_problem(p)
            if problem is None:
                return p, damaged
            damaged.append((p, problem))
        return None, damaged

    def set_aside_suspect(self, ckpt: Path, back_to: Path | None) -> Path:
        """Rename checkpoint ``ckpt`` (written just before a divergence showed) to ``damaged-step-N``, never
        deleting it, and point ``latest`` at ``back_to`` (the newest healthy one), so a resume starts there."""
        dest = ckpt.with_name(DAMAGED_PREFIX + ckpt.name)
        n = 1
        while dest.exists():
            dest, n = ckpt.with_name(f"{DAMAGED_PREFIX}{ckpt.name}-{n}"), n + 1
        ckpt.rename(dest)
        if back_to is not None:
            write_text_atomic(self.checkpoints_dir / LATEST_FILE, back_to.name + "\n")
        else:
            (self.checkpoints_dir / LATEST_FILE).unlink(missing_ok=True)
        return dest

    def remove_leftovers(self) -> None:
        """Delete what killed saves and prunes left under hidden names (``.tmp-``, ``.trash-``), and
        the temporary files of atomic writes a kill interrupted (``NAME.tmp-<pid>``)."""
        for folder in (self.checkpoints_dir, self.root):
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                if p.name.startswith(_LEFTOVER_PREFIXES) and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif ".tmp-" in p.name and p.is_file():
                    p.unlink(missing_ok=True)

    def unlock(self) -> None:
        """Release this process's lock of the run directory (taken by :func:`open_run`)."""
        unlock_dir(self.root)

    def move_aside(self) -> Path | None:
        """Move everything of an old run into ``previous-<time>/``; returns it (None if empty)."""
        if not self.root.is_dir():
            return None
        items = [p for p in self.root.iterdir() if not p.name.startswith("previous-") and p.name != ".lock"]
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

    Raises:
        RunLockedError: another live process is writing this run directory (on every rank).
    """
    run = RunDir(root)
    if run.root.exists() and not run.root.is_dir():
        raise RunError(f"run.dir={run.root} is a file, not a folder: a run directory holds the config, metrics, "
                       f"checkpoints and weights of a run. Pass another run.dir (e.g. run.dir={run.root}-run), or "
                       f"move that file.")
    _lock(run, accelerator)
    chosen, message = None, None
    if accelerator.is_main_process:
        if fresh:
            moved = run.move_aside()
            if moved is not None:
                logger.info("run.fresh: moved the previous contents of %s to %s", run.root, moved)
        run.remove_leftovers()
        chosen, damaged = run.newest_good_checkpoint()
        if damaged and chosen is None:
            message = _no_good_checkpoint(run, damaged)
        else:
            _move_damaged_aside(damaged, chosen)
            run.checkpoints_dir.mkdir(parents=True, exist_ok=True)
            run.images_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.num_processes > 1:  # every rank resumes the checkpoint the main process verified
        from accelerate.utils import broadcast_object_list

        chosen, message = broadcast_object_list([chosen, message], from_process=0)
    if message is not None:
        run.unlock()
        raise ResumeError(message)
    accelerator.wait_for_everyone()
    ckpt = chosen
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


def check_resumable(run_dir: str | os.PathLike, model: torch.nn.Module, cfg: Any, fresh: bool) -> None:
    """Refuse, before anything in RUN_DIR changes, to resume a checkpoint of another architecture.

    A changed ``model.img_size`` (or size) would otherwise rewrite ``config.yaml``
    and then fail while loading the weights. Compared: the checkpoint's weight
    shapes (safetensors header only) with ``model``'s; explained with the config
    keys that changed.

    Raises:
        ConfigError: shapes differ; the message says how to resume or start over.
    """
    run = RunDir(run_dir)
    ckpt = None if fresh else run.latest_checkpoint()
    weights = None if ckpt is None else ckpt / "model.safetensors"
    if weights is None or not weights.is_file():  # nothing to resume, or sharded (FSDP / DeepSpeed) states
        return
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            saved = {k.removeprefix("module."): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # a damaged file: loading the checkpoint says so, naming the file
        return
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    diff = [f"{k} {list(saved[k])} -> {list(own[k])}" for k in own if k in saved and saved[k] != own[k]]
    diff += [f"{k} is new" for k in own if k not in saved] + [f"{k} is gone" for k in saved if k not in own]
    if not diff:
        return
    changed = []
    if run.config_path.is_file():
        import yaml

        old = (yaml.safe_load(run.config_path.read_text()) or {}).get("model") or {}
        new = to_dict(cfg).get("model") or {}
        changed = [f"model.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                   if old.get(k) != new.get(k)]
    why = "; ".join(changed) or "; ".join(diff[:3]) + (f" (+{len(diff) - 3} more)" if len(diff) > 3 else "")
    raise ConfigError(
        f"{run.root} holds a checkpoint ({ckpt.name}) of another architecture ({why}), so this command cannot "
        f"resume it. To resume, run it with the run's own model settings ({run.config_path}); to start over, add "
        "run.fresh=true (the old run is moved aside, not deleted); or pick another run.dir. Nothing in the run "
        "directory was changed."
    )


def _no_good_checkpoint(run: RunDir, damaged: list[tuple[Path, str]]) -> str:
    listed = "; ".join(f"{p.name}: {problem}" for p, problem in damaged[:5])
    more = f" (and {len(damaged) - 5} more)" if len(damaged) > 5 else ""
    return (f"cannot resume {run.root}: no checkpoint passes its content check ({listed}{more}). Nothing was "
            f"loaded, changed or deleted: the damaged checkpoints and the metrics are kept as evidence (model "
            f"weights in a checkpoint whose optimizer state is damaged may still be intact). To start over, pass "
            f"run.fresh=true (the old run is moved to {run.root}/previous-<time>/, not deleted), or move "
            f"{run.checkpoints_dir} aside yourself; restore a good copy of the named file to resume.")


def _move_damaged_aside(damaged: list[tuple[Path, str]], chosen: Path | None) -> None:
    """Rename damaged checkpoints newer than the one resumed to ``damaged-step-N`` (they would be
    overwritten when the run reaches their step, and their intact files may still be wanted)."""
    for path, problem in damaged:
        dest = path.with_name(DAMAGED_PREFIX + path.name)
        n = 1
        while dest.exists():
            dest, n = path.with_name(f"{DAMAGED_PREFIX}{path.name}-{n}"), n + 1
        path.rename(dest)
        logger.warning("checkpoint %s is damaged (%s): moved aside to %s; resuming from %s", path, problem, dest.name,
                       chosen.name if chosen is not None else "the start")


def _lock(run: RunDir, accelerator: Any) -> None:
    """Main process: take ``RUN_DIR/.lock``; every rank learns the outcome (so none waits at a
    barrier for a main process that stopped) and raises the same :class:`RunLockedError`."""
    message = None
    if accelerator.is_main_process:
        try:
            lock_dir(run.root, purpose="run directory", advice=(
                "Two runs writing one directory would mix their metrics and overwrite each other's "
                "checkpoints. Wait for that run to finish (or stop it), or pass another run.dir=...; "
                "a run that was killed holds no lock, so running the same command again resumes it."))
        except DirLockedError as exn:
            message = str(exn)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([message], from_process=0)[0]
    if message is not None:
        raise RunLockedError(message)


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
    protect: Path | None = None,
) -> Path:
    """Save the full training state atomically; keep the newest ``keep_last`` (and ``protect``).

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

    Raises:
        DiskFullError: the file system filled up; the partial checkpoint is removed and the
            previous one is intact (resume from it once there is room).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    name = f"{CKPT_PREFIX}{step:08d}"
    final, tmp = run.checkpoints_dir / name, run.checkpoints_dir / f"{TMP_PREFIX}{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left behind by a killed run
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(str(tmp))
        if generators:
            states = {k: g.get_state() for k, g in generators.items()}  # uint8 tensors
            save_file(states, str(tmp / f"generators_{accelerator.process_index}.safetensors"))
    except Exception as exn:  # caught on every rank, so that no rank waits for a failed one
        error = exn
    if _any_rank(accelerator, error is not None):
        _failed_save(accelerator, run, tmp, name, error)
    if accelerator.is_main_process:
        try:
            meta = {**dict(state), "step": step, "num_processes": accelerator.num_processes,
                    "files": _file_digests(tmp)}
            (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1))  # last file: marks completeness
            # Accelerate does not fsync; do it before the rename that publishes the checkpoint (not through
            # atomic_write: every rank writes into it, so its temporary name is the same on all ranks)
            fsync_tree(tmp)
        except Exception as exn:
            _failed_save(accelerator, run, tmp, name, exn)
        if final.exists():  # the same step saved twice (e.g. a final save): replace it
            old = run.checkpoints_dir / f"{TRASH_PREFIX}{name}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        write_text_atomic(run.checkpoints_dir / LATEST_FILE, name + "\n")
        prune_checkpoints(run, keep_last, keep=(final, protect))
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(run: RunDir, keep_last: int, keep: tuple[Path | None, ...] = ()) -> None:
    """Remove all but the newest ``keep_last`` complete checkpoints, and never one in ``keep`` (the one
    just written, the newest known to be healthy). Main process only."""
    for stale in run.checkpoints()[:-keep_last]:
        if stale not in keep:
            _remove_dir(stale)


def _any_rank(accelerator: Any, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor(float(flag), device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def _exc_chain(exn: BaseException | None):
    while exn is not None:
        yield exn
        exn = exn.__cause__ or exn.__context__


def _human(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _checkpoint_bytes(accelerator: Any, run: RunDir) -> int:
    """Size of the newest complete checkpoint, else an estimate: the weights plus the optimizer
    state (AdamW: two tensors per weight) of this process."""
    done = run.checkpoints()
    if done:
        return sum(_file_sizes(done[-1]).values())
    params = sum(p.numel() * p.element_size() for m in getattr(accelerator, "_models", []) for p in m.parameters())
    return 3 * params


def _failed_save(accelerator: Any, run: RunDir, tmp: Path, name: str, error: BaseException | None) -> None:
    """Remove the partial checkpoint and raise: DiskFullError when the disk is full (torch and
    safetensors often hide the errno behind "file write failed" / "iostream error", so the free
    space is asked as well), else the error itself, or a RunError on ranks that did not fail."""
    where = run.checkpoints_dir

    def free_space() -> int | None:
        try:
            return shutil.disk_usage(where).free
        except OSError:
            return None

    need, free = _checkpoint_bytes(accelerator, run), free_space()
    full = any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in _exc_chain(error))
    full = full or any(t in str(e) for e in _exc_chain(error)
                       for t in ("No space left", "os error 28", "Disk quota exceeded"))
    full = full or (error is not None and free is not None and free < need)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        free = free_space()  # what there is now, without the partial checkpoint
    if error is None:
        raise RunError(f"checkpoint {name} was not written: another process failed to write its part "
                       f"(its message says why); the previous checkpoint is intact.")
    if not full:
        raise error
    previous = run.latest_checkpoint()
    kept = (f"the last complete one, {previous.name}, is intact" if previous is not None
            else "there is no earlier checkpoint")
    raise DiskFullError(
        f"the disk is full: checkpoint {name} could not be written to {where} "
        f"({type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else error!r}). "
        f"That file system has {_human(free) if free is not None else 'an unknown amount'} free; a checkpoint "
        f"of this run needs about {_human(need)}, and a new one is written before the oldest is removed. "
        f"The partial checkpoint was removed; {kept}. Free some space (or lower run.keep_last, or move "
        f"run.dir to a larger disk), then run the same command again to resume."
    ) from error


def load_checkpoint(
    accelerator: Any,
    ckpt: str | os.PathLike,
    *,
    generators: Mapping[str, torch.Generator] | None = None,
    verified: bool = False,
) -> dict[str, Any]:
    """Restore a state written by :func:`save_checkpoint`; returns its ``state`` dict.

    ``verified``: :func:`open_run` chose ``ckpt`` after checking its digests, so only sizes are checked
    again (hashing a large checkpoint twice per resume buys nothing).

    Call after ``accelerator.prepare``. Restores model, optimizer, prepared
    schedulers, scaler, Accelerate's accumulation counter, this rank's RNGs and
    ``generators``. With a different number of processes than at save time the
    weights and optimizer still load (the loop keeps the effective batch and maps the
    data position: :mod:`maevit.train.elastic`), but RNG streams cannot continue exactly.

    Files are loaded without running code (safetensors, ``torch.load(weights_only=True)``).
    A refused or missing RNG state of this rank is not fatal: weights, optimizer and data
    position still load, and a warning says that the run's randomness now differs from an
    uninterrupted run (``state["exact_resume"]`` is False, and stays so in later checkpoints).

    Raises:
        FileNotFoundError: ``ckpt`` is not a complete checkpoint.
        ResumeError: a file was refused by safe loading, or does not fit the prepared objects.
    """
    ckpt = Path(ckpt)
    if not is_complete_checkpoint(ckpt):
        raise FileNotFoundError(
            f"{ckpt} is not a complete checkpoint (no {STATE_FILE}); pass a RUN_DIR/checkpoints/step-* directory"
        )
    problem = checkpoint_problem(ckpt, digests=not verified)
    if problem is not None:
        raise ResumeError(
            f"cannot resume from {ckpt}: {problem}: it was modified or damaged since. Nothing was loaded. "
            f"Move this checkpoint aside (e.g. rename it to {DAMAGED_PREFIX}{ckpt.name}) to resume from an older "
            f"one, or restore a good copy of the file.")
    state = json.loads((ckpt / STATE_FILE).read_text())
    state.pop("files", None)
    rank = accelerator.process_index  # (another number of processes: maevit.train.elastic keeps the run the same)
    rng_problem = _check_rng_state(ckpt / f"random_states_{rank}.pkl")
    try:
        accelerator.load_state(str(ckpt))  # loads with weights_only=True (Accelerate's `load`)
    except Exception as exn:
        raise ResumeError(_resume_failure(ckpt, exn)) from exn
    if rng_problem is not None:
        state["exact_resume"] = False
        logger.warning(
            "checkpoint %s: the RNG state of rank %d (random_states_%d.pkl) %s, so the Python / NumPy / torch "
            "random generators are NOT restored. Weights, optimizer and data position are; the run goes on, but "
            "its randomness differs from an uninterrupted run: this is not an exact resume.",
            ckpt, rank, rank, rng_problem,
        )
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


def _safe_load(path: Path) -> Any:
    from accelerate.utils import load  # torch.load(weights_only=True) + the numpy types RNG states need

    return load(path, map_location="cpu")


def _check_rng_state(path: Path) -> str | None:
    """Why Accelerate would skip this RNG state file (it does so silently), or None."""
    if not path.is_file():
        return "is missing"
    try:
        states = _safe_load(path)
    except Exception as exn:
        return f"was refused by safe loading ({type(exn).__name__}: {str(exn).strip().splitlines()[0][:160]})"
    missing = [k for k in ("random_state", "numpy_random_seed", "torch_manual_seed")
               if not isinstance(states, dict) or k not in states]
    return f"lacks {', '.join(missing)}" if missing else None


def _resume_failure(ckpt: Path, exn: BaseException) -> str:
    """One paragraph for a failed ``load_state``: the refused file by name when there is one."""
    import pickle

    for f in sorted(ckpt.iterdir()):  # (RNG states are checked apart: Accelerate skips them when refused)
        if f.suffix in (".bin", ".pt", ".pkl") and f.is_file() and not f.name.startswith("random_states_"):
            try:
                _safe_load(f)
            except Exception as refused:
                if isinstance(refused, pickle.UnpicklingError):
                    return (f"cannot resume from {ckpt}: {f.name} was refused by safe loading: it holds more than "
                            f"plain tensors and numbers ({str(refused).strip().splitlines()[-1][:200]}). Nothing in "
                            f"it was run. It was modified or written by other software: move this checkpoint aside "
                            f"(rename it to {DAMAGED_PREFIX}{ckpt.name}) to resume from an older one, or pass "
                            f"run.fresh=true to start over (the old run is kept).")
                return (f"cannot resume from {ckpt}: {f.name} cannot be read ({type(refused).__name__}: "
                        f"{str(refused).strip()[:200]}). Move this checkpoint aside (rename it to "
                        f"{DAMAGED_PREFIX}{ckpt.name}) to resume from an older one, or pass run.fresh=true to "
                        f"start over (the old run is kept).")
    return (f"cannot resume from {ckpt}: {type(exn).__name__}: {str(exn).strip()[:300]}. If the model or "
            f"optimizer settings changed since it was written, pass run.fresh=true to start over (the old run "
            f"is kept), or go back to the settings in {ckpt.parent.parent / 'config.yaml'}.")
