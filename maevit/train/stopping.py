"""Stopping a run cleanly: Ctrl-C asks the loop to save a checkpoint and stop.

The training loop asks :func:`stop_requested` once per optimizer step, on every
rank; it is the one place a stop is requested (other signals can be added to the
same flag). :class:`TrainingInterrupted` is raised once the checkpoint is written.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import torch


class TrainingInterrupted(Exception):
    """Ctrl-C stopped training at an optimizer-step boundary, after a checkpoint was written.

    Attributes:
        step: the step the checkpoint holds.
        checkpoint: its directory.
    """

    def __init__(self, step: int, checkpoint: str | os.PathLike) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, str(checkpoint)


class _CtrlC:
    """What the SIGINT handler installed by :func:`ctrl_c_stops_training` knows (one per process)."""

    installed = False
    flag = False
    first_at = 0.0
    group = None  # (default group, a gloo group on it) for combining the flags of all ranks


def _on_sigint(signum, frame) -> None:
    now = time.monotonic()
    if _CtrlC.flag:
        if now - _CtrlC.first_at > 2.0:  # a second Ctrl-C: quit now (torchrun repeats the first at once)
            raise KeyboardInterrupt
        return
    _CtrlC.flag, _CtrlC.first_at = True, now
    if os.environ.get("RANK", "0") == "0":  # os.write: logging is not safe inside a signal handler
        os.write(2, b"\nCtrl-C: stopping after this step to save a checkpoint "
                    b"(press Ctrl-C again to quit at once without saving)\n")


@contextlib.contextmanager
def ctrl_c_stops_training():
    """While a command runs, Ctrl-C (SIGINT) asks the training loop to stop at the next optimizer step
    (:func:`stop_requested`), save a checkpoint and raise :class:`TrainingInterrupted`.

    Installed by :func:`run_recipe_command` only: called from Python, ``train`` /
    ``finetune`` keep the usual ``KeyboardInterrupt``.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, _on_sigint)
    _CtrlC.installed, _CtrlC.flag = True, False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        _CtrlC.installed, _CtrlC.flag = False, False


def stop_requested(acc) -> bool:
    """Whether Ctrl-C reached any rank; call once per optimizer step on every rank.

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
