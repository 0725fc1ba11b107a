"""Stopping a run cleanly: Ctrl-C, SIGTERM or SIGUSR1 ask the loop to save a checkpoint and stop.

The training loop asks :func:`stop_requested` once per optimizer step, on every
rank; it is the one place a stop is requested. :class:`TrainingInterrupted` is raised once the checkpoint is written.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import torch


class TrainingInterrupted(Exception):
    """A stop signal ended training at an optimizer-step boundary, after a checkpoint was written.

    Attributes:
        step: the step the checkpoint holds.
        checkpoint: its directory.
    """

    def __init__(self, step: int, checkpoint: str | os.PathLike) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, str(checkpoint)


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
