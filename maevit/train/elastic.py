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
    if "num_processes" not in state:  # (not written by save_checkpoint)
        return None
    world = int(state["num_processes"])
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
    return ElasticResume(epoch=int(state.get("epoch", 0)), world=resize.world, batch=batch, offset=offset,
                         workers=state.get("data_workers"))


def resume_on(acc: Any, state: dict[str, Any], resize: Resize | None, loader: Any) -> None:
    """After a checkpoint's ``state`` was loaded: say what a resize changes, restart Accelerate's micro-batch
    counter on a step boundary of the new accumulation, map ``state['batch']``, and hand the loader the rest
    of the epoch (also when a later resume on the same processes continues an epoch begun on others).

    Raises:
        RunError: the checkpoint loaded is not the one the resize was planned from (the newest was damaged
            and set aside); running the same command again plans from the one now newest.
    """
    from maevit.data.elastic import ElasticResume

    saved = int(state.get("num_processes", acc.num_processes))
    if saved != acc.num_processes and (resize is None or resize.world != saved):
        raise runs.RunError(
            f"the checkpoint resumed was written by {saved} process(es), not the one this resume was planned from "
            f"(the newest checkpoint was damaged and set aside): run the same command again.")
    if resize is not None:
        if acc.is_main_process:
            logger.info("%s", describe(resize, state, loader.batch_size))
            if (state.get("elastic") or {}).get("epoch") == state.get("epoch"):
                logger.warning("this epoch was already resumed on another number of processes once: the rest of it "
                               "is mapped as if streamed whole, so a few samples may repeat or be left out")
        acc.step = state["step"] * resize.new_accum  # the counter was saved under the old accumulation
        mapped = map_position(resize, state)
        state["elastic"] = mapped.__dict__ if mapped is not None else None
    if state.get("elastic") and hasattr(loader, "set_elastic"):
        loader.set_elastic(ElasticResume(**state["elastic"]))
