"""Resuming a run on a different number of processes as the same run (preemptible clusters resize jobs).

The effective batch (``batch x processes x optim.accum_steps``) is what the
schedule, the peak lr (``base_lr x effective batch / 256``) and the steps per
epoch are made of, so a resume keeps it by changing the accumulation:
``accum' = processes x accum / processes'``. When that does not divide, the
command stops (exit 2) and says which process counts would. The data position
of the checkpoint (batches per rank inside the epoch) is mapped to the new
layout, and the loader streams the rest of that epoch without the samples
already seen (:mod:`maevit.data.elastic`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from maevit.config import ConfigError
from maevit.train import runs

logger = logging.getLogger("maevit.engine")


@dataclass(frozen=True)
class Resize:
    """A resume on another number of processes: before and after."""

    world: int
    accum: int
    new_world: int
    new_accum: int


def plan_resize(cfg: Any) -> Resize | None:
    """The accumulation that keeps the effective batch of the checkpoint ``cfg.run.dir`` resumes, when it was
    written by another number of processes than this command runs on; None otherwise.

    Raises:
        ConfigError: the checkpoint's ``processes x accum`` is not a multiple of this command's processes.
    """
    if getattr(cfg.run, "fresh", False) or not hasattr(getattr(cfg, "optim", None), "accum_steps"):
        return None
    ckpt = runs.RunDir(cfg.run.dir).latest_checkpoint()
    if ckpt is None:
        return None
    try:
        state = json.loads((ckpt / runs.STATE_FILE).read_text())
    except (OSError, ValueError):
        return None  # a damaged checkpoint: open_run says so
    from accelerate.utils import get_int_from_env

    # what the launcher set (torchrun / accelerate launch / MPI): the Accelerator is not made yet, and an early
    # PartialState() would fix the process group before the command's Accelerator chooses CPU or GPU
    new_world = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)
    world = int(state.get("num_processes", 1))
    if world == new_world:
        return None
    accum = int(state.get("accum_steps", cfg.optim.accum_steps))
    total = world * accum
    if total % new_world:
        fits = ", ".join(str(n) for n in range(1, total + 1) if total % n == 0)
        raise ConfigError(
            f"{ckpt} was written by {world} process(es) with optim.accum_steps={accum} (effective batch "
            f"{total} x data.batch_size), and this command runs {new_world} process(es): {total} micro-batches per "
            f"step cannot be split evenly over {new_world}, so the effective batch, lr and schedule cannot be kept. "
            f"Resume on {fits} process(es), or start over with run.fresh=true.")
    return Resize(world, accum, new_world, total // new_world)


def describe(resize: Resize, state: dict[str, Any], batch_size: int) -> str:
    """The one log line of an elastic resume: what changed and what it means."""
    b = state.get("batch", 0)
    where = (f"the data position (batch {b} of {resize.world} ranks in epoch {state.get('epoch', 0)}) maps to batch "
             f"{b * resize.world // resize.new_world} of {resize.new_world}, and the rest of that epoch streams "
             f"without the samples already seen" if b else "it resumes at an epoch boundary")
    return (f"resuming on {resize.new_world} process(es) a checkpoint of {resize.world}: optim.accum_steps "
            f"{resize.accum} -> {resize.new_accum} keeps the effective batch "
            f"({batch_size * resize.world * resize.accum} samples), so the lr, the schedule and the steps per epoch "
            f"are unchanged; {where}. Random augmentation differs from an uninterrupted run.")


def map_position(resize: Resize, state: dict[str, Any]) -> Any:
    """Rewrite ``state['batch']`` in the new layout's batches per rank; returns the loader's
    :class:`~maevit.data.elastic.ElasticResume` (None at an epoch boundary)."""
    from maevit.data.elastic import ElasticResume

    batch = int(state.get("batch", 0))
    if not batch:
        return None
    offset = batch * resize.world // resize.new_world  # exact: checkpoints are at optimizer-step boundaries
    state["batch"] = offset
    return ElasticResume(epoch=int(state.get("epoch", 0)), world=resize.world, batch=batch, offset=offset)
