"""The optimizer-step schedule of a run: linear warm-up, then per-step cosine decay."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from maevit.config import ConfigError
from maevit.train.optim import cosine_lr, scaled_lr

logger = logging.getLogger("maevit")


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


def plan_for(optim: Any, loader: Any, batch_size: int, num_processes: int) -> tuple[Schedule, int]:
    """The schedule of a run from its ``optim`` section and its loader; and the effective batch
    (``batch_size x num_processes x optim.accum_steps``)."""
    eff_batch = batch_size * num_processes * optim.accum_steps
    return plan_schedule(epochs=optim.epochs, batches_per_epoch=len(loader), accum_steps=optim.accum_steps,
                         warmup_epochs=optim.warmup_epochs, base_lr=optim.base_lr, effective_batch=eff_batch,
                         min_lr=optim.min_lr, max_steps=optim.max_steps), eff_batch
