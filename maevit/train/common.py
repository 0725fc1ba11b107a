"""What pretraining and fine-tuning share: config sections, the accelerator, the
schedule, the optimizer step with its non-finite guard, progress, and the
command-line plumbing.

The two loops differ only in what a step computes; everything around it lives
here once, so they cannot drift apart.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from maevit.config import ConfigError, format_config_keys, load_config, to_dict
from maevit.train.optim import cosine_lr, scaled_lr, set_lr

logger = logging.getLogger("maevit")

IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)
Precision = Literal["auto", "fp32", "bf16", "fp16"]


# ----------------------------------------------------------------------------- config sections


@dataclass
class RunBase:
    """Run-directory fields every training command has (pretrain / finetune extend it)."""

    dir: str = "runs/run"  # run directory: config, metrics, checkpoints, images, weights
    seed: int = 0
    precision: Precision = "auto"  # auto: bf16 where native and faster (GPUs; CPUs with bf16 units), else fp32
    log_every: int = 50  # optimizer steps between metric rows (the only host syncs)
    keep_last: int = 2  # checkpoints kept
    max_nonfinite: int = 10  # stop after this many non-finite steps in a row
    fresh: bool = False  # start over even if RUN_DIR has a checkpoint (old run moved aside)
    progress: bool = True  # tqdm progress bar on the main process

    def validate(self) -> None:
        for key in ("log_every", "keep_last", "max_nonfinite"):
            if getattr(self, key) < 1:
                raise ConfigError(f"run.{key} must be >= 1, got {getattr(self, key)}")


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class TrainingInterrupted(Exception):
    """Ctrl-C stopped training at an optimizer-step boundary, after a checkpoint was written.

    Attributes:
        step: the step the checkpoint holds.
        checkpoint: its directory.
    """

    def __init__(self, step: int, checkpoint: str | os.PathLike) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, str(checkpoint)


# ----------------------------------------------------------------------------- accelerator


def resolve_run_precision(run: Any, speed_check: Any = None) -> str:
    """``run.precision`` for this device: ``auto`` becomes bf16 or fp32 (logged with the reason; a resumed
    run keeps its recorded choice; rank 0 decides for all). See :func:`maevit.train.throughput.resolve_precision`."""
    from maevit.train.throughput import resolve_precision

    choice = resolve_precision(run.precision, run.dir, fresh=run.fresh, speed_check=speed_check)
    if run.precision == "auto":
        logger.info("precision auto -> %s", choice)
    return choice.precision


def make_accelerator(precision: str, accum_steps: int = 1, run_dir: str | os.PathLike | None = None):
    """An ``Accelerator`` for one run: precision (resolved: fp32 / bf16 / fp16), accumulation,
    TensorBoard under ``run_dir`` when available."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import is_tensorboard_available

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    earlier = AcceleratorState._shared_state.get("_mixed_precision")
    if earlier is not None and earlier != mixed:  # an earlier run in this process (maevit demo, a notebook)
        AcceleratorState._reset_state()  # the process group (PartialState) stays
    return Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=accum_steps,
        log_with="tensorboard" if run_dir is not None and is_tensorboard_available() else None,
        project_dir=None if run_dir is None else str(run_dir),
    )


def start_trackers(acc, cfg: Any) -> None:
    """TensorBoard under RUN_DIR/tensorboard, once ``open_run`` has set RUN_DIR up (``run.fresh``
    moves an old run aside, and a writer opened before that would follow it)."""
    if acc.log_with:
        flat = {f"{s}.{k}": str(v) if isinstance(v, (list, tuple, dict)) or v is None else v
                for s, sec in to_dict(cfg).items() if isinstance(sec, dict) for k, v in sec.items()}
        acc.init_trackers("tensorboard", config=flat)


# ----------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Schedule:
    """Optimizer-step schedule: linear warm-up, then per-step cosine decay.

    Attributes:
        steps_per_epoch: optimizer steps per epoch (a ragged tail of micro-batches is skipped).
        total_steps: the cosine ends here (``epochs x steps_per_epoch``).
        last_step: where the run stops (``optim.max_steps`` may stop it early).
        warmup_steps: linear warm-up length.
        peak_lr: ``base_lr x effective batch / 256``.
        min_lr: the final learning rate.
    """

    steps_per_epoch: int
    total_steps: int
    last_step: int
    warmup_steps: int
    peak_lr: float
    min_lr: float

    def lr(self, step: int) -> float:
        return cosine_lr(step, base_lr=self.peak_lr, warmup_steps=self.warmup_steps,
                         total_steps=self.total_steps, min_lr=self.min_lr)


