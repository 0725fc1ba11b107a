"""The training loop, written once: pretraining, fine-tuning and probing are tasks on it.

A *task* (:class:`Task`) says what differs between commands, as in timm's
``timm/task/``:

- :meth:`Task.build` — the model, the data and the ``Accelerator``; nothing in
  the run directory changes yet, so a bad model name, size or data source
  leaves an old run untouched;
- :meth:`Task.start` — after the run directory is open: optimizer, teachers,
  ``accelerator.prepare``, the schedule; returns a :class:`Setup`;
- :meth:`Task.loss` — the loss of one batch: ``{"loss": ..., **parts}`` (parts
  are logged beside the loss);
- :meth:`Task.hooks` — what runs around the loop (evaluation at epoch ends,
  reconstruction grids, the online kNN probe, EMA of the weights: :class:`Hook`);
- :meth:`Task.export` — what is written at the end, and the summary returned.

The loop (:func:`fit`) owns everything else: gradient accumulation
(Accelerate), the non-finite guard (:class:`~maevit.train.step.StepGuard`), log
rows (``metrics.jsonl``, the tracker, the progress bar), checkpoints and exact
resume (:mod:`maevit.train.runs`), Ctrl-C and teardown. Inside a step it never
waits for the device: losses and skip counters stay on the device and are read
once per log row (every ``run.log_every`` steps).

Two seams are kept single on purpose: :meth:`Loop.stop_requested` is the only
place a stop is asked for (Ctrl-C today; other signals can join it), and
:meth:`Loop.checkpoint` the only place a checkpoint is written.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maevit.config import ConfigError
from maevit.models.weights import save_weights
from maevit.train import elastic, runs
from maevit.train.curves import save_run_curves
from maevit.train.inputs import batches_from
from maevit.train.metrics import MetricsLogger, SkipTally
from maevit.train.progress import progress_bar, report_progress
from maevit.train.trackers import log_image_file, start_trackers
from maevit.train.schedule import Schedule
from maevit.train.step import DivergedError, NonFiniteLossError, StepGuard
from maevit.train.stopping import TrainingInterrupted, stop_requested
from maevit.train.watchdog import Watchdog

logger = logging.getLogger("maevit.engine")


@dataclass(frozen=True)
class Policy:
    """How often the loop logs and checkpoints (by default the ``run`` section's fields of the same names).

    Attributes:
        log_every: optimizer steps between log rows (the only host syncs).
        ckpt_every: optimizer steps between checkpoints; 0: at every epoch end.
        keep_last: checkpoints kept.
        max_nonfinite: stop after this many non-finite steps in a row.
        progress: show the progress bar (main process).
        checkpoints: False: a task without checkpoints (the linear probe: short, always fresh).
        desc: the progress bar's label (None: none).
        hang_timeout: seconds without a step before a rank ends the job (:mod:`maevit.train.watchdog`); 0: off.
    """

    log_every: int
    ckpt_every: int = 0
    keep_last: int = 2
    max_nonfinite: int = 10
    progress: bool = True
    checkpoints: bool = True
    desc: str | None = None
    hang_timeout: float = 0

    @classmethod
    def of(cls, run: Any) -> "Policy":
        return cls(log_every=run.log_every, ckpt_every=run.ckpt_every, keep_last=run.keep_last,
                   max_nonfinite=run.max_nonfinite, progress=run.progress,
                   hang_timeout=getattr(run, "hang_timeout", 0))


@dataclass
class Setup:
    """What a task hands the loop once it is ready to train (see :meth:`Task.start`).

    Attributes:
        acc: the run's ``Accelerator``.
        run: the open run directory.
        model: the prepared model (what ``accumulate`` and the checkpoints see).
        optimizer: the prepared optimizer.
        params: the parameters whose gradient norm is clipped and guarded.
        loader: this rank's training stream (``set_epoch``, ``skip_batches``, ``state_dict``, ``stats``).
        schedule: the optimizer-step schedule.
        eff_batch: samples per optimizer step over all processes.
        meter: a :class:`~maevit.train.perf.ThroughputMeter` (images/s -> TFLOP/s, MFU, data wait), or None.
        header: saved in every checkpoint's state as ``model`` (what the weights are).
        precision: the resolved ``run.precision`` (recorded in checkpoints).
        clip_grad: max gradient norm (None: no clipping).
        generators: extra ``torch.Generator`` objects saved per rank with every checkpoint.
        hooks: what runs around the loop.
        panels: the panels of ``RUN_DIR/curves.png``.
        policy: how often to log and checkpoint (None: :meth:`Policy.of` the ``run`` section).
        side_loaders: other streams the task reads (``stats``): their skipped samples count with the loader's.
    """

    acc: Any
    run: runs.RunDir
    model: nn.Module
    optimizer: Any
    params: list[torch.Tensor]
    loader: Any
    schedule: Schedule
    eff_batch: int
    meter: Any
    header: dict[str, Any]
    precision: str
    clip_grad: float | None = None
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    hooks: list["Hook"] = field(default_factory=list)
    panels: tuple = ()
    policy: Policy | None = None
    side_loaders: list[Any] = field(default_factory=list)


class Hook:
    """Something that runs around the loop; every method is optional. ``loop`` is the :class:`Loop`."""

    def on_resume(self, loop: "Loop", state: dict[str, Any]) -> None:
        """After a checkpoint was loaded (``loop.step`` is its step)."""

    def on_start(self, loop: "Loop") -> None:
        """Before the first step of this call."""

    def after_step(self, loop: "Loop") -> None:
        """After every optimizer step, before its log row."""

    def after_log(self, loop: "Loop") -> None:
        """After every optimizer step and its log row, before a checkpoint (grids, probes)."""

    def on_epoch_end(self, loop: "Loop") -> None:
        """After a complete epoch (``loop.epoch`` already counts it): evaluation."""

    def before_checkpoint(self, loop: "Loop", step: int) -> None:
        """Write what travels beside the checkpoint of ``step`` (main process decides)."""

    def after_checkpoint(self, loop: "Loop") -> None:
        """After a checkpoint was published (and old ones pruned)."""


class EmaHook(Hook):
    """An exponential moving average of the weights (timm's ``ModelEmaV3``), updated after every
    optimizer step and saved beside every checkpoint as ``RUN_DIR/checkpoints/ema-STEP.safetensors``
    (safetensors: Accelerate's ``register_for_checkpointing`` would pickle it).

    Args:
        ema: the ``ModelEmaV3`` (``ema.module`` is the averaged model).
        header: the weights file header.
    """

    def __init__(self, ema: Any, header: dict[str, Any]) -> None:
        self.ema, self.header = ema, header

    def on_resume(self, loop: "Loop", state: dict[str, Any]) -> None:
        from safetensors.torch import load_file

        self.ema.module.load_state_dict(load_file(str(loop.run.ema_path(state["step"]))))

    def after_step(self, loop: "Loop") -> None:
        self.ema.update(loop.acc.unwrap_model(loop.model), step=loop.step)

    def before_checkpoint(self, loop: "Loop", step: int) -> None:
        if loop.acc.is_main_process:
            save_weights(self.ema.module.state_dict(), loop.run.ema_path(step), self.header)

    def after_checkpoint(self, loop: "Loop") -> None:
        if loop.acc.is_main_process:  # drop EMA files of removed checkpoints
            loop.run.prune_beside_checkpoints()


class Task:
    """What one training command does; the loop (:func:`fit`) does the rest.

    Attributes:
        cfg: the command's config (``run`` section: dir, fresh, log_every, max_nonfinite,
            keep_last, ckpt_every, progress).
    """

    cfg: Any

    def resolve(self, cfg: Any) -> Any:
        """The config the run uses (and saves in ``config.yaml``): ``cfg`` with what it leaves open filled in
        (the one place for per-model defaults, e.g. from the registry); called first, before :meth:`build`."""
        return cfg

    def build(self) -> tuple[Any, nn.Module]:
        """Model, data and accelerator, before the run directory is touched; returns
        ``(accelerator, model)`` (the model is checked against a checkpoint to resume)."""
        raise NotImplementedError

    def start(self, run: runs.RunDir) -> Setup:
        """Optimizer, teachers, ``accelerator.prepare`` and the schedule, once ``run`` is open."""
        raise NotImplementedError

    def loss(self, batch: Any) -> dict[str, torch.Tensor]:
        """The loss of one micro-batch (inside ``accumulate``): ``{"loss": scalar, **parts}``."""
        raise NotImplementedError

    def advice(self) -> str:
        """What to try when steps keep failing (the end of the non-finite message)."""
        return ""

    def export(self, loop: "Loop") -> dict[str, Any]:
        """Called on every rank after the last step: write the result, return the summary."""
        raise NotImplementedError


class Loop:
    """One run of the loop: its counters, logs and checkpoints (built and run by :func:`fit`).

    Attributes:
        step / epoch / batch: optimizer steps done; the epoch; micro-batches of it consumed.
        row: the last log row (``loss``, ``lr``, ``images_per_sec``, ...).
        losses: this call's logged losses.
        resumed_from: the checkpoint resumed, or None.
        saved_at: the step of the last checkpoint (-1: none).
        stopping: a stop was requested.
        s: the task's :class:`Setup`; policy: how often it logs and checkpoints (:class:`Policy`).
        acc / run / model / metrics: the accelerator, run directory, prepared model, metrics log.
    """

    def __init__(self, task: Task, s: Setup, ckpt: Path | None, resize: elastic.Resize | None = None) -> None:
        self.task, self.s, self.policy = task, s, s.policy or Policy.of(task.cfg.run)
        self.acc, self.run, self.model = s.acc, s.run, s.model
        self.resumed_from = ckpt
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "nonfinite_steps": 0,
                                      "precision": s.precision}  # kept on resume
        if ckpt is not None:
            self.state.update(runs.load_checkpoint(self.acc, ckpt, generators=s.generators or None,
                                                   verified=True))  # open_run checked its digests
        if ckpt is not None:  # on another number of processes: the same effective batch, the data position mapped
            elastic.resume_on(self.acc, self.state, resize, s.loader)
        self.step, self.epoch, self.batch = self.state["step"], self.state["epoch"], self.state["batch"]
        self.skips = SkipTally(self.acc, [s.loader, *s.side_loaders], self.state.get("skipped"))  # all ranks, since 0
        self.metrics = MetricsLogger(s.run.metrics_path, enabled=self.acc.is_main_process,
                                     resume_step=self.step if ckpt is not None else None,
                                     resume_rows=self.state.get("metrics_rows") if ckpt is not None else None)
        self.guard = StepGuard(self.acc.device, self.state["nonfinite_steps"])
        self.parts: dict[str, torch.Tensor] = {}  # loss parts summed on the device between log rows
        self.row: dict[str, Any] = {}
        self.losses: list[float] = []
        self.saved_at = self.step if ckpt is not None else -1
        # the newest checkpoint known to be healthy: a later health check passed (a checkpoint written on the
        # step that blows the weights up passes its own check: the loss shows it one step later)
        self.confirmed_at = self.saved_at
        self.held: str | None = None
        self.set_aside: Path | None = None  # a checkpoint moved aside because it may hold diverged weights  # why the last checkpoint was held back (the run is diverging), or None
        self.stopping = False
        self.watchdog = Watchdog(s.run.root, self.acc.process_index, self.acc.num_processes, self.policy.hang_timeout)
        if ckpt is not None:
            for hook in s.hooks:
                hook.on_resume(self, self.state)

    # ------------------------------------------------------------------ the loop
    def run_all(self) -> None:
        s, cfg = self.s, self.policy
        last = s.schedule.last_step
        batches_per_epoch = s.schedule.steps_per_epoch * self.acc.gradient_accumulation_steps  # ragged tail skipped
        self.bar = progress_bar(cfg.progress and self.acc.is_main_process, last, self.step, desc=cfg.desc)
        self._t_log, self._step_log = time.perf_counter(), self.step
        self._call("on_start")
        self.watchdog.start()
        while self.step < last and not self.stopping:
            if self.batch < batches_per_epoch:  # (a resume at the very end of an epoch goes to its end at once)
                batches = batches_from(s.loader, self.epoch, self.batch)
                for item in self._watched(s.meter.timed(batches) if s.meter else batches):  # data-wait time
                    with self.acc.accumulate(self.model):
                        out = self.task.loss(item)
                        self.acc.backward(out["loss"])
                        self._count(out)
                        self.guard.step(self.acc, s.optimizer, s.params, s.schedule.lr(self.step), s.clip_grad)
                    self.batch = s.loader.state_dict()["batch"]  # the stream's position: what a resume skips to
                    if not self.acc.sync_gradients:
                        continue
                    self.step += 1
                    self.watchdog.beat(self.step)
                    self.bar.update(1)
                    self._call("after_step")
                    if self.step % cfg.log_every == 0 or self.step == last:
                        self.log_row()
                    self.watchdog.pause()  # grids, probes and checkpoints may take long
                    self._call("after_log")
                    # a stop on any rank: every rank saves and stops after this step (the last step ends anyway)
                    self.stopping = self.stop_requested() and self.step < last
                    if cfg.checkpoints and ((cfg.ckpt_every and self.step % cfg.ckpt_every == 0)
                                            or self.step == last or self.stopping):
                        self.checkpoint()
                    self.watchdog.resume()
                    if self.stopping or self.step >= last or self.batch >= batches_per_epoch:
                        break
                else:
                    self.batch = batches_per_epoch  # the stream ended
            if self.stopping or self.batch < batches_per_epoch:
                break  # a stop, or optim.max_steps inside the epoch
            self.epoch, self.batch = self.epoch + 1, 0
            self.watchdog.pause()  # evaluation
            self._call("on_epoch_end")
            if cfg.checkpoints and not cfg.ckpt_every and self.step < last:
                self.checkpoint()  # epoch boundary (the last step is saved inside the loop)
            self.watchdog.resume()

    def _watched(self, batches):
        """The training batches, telling the watchdog when this rank waits for data."""
        it = iter(batches)
        while True:
            self.watchdog.waiting_for_data()
            try:
                item = next(it)
            except StopIteration:
                return
            self.watchdog.computing()
            yield item

    def stop_requested(self) -> bool:
        """Whether any rank was asked to stop (Ctrl-C); called once per optimizer step on every rank."""
        return stop_requested(self.acc)

    def checkpoint(self) -> None:
        """Save the full training state of this step (every rank); the one place checkpoints are written.

        Never while the run is diverging (:meth:`~maevit.train.step.StepGuard.health`): then nothing is
        written or pruned, so the newest checkpoint from before the divergence is kept."""
        self.held = self.guard.health(self.acc, self.s.params)
        if self.held is not None:
            self._set_aside_unconfirmed()
            if self.acc.is_main_process:
                logger.warning("step %d: no checkpoint written: %s. %s", self.step, self.held, self.last_good())
            return
        self.confirmed_at = self.saved_at  # healthy since it was written
        self.state.update(step=self.step, epoch=self.epoch, batch=self.batch,
                          accum_steps=self.acc.gradient_accumulation_steps,  # (with data_workers: what
                          data_workers=getattr(self.s.loader, "num_workers", None),  # an elastic resume replays)
                          nonfinite_steps=int(self.guard.bad_total.item()), skipped=self.skips.totals(),
                          model=self.s.header, metrics_rows=self.metrics.rows)  # (the main process writes it)
        for hook in self.s.hooks:
            hook.before_checkpoint(self, self.step)
        runs.save_checkpoint(self.acc, self.run, self.step, self.state, keep_last=self.policy.keep_last,
                             generators=self.s.generators or None, protect=self._confirmed())
        self.saved_at = self.step
        self._call("after_checkpoint")
        if self.acc.is_main_process and self.s.panels:
            save_run_curves(self.run.root, self.s.panels)

    def _set_aside_unconfirmed(self) -> None:
        """A divergence showed: the checkpoint written since the last healthy check may hold its weights."""
        if self.saved_at > self.confirmed_at:
            if self.acc.is_main_process:
                moved = self.run.set_aside_suspect(self.run.checkpoint_path(self.saved_at), self._confirmed())
                logger.warning("checkpoint of step %d may hold the weights that diverged: moved to %s",
                               self.saved_at, moved.name)
            self.acc.wait_for_everyone()
            self.set_aside = self.run.damaged_path(self.saved_at)
            self.saved_at = self.confirmed_at

    def _confirmed(self) -> Path | None:
        return self.run.checkpoint_path(self.confirmed_at) if self.confirmed_at >= 0 else None

    def last_good(self) -> str:
        """A sentence naming the newest checkpoint kept (one that may hold diverged weights is set aside first)."""
        aside = (f" The one written just before it may hold the weights that failed: it was moved to "
                 f"{self.set_aside}." if self.set_aside is not None else "")
        if self.saved_at < 0:
            return f"No healthy checkpoint was written before it.{aside}"
        return f"The newest checkpoint from before it, {self.run.checkpoint_path(self.saved_at)}, is kept.{aside}"

    # ------------------------------------------------------------------ logging
    def _count(self, out: dict[str, torch.Tensor]) -> None:
        self.guard.add_loss(out["loss"])
        for key, value in out.items():  # parts: summed on the device, finite values only
            if key != "loss":
                v = value.detach().float()
                self.parts[key] = self.parts.get(key, 0.0) + torch.where(torch.isfinite(v), v, 0.0)

    def log_row(self) -> None:
        """One metrics row (reduced over ranks: a host sync) to metrics.jsonl, the tracker and the bar."""
        s, acc = self.s, self.acc
        try:
            read = self.guard.read(acc, self.policy.max_nonfinite, self.task.advice())
        except NonFiniteLossError as e:
            self._set_aside_unconfirmed()  # the checkpoint written just before may hold what fails
            raise NonFiniteLossError(f"{e} {self.last_good()}") from None
        now = time.perf_counter()
        img_s = s.eff_batch * (self.step - self._step_log) / (now - self._t_log)
        epoch = round(self.epoch + self.batch / len(s.loader), 4)
        lr = max(g["lr"] for g in s.optimizer.param_groups)  # the peak group's (layer decay scales the others)
        row = {"epoch": epoch, "loss": read["loss"], "lr": lr, "images_per_sec": round(img_s, 2),
               "nonfinite_steps": read["nonfinite_steps"], **self._read_parts(),
               **(s.meter.fields(img_s) if s.meter else {})}
        skipped = self.skips.totals()
        self.metrics.log(self.step, **row, skipped=skipped)  # bad samples skipped since step 0, by kind
        acc.log({**{f"train/{k}": v for k, v in row.items() if v is not None},
                 **{f"train/skipped_{k}": v for k, v in skipped.items()}}, step=self.step)
        if acc.is_main_process:
            report_progress(self.bar, self.step, s.schedule.last_step, epoch=epoch, loss=row["loss"], lr=lr,
                            img_s=img_s, skipped=row["nonfinite_steps"] or None)
        self.row = row
        self.losses.append(row["loss"])
        self._t_log, self._step_log = time.perf_counter(), self.step

    def _read_parts(self) -> dict[str, float]:
        if not self.parts:
            return {}
        keys = sorted(self.parts)
        # the mean over the micro-batches since the last row, like the loss (whose count the guard keeps)
        sums = torch.stack([torch.as_tensor(self.parts[k], device=self.acc.device) for k in keys])
        n = max(1, self._micro_batches())
        totals = self.acc.reduce(sums, reduction="mean").tolist()
        self.parts = {}
        return {k: v / n for k, v in zip(keys, totals)}

    def _micro_batches(self) -> int:
        return (self.step - self._step_log) * self.acc.gradient_accumulation_steps

    def log(self, step: int, tracker_prefix: str | None = None, **values: Any) -> None:
        """A row of extra values (evaluations, probes) to metrics.jsonl and, with a prefix, the tracker."""
        self.metrics.log(step, **values)
        if tracker_prefix is not None:
            self.acc.log({f"{tracker_prefix}{k}": v for k, v in values.items()}, step=step)

    def _call(self, name: str) -> None:
        for hook in self.s.hooks:
            getattr(hook, name)(self)

    def close(self) -> dict[str, int]:
        """Close the bar, the watchdog and the metrics file; returns (and logs) the skipped samples."""
        self.watchdog.close()
        self.bar.close()
        self.metrics.close()
        return self.skips.report()


def fit(task: Task) -> dict[str, Any]:
    """Run ``task`` from its config to its summary (or resume it from its run directory).

    Raises:
        TrainingInterrupted: a stop was requested; a checkpoint of the step reached was written.
        maevit.train.step.NonFiniteLossError: ``run.max_nonfinite`` non-finite steps in a row.
        maevit.train.step.DivergedError: the run ended while diverging (nothing exported).
        maevit.train.runs.RunError: the run directory is in use, the disk filled up, or the
            checkpoint cannot be resumed.
    """
    cfg = task.cfg = task.resolve(task.cfg)
    resize = elastic.plan_resize(cfg)  # resumed on another number of processes: keep the effective batch
    if resize is not None:
        cfg.optim.accum_steps = resize.new_accum
    acc, model = task.build()  # nothing written yet: a bad name, size or source changes no files
    runs.check_resumable(cfg.run.dir, model, cfg, cfg.run.fresh)
    run, ckpt = runs.open_run(cfg.run.dir, acc, cfg, fresh=cfg.run.fresh)
    try:
        start_trackers(acc, cfg)
    except ConfigError:  # a tracker that cannot start: a usage error, and the run directory is free again
        run.unlock()
        raise
    loop = Loop(task, task.start(run), ckpt, resize)
    try:
        loop.run_all()
    finally:
        loop.watchdog.close()  # (also when the loop raises: no thread may outlive it)
    loop.skipped = loop.close()
    if loop.held is not None:  # ended (or stopped) inside a divergence: export nothing
        acc.end_training()
        run.unlock()
        raise DivergedError(
            f"the run {'was stopped' if loop.stopping else 'ended'} at step {loop.step} while {loop.held}, so its "
            f"weights were neither checkpointed nor exported. {loop.last_good()} {task.advice()}".strip())
    if loop.stopping:
        acc.end_training()
        run.unlock()
        if not loop.policy.checkpoints:  # nothing saved: the command says "interrupted" (exit 130)
            raise KeyboardInterrupt
        raise TrainingInterrupted(loop.step, run.checkpoint_path(loop.step))
    if loop.policy.checkpoints and acc.is_main_process:  # healthy to the end: the extra one kept is not needed
        runs.prune_checkpoints(run, loop.policy.keep_last)
        run.prune_beside_checkpoints()
    result = task.export(loop)
    log_image_file(acc, "curves", run.curves_path, loop.step)  # drawn at the last checkpoint or by the export
    acc.wait_for_everyone()
    acc.end_training()
    run.unlock()
    return result


def summary_fields(loop: Loop) -> dict[str, Any]:
    """The summary fields every task returns."""
    curves = loop.run.curves_path
    return {"step": loop.step, "epoch": loop.epoch, "skipped": loop.skipped, "run_dir": str(loop.run.root),
            "resumed_from": str(loop.resumed_from) if loop.resumed_from else None,
            "num_processes": loop.acc.num_processes, "curves": str(curves) if curves.is_file() else None}

