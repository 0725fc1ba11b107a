"""What pretraining and fine-tuning share: config sections, the accelerator, the
schedule, the optimizer step with its non-finite guard, progress, and the
command-line plumbing.

The two loops differ only in what a step computes; everything around it lives
here once, so they cannot drift apart.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from maevit.config import ConfigError, load_config, to_dict
from maevit.train.optim import cosine_lr, scaled_lr, set_lr

logger = logging.getLogger("maevit")

IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)
Precision = Literal["fp32", "bf16", "fp16"]


# ----------------------------------------------------------------------------- config sections


@dataclass
class RunBase:
    """Run-directory fields every training command has (pretrain / finetune extend it)."""

    dir: str = "runs/run"  # run directory: config, metrics, checkpoints, images, weights
    seed: int = 0
    precision: Precision = "fp32"  # bf16 on recent GPUs; fp32 on CPU
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


# ----------------------------------------------------------------------------- accelerator


def make_accelerator(precision: str, accum_steps: int = 1, run_dir: str | os.PathLike | None = None):
    """An ``Accelerator`` for one run: precision, accumulation, TensorBoard under ``run_dir`` when available."""
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available

    return Accelerator(
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision],
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
    warmup = round(warmup_epochs * steps_per_epoch)
    if warmup >= total and total > 1:
        clipped = max(1, total // 10)
        logger.warning("optim.warmup_epochs=%g is as long as the whole schedule (%d epochs, %d steps): warm-up "
                       "clipped to %d steps (a tenth), so the lr reaches its peak", warmup_epochs, epochs, total,
                       clipped)
        warmup = clipped
    peak = scaled_lr(base_lr, effective_batch)
    if last < warmup:
        logger.warning("the run stops at step %d (optim.max_steps), inside the %d-step warm-up: the lr peaks at "
                       "%.3g, not %.3g; shorten optim.warmup_epochs or raise optim.max_steps",
                       last, warmup, peak * last / max(1, warmup), peak)
    return Schedule(steps_per_epoch, total, last, warmup, peak, min_lr)


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


def progress_bar(enabled: bool, total: int, initial: int = 0, unit: str = "step"):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, disable=not enabled)


# ----------------------------------------------------------------------------- command lines


def setup_logging() -> None:
    """INFO from the main process only; Accelerate's per-file messages stay quiet."""
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def usage_errors() -> tuple[type[BaseException], ...]:
    """Everyday mistakes that get a one-paragraph message and exit code 2, never a traceback."""
    from maevit.data.stream import DataSourceError
    from maevit.models import CheckpointError, ModelArgumentError
    from maevit.train.runs import RunError

    return ConfigError, ModelArgumentError, CheckpointError, DataSourceError, RunError, FileNotFoundError


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
    """``PROG [RECIPE.yaml] [key=value ...]``: load the config, run, print a summary.

    Usage errors (config keys, model names, checkpoints, data sources) print one
    paragraph and exit 2; non-finite training stops print advice and exit 1.

    Args:
        label_fraction_flag: accept ``--label-fraction F`` as a shorthand for ``data.label_fraction=F``.
    """
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
    p.add_argument("recipe", nargs="?", default=None, help="recipe YAML (optional)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.epochs=10 run.dir=runs/x")
    if label_fraction_flag:
        p.add_argument("--label-fraction", type=float, default=None, help="= data.label_fraction (e.g. 0.1)")
    a = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    recipe, overrides = a.recipe, list(a.overrides)
    if recipe is not None and "=" in recipe and not Path(recipe).exists():  # no recipe, only overrides
        recipe, overrides = None, [recipe, *overrides]
    if getattr(a, "label_fraction", None) is not None:
        overrides.append(f"data.label_fraction={a.label_fraction}")
    setup_logging()
    try:
        cfg = load_config(cfg_cls, recipe, overrides)
        result = run(cfg)
    except usage_errors() as e:
        from maevit.train.runs import DiskFullError

        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, DiskFullError) else 2
    except NonFiniteLossError as e:
        print(f"{prog}: stopped: {e}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":
        print(summary(result))
    return 0