def plan_schedule(
    *,
    epochs: int,
    batches_per_epoch: int,
    accum_steps: int,
    warmup_epochs: float,
    base_lr: float,
    effective_batch: int,
    min_lr: float = 0.0,
    max_steps: int | None = None,
) -> Schedule:
    """The schedule of a run, made sensible for short runs, with a warning when it cannot peak.

    A warm-up at least as long as the whole schedule (``optim.epochs=2`` with the
    recipe's 40 warm-up epochs) would train at a tiny lr and never reach the peak:
    it is clipped to a tenth of the schedule, with a warning. A run that
    ``optim.max_steps`` stops inside the warm-up is warned about too.

    Raises:
        ConfigError: fewer batches per epoch than accumulation steps.
    """
    steps_per_epoch = batches_per_epoch // accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(
            f"{batches_per_epoch} batches per epoch per process is less than optim.accum_steps={accum_steps}: "
            "lower data.batch_size or optim.accum_steps"
        )
    total = epochs * steps_per_epoch
    last = min(total, max_steps or total)
    warmup = clip_warmup(round(warmup_epochs * steps_per_epoch), total, warmup_epochs, epochs)
    peak = scaled_lr(base_lr, effective_batch)
    if last < warmup:
        logger.warning("the run stops at step %d (optim.max_steps), inside the %d-step warm-up: the lr peaks at "
                       "%.3g, not %.3g; shorten optim.warmup_epochs or raise optim.max_steps",
                       last, warmup, peak * last / max(1, warmup), peak)
    return Schedule(steps_per_epoch, total, last, warmup, peak, min_lr)


