"""The optimizer step with its non-finite guard, kept on the device (no host sync per step)."""
from __future__ import annotations

import math

import torch

from maevit.train.optim import set_lr


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


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
