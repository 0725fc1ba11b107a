"""The optimizer step with its non-finite guard, kept on the device (no host sync per step)."""
from __future__ import annotations

import math

import torch

from maevit.train.optim import set_lr


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class DivergedError(NonFiniteLossError):
    """The run ended (or was stopped) while its loss was diverging: nothing was exported, and the
    checkpoints written before the divergence are kept."""


# Divergence (a loss that blows up while staying finite, so the non-finite guard lets it pass): judged on
# the device from a running mean of the per-step loss, after SETTLE steps. A step whose loss is SPIKE times
# the running mean is a spike; a running mean RISE times above its lowest value is a divergence in progress.
# Both only hold checkpoints back (the update itself is untouched, so training and exact resume are the
# same as without the guard); healthy training is far inside both bounds.
SETTLE, SPIKE, RISE, EMA_DECAY = 20, 10.0, 3.0, 0.95


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
        # divergence: this step's loss, its running mean (and lowest value), and the open spike streak
        self.step_sum, self.step_n, self.ema, self.ema_min, self.ema_n = zero(), zero(), zero(), zero(), zero()
        self.spike_run, self.rising = zero(), torch.zeros((), dtype=torch.bool, device=device)

    def add_loss(self, loss: torch.Tensor) -> None:
        """Count a micro-batch loss (non-finite ones are left out of the mean)."""
        finite = torch.isfinite(loss.detach())
        value = torch.where(finite, loss.detach().float(), 0.0)
        self.loss_sum += value
        self.loss_n += finite
        self.step_sum += value
        self.step_n += 1

    def _track_divergence(self, bad: torch.Tensor) -> None:
        """Per optimizer step, on the device: the spike streak and the rising running mean."""
        loss = self.step_sum / self.step_n.clamp(min=1)
        settled = self.ema_n >= SETTLE
        spike = ~bad & settled & (loss > SPIKE * self.ema)
        self.spike_run = (self.spike_run + 1) * spike
        take = ~bad & ~spike  # spikes and non-finite steps stay out of the running mean
        first = self.ema_n == 0
        new_ema = torch.where(first, loss, EMA_DECAY * self.ema + (1 - EMA_DECAY) * loss)
        self.ema = torch.where(take, new_ema, self.ema)
        self.ema_min = torch.where(take, torch.where(first, new_ema, torch.minimum(self.ema_min, new_ema)),
                                   self.ema_min)
        self.ema_n = self.ema_n + take
        self.rising = settled & (self.ema > RISE * self.ema_min)
        self.step_sum.zero_(), self.step_n.zero_()

    def health(self, acc, params: list[torch.Tensor]) -> str | None:
        """Why the current weights must not be checkpointed (a host sync; call before a checkpoint), or None.

        Unhealthy: a non-finite streak is open (its updates were skipped, but the weights it keeps failing
        on may be the ones the last accepted update blew up), the last step's loss spiked, the running
        loss is rising far above its lowest value, or a weight is not finite (on any rank)."""
        weights_ok = torch.stack([torch.isfinite(p.detach()).all() for p in params]).all() if params else \
            torch.ones((), dtype=torch.bool, device=self.bad_run.device)
        flags = torch.stack([self.bad_run, self.spike_run, self.rising.float(), (~weights_ok).float(),
                             self.ema, self.ema_min])
        bad_run, spike_run, rising, weights, ema, low = acc.reduce(flags, reduction="max").tolist()
        if weights:
            return "some weights are no longer finite"
        if spike_run:
            return f"the loss of the last {int(spike_run)} step(s) was over {SPIKE:g}x its running mean"
        if rising:
            return f"the running loss ({ema:.4g}) is over {RISE:g}x its lowest value ({low:.4g}): the run is diverging"
        if bad_run:
            return f"the last {int(bad_run)} step(s) had a non-finite loss or gradient"
        return None

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
            self._track_divergence(bad)
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