def clip_warmup(warmup_steps: int, total_steps: int, warmup_epochs: float, epochs: int) -> int:
    """A warm-up at least as long as the schedule, clipped to a tenth of it (with a warning)."""
    if warmup_steps >= total_steps and total_steps > 1:
        clipped = max(1, total_steps // 10)
        logger.warning("optim.warmup_epochs=%g is as long as the whole schedule (optim.epochs=%d, %d steps): warm-up "
                       "clipped to %d steps (a tenth), so the lr reaches its peak", warmup_epochs, epochs,
                       total_steps, clipped)
        return clipped
    return warmup_steps


# ----------------------------------------------------------------------------- the optimizer step


class StepGuard:
    """The optimizer step with the non-finite guard, and the loss / skip counters, all on the device.

    A step whose gradient norm is not finite (the same on every rank: gradients
    are all-reduced first) is skipped *on the device* by the fused AdamW kernel
    (``found_inf``), so no step waits for the host. Counters are read only by
    :meth:`read`, every ``run.log_every`` steps.

    Args:
        device: where the counters live.
        nonfinite_so_far: skipped steps before a resume.
    """

    def __init__(self, device: torch.device, nonfinite_so_far: int = 0) -> None:
        zero = lambda: torch.zeros((), device=device)  # noqa: E731
        self.loss_sum, self.loss_n, self.bad_run, self.max_bad_run = zero(), zero(), zero(), zero()
        self.bad_total = zero() + nonfinite_so_far

    def add_loss(self, loss: torch.Tensor) -> None:
        """Count a micro-batch loss (non-finite ones are left out of the mean)."""
        finite = torch.isfinite(loss.detach())
        self.loss_sum += torch.where(finite, loss.detach().float(), 0.0)
        self.loss_n += finite

    def step(self, acc, optimizer, params: list[torch.Tensor], lr: float, clip_grad: float | None) -> None:
        """Inside ``acc.accumulate``: on a syncing micro-batch set the lr, clip, guard; then step and zero."""
        if acc.sync_gradients:
            set_lr(optimizer, lr)
            grad_norm = acc.clip_grad_norm_(params, clip_grad or math.inf)
            bad = ~torch.isfinite(grad_norm)
            optimizer.optimizer.found_inf = bad.float()  # fused AdamW skips the update on the device
            self.bad_run = (self.bad_run + 1) * bad
            self.max_bad_run = torch.maximum(self.max_bad_run, self.bad_run)
            self.bad_total = self.bad_total + bad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def read(self, acc, max_nonfinite: int, advice: str) -> dict[str, float]:
        """Mean loss over all ranks since the last read and the skip count (a host sync).

        Raises:
            NonFiniteLossError: ``max_nonfinite`` steps in a row were skipped.
        """
        totals = acc.reduce(torch.stack([self.loss_sum, self.loss_n]), reduction="sum").tolist()
        out = {"loss": totals[0] / totals[1] if totals[1] else float("nan"),
               "nonfinite_steps": int(self.bad_total.item())}
        run = int(self.max_bad_run.item())
        self.loss_sum.zero_(), self.loss_n.zero_(), self.max_bad_run.zero_()
        if run >= max_nonfinite:
            raise NonFiniteLossError(
                f"{run} optimizer steps in a row had a non-finite loss or gradient (run.max_nonfinite="
                f"{max_nonfinite}); those steps were skipped, the weights are unchanged. {advice}"
            )
        return out


def resolve_num_workers(configured: int | None) -> int:
    """``data.num_workers``; None (the default) picks ``min(4, CPUs per process - 1)`` and says so."""
    if configured is not None:
        return configured
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    n = max(0, min(4, per_process - 1))
    logger.info("data.num_workers: %d loader worker(s) per process (auto, %d CPU(s) here)", n, cpus)
    return n


def describe_data(loader, batch_size: int, num_processes: int, label_fraction: float | None = None,
                  label_seed: int = 0) -> str:
    """One line on what an epoch of training data is: samples, batches, and what is left out."""
    n, per_epoch = loader.num_samples, len(loader) * batch_size * num_processes
    what = f"{n} samples"
    if label_fraction is not None and label_fraction < 1:
        what = (f"{n} labeled samples (data.label_fraction={label_fraction:g}: a class-balanced subset fixed by "
                f"data.label_seed={label_seed})")
    left = n - per_epoch
    tail = (f"; the {left} that do not fill a batch are left out of each epoch (different ones each epoch)"
            if left > 0 else "")
    return f"training data: {what}, {len(loader)} batches of {batch_size} per process per epoch{tail}"


def labeled_for_rank(source: str, acc, *, img_size: int, batch_size: int, train: bool, num_workers: int, seed: int,
                     label_fraction: float | None = None, label_seed: int = 0, **transform):
    """This rank's labeled stream (already split by rank: never passed to ``accelerator.prepare``)."""
    from maevit.data.stream import labeled_loader

    return labeled_loader(
        source, img_size=img_size, batch_size=batch_size, train=train, num_workers=num_workers, seed=seed,
        rank=acc.process_index, world_size=acc.num_processes, label_fraction=label_fraction, label_seed=label_seed,
        **transform,
    )


def num_classes_of(configured: int | None, loader) -> int:
    """``model.num_classes``, defaulting to (and checked against) the classes of the training data."""
    names = getattr(loader, "class_names", None)
    if names is not None and len(names) < 2:
        raise ConfigError(
            f"the training data has {len(names)} class ({', '.join(map(str, names))}): a classifier needs at least "
            f"two. If the class folders are one level further down (FOLDER/{names[0] if names else 'X'}/CLASS/IMAGE), "
            f"pass that folder as data.train.")
    if configured is None:
        if not names:
            raise ConfigError("model.num_classes is not set and the training data has no class names; set it")
        return len(names)
    if names and len(names) > configured:
        raise ConfigError(f"model.num_classes={configured} but the data has {len(names)} classes")
    return configured


def batches_from(loader, epoch: int, start_batch: int):
    """Iterate epoch ``epoch`` of a stream from batch ``start_batch`` (the stream skips the rest exactly)."""
    loader.set_epoch(epoch)
    if start_batch:
        loader.skip_batches(start_batch)
    return iter(loader)


def progress_bar(enabled: bool, total: int | None, initial: int = 0, unit: str = "step", desc: str | None = None):
    """A tqdm bar with ETA (main process; ``run.progress=false`` turns it off for log files)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True, disable=not enabled)


def report_progress(bar, step: int, total: int, **values: float) -> None:
    """Latest metrics: on the bar, or (bar off, e.g. in a log file) as one log line."""
    shown = {k: (f"{v:.2e}" if k == "lr" else f"{v:.4g}") for k, v in values.items() if v is not None}
    if bar.disable:
        logger.info("step %d/%d  %s", step, total, "  ".join(f"{k} {v}" for k, v in shown.items()))
    else:
        bar.set_postfix(shown, refresh=False)


# ----------------------------------------------------------------------------- resume and Ctrl-C


def check_resumable(run_dir: str | os.PathLike, model: torch.nn.Module, cfg: Any, fresh: bool) -> None:
    """Refuse, before anything in RUN_DIR changes, to resume a checkpoint of another architecture.

    A changed ``model.img_size`` (or size) would otherwise rewrite ``config.yaml``
    and then fail while loading the weights. Compared: the checkpoint's weight
    shapes (safetensors header only) with ``model``'s; explained with the config
    keys that changed.

    Raises:
        ConfigError: shapes differ; the message says how to resume or start over.
    """
    from maevit.train.runs import RunDir

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


# Signals that save and stop: Ctrl-C, and what schedulers send before killing a job (SLURM's scancel,
# preemption and time limit, Kubernetes: SIGTERM then SIGKILL after a grace period; SLURM's
# --signal=USR1@SECONDS warns ahead of time)
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, n))


class _CtrlC:
    """What the handler installed by :func:`ctrl_c_stops_training` knows (one per process)."""

    installed = False
    flag = False
    signum = None  # the first stop signal received
    first_at = 0.0
    group = None  # (default group, a gloo group on it) for combining the flags of all ranks


def _on_stop_signal(signum, frame) -> None:
    now = time.monotonic()
    if _CtrlC.flag:
        if now - _CtrlC.first_at > 2.0:  # a second signal: quit now (torchrun / srun repeat the first at once)
            raise KeyboardInterrupt
        return
    _CtrlC.flag, _CtrlC.signum, _CtrlC.first_at = True, signum, now
    if os.environ.get("RANK", "0") == "0":  # os.write: logging is not safe inside a signal handler
        what = (b"Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name.encode() + b" (preempted)")
        os.write(2, b"\n" + what + b": stopping after this step to save a checkpoint (send it again to quit at "
                 b"once without saving)\n")


def stop_signal_name() -> str | None:
    """The stop signal this process got (``"SIGTERM"``, ...), or None."""
    return signal.Signals(_CtrlC.signum).name if _CtrlC.signum is not None else None


@contextlib.contextmanager
def ctrl_c_stops_training():
    """While a command runs, Ctrl-C (SIGINT), SIGTERM or SIGUSR1 ask the training loop to stop at the next
    optimizer step (:func:`stop_requested`), save a checkpoint and raise :class:`TrainingInterrupted`.

    Installed by :func:`run_recipe_command` only: called from Python, ``train`` /
    ``finetune`` keep the usual ``KeyboardInterrupt``.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, _on_stop_signal) for sig in STOP_SIGNALS}
    _CtrlC.installed, _CtrlC.flag, _CtrlC.signum = True, False, None
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        _CtrlC.installed, _CtrlC.flag = False, False


def stop_requested(acc) -> bool:
    """Whether a stop signal (Ctrl-C, SIGTERM, SIGUSR1) reached any rank; call once per optimizer step on
    every rank.

    With several processes the flags are combined (max over a CPU process group,
    no device sync), so all ranks stop at the same step and write one consistent
    checkpoint, whichever of them got the signal.
    """
    if not _CtrlC.installed:
        return False
    if acc.num_processes == 1:
        return _CtrlC.flag
    import torch.distributed as dist

    if _CtrlC.group is None or _CtrlC.group[0] is not dist.group.WORLD:  # collective: all ranks are at this step
        _CtrlC.group = (dist.group.WORLD, dist.new_group(backend="gloo"))
    flag = torch.tensor([float(_CtrlC.flag)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_CtrlC.group[1])
    return bool(flag.item())


def log_memory_estimate(acc, model: torch.nn.Module, input_shape: tuple[int, ...], precision: str) -> None:
    """Log what one training step needs (a dry run on meta tensors), and warn when it cannot fit."""
    from maevit.train.memory import estimate_step_memory, fit_warning

    try:
        est = estimate_step_memory(model, input_shape, precision=precision)
    except Exception as e:  # an estimate must never stop a run (an op without a meta kernel, ...)
        logger.debug("no memory estimate: %s", e)
        return
    logger.info("memory: %s", est.describe())
    warning = fit_warning(est, acc.device)
    if warning:
        logger.warning("%s", warning)


@contextlib.contextmanager
def building_model():
    """Model-construction errors from config values (sizes that do not divide, unknown option values)
    become :class:`~maevit.models.ModelArgumentError` usage errors instead of tracebacks."""
    from maevit.models import ModelArgumentError

    try:
        yield
    except ValueError as e:
        if isinstance(e, usage_errors()):
            raise
        raise ModelArgumentError(f"cannot build the model: {e}") from e


# ----------------------------------------------------------------------------- command lines


def setup_logging() -> None:
    """INFO from the main process only; Accelerate's per-file messages stay quiet."""
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    import warnings

    # "warning: ..." rather than "path/to/file.py:123: UserWarning: ...\n  the source line"
    warnings.formatwarning = lambda msg, category, *a, **k: f"warning: {msg}\n"


def usage_errors() -> tuple[type[BaseException], ...]:
    """Everyday mistakes that get a one-paragraph message and exit code 2, never a traceback."""
    from maevit.data.labels import ClassMismatchError
    from maevit.data.stream import DataSourceError
    from maevit.models import CheckpointError, ModelArgumentError
    from maevit.train.runs import RunError

    return (ConfigError, ModelArgumentError, CheckpointError, DataSourceError, ClassMismatchError, RunError,
            FileNotFoundError)


def run_recipe_command(
    prog: str,
    description: str,
    cfg_cls: type,
    run: Callable[[Any], dict[str, Any]],
    argv: list[str] | None,
    *,
    summary: Callable[[dict[str, Any]], str],
    epilog: str = "",
    label_fraction_flag: bool = False,
) -> int:
    """``PROG [RECIPE.yaml] [key=value ...] [--print-config]``: load the config, run, print a summary.

    Usage errors (config keys, model names, checkpoints, data sources) print one
    paragraph and exit 2; non-finite training stops and out-of-memory errors
    print advice and exit 1; Ctrl-C exits 130 (after the loop saved a
    checkpoint, with the command that resumes). ``--help`` lists every config
    key with its type, default and comment, read from ``cfg_cls``.

    Args:
        label_fraction_flag: accept ``--label-fraction F`` as a shorthand for ``data.label_fraction=F``.
    """
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(f"{epilog}\n\n" if epilog else "") + "config keys (key=value overrides; type, default, meaning):\n"
        + format_config_keys(cfg_cls))
    p.add_argument("recipe", nargs="?", default=None, help="recipe YAML (optional)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.epochs=10 run.dir=runs/x")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    if label_fraction_flag:
        p.add_argument("--label-fraction", type=float, default=None, help="= data.label_fraction (e.g. 0.1)")
    argv = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_intermixed_args(argv)
    recipe, overrides = a.recipe, list(a.overrides)
    if recipe is not None and "=" in recipe and not Path(recipe).exists():  # no recipe, only overrides
        recipe, overrides = None, [recipe, *overrides]
    if getattr(a, "label_fraction", None) is not None:
        overrides.append(f"data.label_fraction={a.label_fraction}")
    setup_logging()
    main_process = os.environ.get("RANK", "0") == "0"
    cfg = None
    try:
        cfg = load_config(cfg_cls, recipe, overrides)
        if a.print_config:
            import yaml

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None), end="")
            return 0
        from tqdm.contrib.logging import logging_redirect_tqdm

        with ctrl_c_stops_training(), logging_redirect_tqdm():  # log lines above the progress bar, not through it
            result = run(cfg)
    except usage_errors() as e:
        from maevit.train.runs import DiskFullError

        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, DiskFullError) else 2
    except NonFiniteLossError as e:
        print(f"{prog}: stopped: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        signame = stop_signal_name() or "SIGINT"
        if main_process:
            again = [x for x in argv if not x.startswith("run.fresh=")]  # fresh again would move this run aside
            again += ["run.fresh=false"] if cfg.run.fresh else []
            how = "the same command" if again == argv else "this command (without run.fresh=true)"
            cmd = shlex.join([*prog.split(), *again])
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by a launcher: the same launch line
                cmd = f"torchrun / accelerate launch ... -m maevit.cli {cmd.removeprefix('maevit ')}"
            what = "interrupted" if signame == "SIGINT" else f"preempted ({signame})"
            print(f"{prog}: {what} at step {e.step}; checkpoint saved in {e.checkpoint}. Resume with {how}:\n"
                  f"  {cmd}", file=sys.stderr)
        return 128 + int(getattr(signal, signame))  # 130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1
    except KeyboardInterrupt:  # before the training loop, a second Ctrl-C, or a command without checkpoints
        if main_process:
            run_cfg = getattr(cfg, "run", None)
            resumable = hasattr(run_cfg, "ckpt_every")
            print(f"{prog}: interrupted" + (f"; nothing saved since the last checkpoint in {run_cfg.dir}, if any "
                                            "(the same command resumes from it)" if resumable else ""),
                  file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as e:
        from maevit.train.memory import is_out_of_memory, oom_message

        if not is_out_of_memory(e):
            raise
        print(f"{prog}: error: {oom_message(getattr(getattr(cfg, 'data', None), 'batch_size', None))} "
              f"(torch said: {str(e).splitlines()[0][:200]})", file=sys.stderr)
        return 1
    if main_process:
        print(summary(result))
    return 0
