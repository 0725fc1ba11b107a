"""Fine-tuning of pretrained encoders: ``maevit finetune [RECIPE.yaml] key=value ...``.

The published MAE recipe through timm: the pretrained encoder (any registered
family) plus a head, average pooling + ``fc_norm``, layer-wise lr decay, drop
path, mixup / cutmix with label smoothing, RandAugment + random erasing,
warm-up + cosine, optional EMA; Accelerate for devices, precision,
accumulation and processes; exact resume from the run directory. The result is
``RUN_DIR/classifier.safetensors`` whose header rebuilds it (``maevit eval``),
and which timm loads strictly where the family has a timm twin.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from maevit.config import ConfigError, fill_unset
from maevit.data.transforms import DEFAULT_MAX_PIXELS
from maevit.models import create_classifier, family_defaults
from maevit.models.classifier import resolve_architecture
from maevit.models.weights import header_of, save_weights, timm_load_line
from maevit.train import runs, throughput
from maevit.train.common import (
    IMAGENET_MEAN, IMAGENET_STD, RunBase, StepGuard, TrainingInterrupted, batches_from, building_model,
    check_resumable, describe_data, labeled_for_rank, log_memory_estimate, make_accelerator, num_classes_of,
    plan_schedule, progress_bar,
    report_progress, resolve_num_workers, resolve_run_precision, run_recipe_command, start_trackers, stop_requested,
)
from maevit.train.curves import FINETUNE_PANELS, save_run_curves
from maevit.train.distill import DistillConfig, build_teacher
from maevit.train.evaluate import evaluate_classifier
from maevit.train.optim import build_adamw, param_groups_layer_decay

logger = logging.getLogger("maevit.finetune")

CLASSIFIER_FILE = "classifier.safetensors"


@dataclass
class ModelConfig:
    name: str | None = None  # registered name; None: the one `pretrained` names (required from scratch)
    pretrained: str | None = None  # RUN_DIR, encoder / classifier file, MAE .pth, HF / timm weights; None: scratch
    num_classes: int | None = None  # default: the number of classes in data.train
    global_pool: Literal["avg", "token"] = "avg"  # MAE fine-tuning: avg + fc_norm
    drop_path: float | None = None  # stochastic depth (MAE: B 0.1, L 0.2, H 0.3); None: the model's
    img_size: int = 224  # fine-tuning resolution; pretrained position tables are resampled
    patch_size: int | None = None  # shorthand for args.patch_size (models built from scratch)
    args: dict[str, Any] = field(default_factory=dict)  # encoder arguments on top of the file's (see `maevit models`)
    strict: bool = True  # every encoder weight must come from `pretrained` (head / fc_norm are new)

    def overrides(self) -> dict[str, Any]:
        """Encoder arguments: ``args`` plus the shorthands that are set."""
        out = dict(self.args, img_size=self.img_size, drop_path_rate=self.drop_path)
        if self.patch_size is not None:
            out["patch_size"] = self.patch_size
        return out


@dataclass
class DataConfig:
    train: str = ""  # shard dir / pattern, class-per-folder tree, or "bundled[:split]"
    val: str | None = None  # evaluated after every `run.eval_every` epochs; None = no evaluation
    batch_size: int = 32  # per process (MAE: 1024 in all = 32 x 32 GPUs)
    num_workers: int | None = None  # loader processes per rank; None: min(4, CPUs per process - 1)
    label_fraction: float | None = None  # e.g. 0.1: a fixed, class-balanced subset of the labels
    label_seed: int = 0  # picks that subset (independent of run.seed, so all runs share it)
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # RandAugment m9 (timm spec); None = off
    re_prob: float = 0.25  # random erasing
    mixup: float = 0.8  # mixup alpha (0 = off)
    cutmix: float = 1.0  # cutmix alpha (0 = off)
    smoothing: float = 0.1  # label smoothing
    mean: tuple[float, float, float] = IMAGENET_MEAN  # input normalisation: use the pretraining's
    std: tuple[float, float, float] = IMAGENET_STD
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # larger images are skipped and counted (64 MP); None: no limit

    def validate(self) -> None:
        if self.label_fraction is not None and not 0.0 < self.label_fraction <= 1.0:
            raise ConfigError(f"data.label_fraction must be in (0, 1], got {self.label_fraction}")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ConfigError(f"data.batch_size={self.batch_size}: mixup / cutmix need an even per-process batch")


@dataclass
class OptimConfig:
    epochs: int = 100  # length of the schedule (MAE: B 100, L / H 50)
    base_lr: float = 5e-4  # peak lr = base_lr x effective batch / 256 (MAE ViT-B: 5e-4)
    layer_decay: float | None = None  # lr factor per block / stage (MAE: B 0.65, L / H 0.75); 1.0 = off; None: the model's
    layer_decay_by: Literal["block", "stage"] | None = None  # layer-decay groups; None: the model's
    layer_decay_exempt: list[str] | None = None  # parameter patterns at the full lr (e.g. a CNN stem); None: the model's
    weight_decay: float = 0.05  # not on biases, norms, position tables, tokens
    warmup_epochs: float = 5.0  # linear warm-up, then per-step cosine decay
    min_lr: float = 1e-6  # the lr at the end of the cosine
    accum_steps: int = 1  # gradient accumulation (effective batch = batch x processes x this)
    clip_grad: float | None = None  # max gradient norm; None = no clipping (MAE)
    max_steps: int | None = None  # stop early after this many optimizer steps (same schedule)

    def validate(self) -> None:
        if self.accum_steps < 1:
            raise ConfigError(f"optim.accum_steps must be >= 1, got {self.accum_steps}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")


@dataclass
class RunConfig(RunBase):
    dir: str = "runs/finetune"
    log_every: int = 20
    ema: float | None = None  # EMA decay of the weights (e.g. 0.9999); None = off
    ckpt_every: int = 0  # optimizer steps between checkpoints; 0 = at the end of every epoch
    eval_every: int = 1  # epochs between evaluations on data.val


@dataclass
class FinetuneConfig:
    """Everything ``maevit finetune`` reads; a recipe YAML states only what differs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)  # a teacher (DeiT distillation); off by default


def build_criterion(cfg: DataConfig, num_classes: int):
    """(mixup_fn or None, loss): timm's Mixup + SoftTargetCrossEntropy, else label smoothing."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.mixup > 0 or cfg.cutmix > 0:
        mix = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                    num_classes=num_classes)
        return mix, SoftTargetCrossEntropy()  # smoothing is inside the mixed targets
    if cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return None, nn.CrossEntropyLoss()


def classifier_header(model: nn.Module, class_names: list[str], mean, std) -> dict[str, Any]:
    """The header of a classifier file: architecture, classes, pooling, input normalisation."""
    return header_of(model, "classifier", class_names=list(class_names), mean=list(mean), std=list(std))


def export_classifier(model: nn.Module, path: str | Path, header: dict[str, Any]) -> Path:
    """Write a classifier's weights with its header (atomic)."""
    return save_weights(model.state_dict(), path, header)


def _ema_path(run: runs.RunDir, step: int) -> Path:
    # EMA weights beside the checkpoint as safetensors: Accelerate's register_for_checkpointing
    # would pickle them (and unpickle with weights_only=False on resume)
    return run.checkpoints_dir / f"ema-{step:08d}.safetensors"


def _evaluate(acc, model, ema, val_loader, num_classes: int) -> tuple[Any, dict[str, float]]:
    result = evaluate_classifier(acc.unwrap_model(model), val_loader, num_classes, accelerator=acc)
    row = {f"val_{k}": v for k, v in result.summary().items()}
    if ema is not None:
        row.update({f"val_ema_{k}": v for k, v in
                    evaluate_classifier(ema.module, val_loader, num_classes, accelerator=acc).summary().items()})
    return result, row


def _model_name(m: ModelConfig) -> str | None:
    """The model to fine-tune: ``model.name``, else the one ``model.pretrained`` names (None if unknown yet)."""
    try:
        return resolve_architecture(m.name, m.pretrained)[0]
    except Exception:  # noqa: BLE001  building the model reports what is wrong
        return m.name


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune (or resume) a classifier as ``cfg`` says; returns a summary.

    Returns:
        ``{"step", "epoch", "loss", "top1", "top5", "losses", "run_dir", "classifier", "resumed_from"}``;
        ``losses`` are this call's per-step training losses (rank-mean), ``top1`` / ``top5``
        the last evaluation (None without ``data.val``).
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env, set_seed
    from timm.utils import ModelEmaV3

    cfg = fill_unset(cfg, family_defaults(_model_name(cfg.model), "finetune"))  # the model's settings where unset
    d, o, m = cfg.data, cfg.optim, cfg.model
    if not d.train:
        raise ConfigError("data.train is not set: pass data.train=SHARDS_OR_FOLDER (or data.train=bundled:train)")
    ranks = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # the processes the Accelerator will share
    set_seed(cfg.run.seed)  # same init on every rank; numpy / random for Mixup too
    common = dict(img_size=m.img_size, batch_size=d.batch_size, num_workers=resolve_num_workers(d.num_workers),
                  seed=cfg.run.seed, mean=d.mean, std=d.std, max_pixels=d.max_pixels)
    train_loader = labeled_for_rank(d.train, ranks, train=True, label_fraction=d.label_fraction,
                                    label_seed=d.label_seed, auto_augment=d.auto_augment, re_prob=d.re_prob, **common)
    val_loader = labeled_for_rank(d.val, ranks, train=False, **common) if d.val else None
    num_classes = num_classes_of(m.num_classes, train_loader)
    class_names = list(getattr(train_loader, "class_names", None) or [])
    with building_model():
        model = create_classifier(m.name, num_classes, pretrained=m.pretrained, global_pool=m.global_pool,
                                  strict=m.strict, **m.overrides())
    precision = resolve_run_precision(  # auto: bf16 where native and this model's step is faster (global RNG kept)
        cfg.run, speed_check=lambda: throughput.bf16_speedup(model, (3, *model.img_size)))
    acc = make_accelerator(precision, o.accum_steps, cfg.run.dir)
    check_resumable(cfg.run.dir, model, cfg, cfg.run.fresh)
    run, ckpt = runs.open_run(cfg.run.dir, acc, cfg, fresh=cfg.run.fresh)
    start_trackers(acc, cfg)
    logger.info("%s", model.load_report or f"model.pretrained is not set: training {model.model_name} from scratch")
    logger.info("%s", describe_data(train_loader, d.batch_size, acc.num_processes, d.label_fraction, d.label_seed))
    teacher = None  # frozen, outside the optimizer, the checkpoints and accelerator.prepare: rebuilt on resume
    if cfg.distill.enabled:
        teacher = build_teacher(cfg.distill, num_classes=num_classes, student_mean=d.mean, student_std=d.std,
                                device=acc.device)
        if hasattr(model, "set_distilled_training"):  # DeiT: training returns (class, distillation) logits
            model.set_distilled_training(True)
        logger.info("distilling from %s: %s, alpha %g%s", teacher.source, cfg.distill.type, cfg.distill.alpha,
                    "" if hasattr(model, "set_distilled_training") else " (one head: classic knowledge distillation)")

    eff_batch = d.batch_size * acc.num_processes * o.accum_steps
    sched = plan_schedule(epochs=o.epochs, batches_per_epoch=len(train_loader), accum_steps=o.accum_steps,
                          warmup_epochs=o.warmup_epochs, base_lr=o.base_lr, effective_batch=eff_batch,
                          min_lr=o.min_lr, max_steps=o.max_steps)
    if acc.is_main_process:
        log_memory_estimate(acc, model, (d.batch_size, model.in_chans, *model.img_size), precision)
    model.to(acc.device)
    meter = throughput.meter_for(  # FLOPs per image, peak, MFU
        model, (3, *model.img_size), acc.device, precision, num_processes=acc.num_processes, log=acc.is_main_process)
    optimizer = build_adamw(param_groups_layer_decay(model, o.weight_decay, o.layer_decay, by=o.layer_decay_by,
                                                    exempt=o.layer_decay_exempt), sched.peak_lr,
                            o.weight_decay, betas=(0.9, 0.999))
    ema = ModelEmaV3(model, decay=cfg.run.ema) if cfg.run.ema else None
    model, optimizer = acc.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    mixup_fn, criterion = build_criterion(d, num_classes)
    header = classifier_header(acc.unwrap_model(model), class_names, d.mean, d.std)

    state = {"step": 0, "epoch": 0, "batch": 0, "nonfinite_steps": 0, "precision": precision}  # kept on resume
    if ckpt is not None:
        state.update(runs.load_checkpoint(acc, ckpt))
        if ema is not None:
            from safetensors.torch import load_file

            ema.module.load_state_dict(load_file(str(_ema_path(run, state["step"]))))
    step, epoch, batch = state["step"], state["epoch"], state["batch"]
    skips = runs.SkipTally(acc, train_loader, state.get("skipped"))  # bad samples by kind, all ranks, since step 0
    metrics = runs.MetricsLogger(run.metrics_path, enabled=acc.is_main_process,
                                 resume_step=step if ckpt is not None else None)
    logger.info("fine-tuning %s: %d classes, effective batch %d, peak lr %.3g after %d warm-up steps, %d steps/epoch, "
                "%d steps%s", model.model_name if hasattr(model, "model_name") else m.name, num_classes, eff_batch,
                sched.peak_lr, sched.warmup_steps, sched.steps_per_epoch, sched.total_steps,
                f" (stopping at {sched.last_step})" if sched.last_step < sched.total_steps else "")

    def checkpoint() -> None:
        state.update(step=step, epoch=epoch, batch=batch, nonfinite_steps=int(guard.bad_total.item()),
                     skipped=skips.totals(), model=header)
        if ema is not None and acc.is_main_process:
            save_weights(ema.module.state_dict(), _ema_path(run, step), header)
        runs.save_checkpoint(acc, run, step, state, keep_last=cfg.run.keep_last)
        if ema is not None and acc.is_main_process:  # drop EMA files of removed checkpoints
            kept = {runs.checkpoint_step(p) for p in run.checkpoints()}
            for p in run.checkpoints_dir.glob("ema-*.safetensors"):
                if int(p.stem.split("-")[1]) not in kept:
                    p.unlink()
        if acc.is_main_process:
            save_run_curves(run.root, FINETUNE_PANELS)

    guard = StepGuard(acc.device, state["nonfinite_steps"])
    advice = (f"Try a lower optim.base_lr (now {o.base_lr}), optim.clip_grad=1.0, or run.precision=fp32; then resume "
              f"from the last checkpoint in {cfg.run.dir}.")
    losses: list[float] = []
    result, t0, step_t0 = None, time.perf_counter(), step
    bar = progress_bar(cfg.run.progress and acc.is_main_process, sched.last_step, step)
    batches_per_epoch = sched.steps_per_epoch * o.accum_steps  # a ragged tail of micro-batches is skipped
    stopping = False
    while step < sched.last_step and not stopping:
        model.train()
        for x, y in meter.timed(batches_from(train_loader, epoch, batch)):  # data-wait time
            x, y = x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)  # [B,C,H,W], [B]
            if mixup_fn is not None:
                x, y = mixup_fn(x, y)  # y: [B, num_classes] soft targets
            with acc.accumulate(model):
                with acc.autocast():  # the teacher, too, runs at the run's precision, on the same mixed images
                    out = model(x)
                    loss = criterion(out, y) if teacher is None else cfg.distill.loss(out, y, teacher(x), criterion)
                acc.backward(loss)
                guard.add_loss(loss)
                guard.step(acc, optimizer, params, sched.lr(step), o.clip_grad)
            batch = train_loader.state_dict()["batch"]
            if not acc.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if ema is not None:
                ema.update(acc.unwrap_model(model), step=step)
            if step % cfg.run.log_every == 0 or step == sched.last_step:
                row = guard.read(acc, cfg.run.max_nonfinite, advice)
                losses.append(row["loss"])
                rate = eff_batch * (step - step_t0) / (time.perf_counter() - t0)
                row.update(epoch=round(epoch + batch / len(train_loader), 4), lr=optimizer.param_groups[-1]["lr"],
                           images_per_sec=round(rate, 2), **meter.fields(rate))  # tflops, mfu, data_wait
                skipped = skips.totals()
                metrics.log(step, **row, skipped=skipped)
                acc.log({**{f"train/{k}": v for k, v in row.items() if v is not None},
                         **{f"train/skipped_{k}": v for k, v in skipped.items()}}, step=step)
                if acc.is_main_process:
                    report_progress(bar, step, sched.last_step, epoch=row["epoch"], loss=row["loss"], lr=row["lr"],
                                    img_s=rate)
                t0, step_t0 = time.perf_counter(), step
            # Ctrl-C on any rank: every rank saves and stops after this step (at the last step: the run ends anyway)
            stopping = stop_requested(acc) and step < sched.last_step
            if (cfg.run.ckpt_every and step % cfg.run.ckpt_every == 0) or step == sched.last_step or stopping:
                checkpoint()
            if stopping or step >= sched.last_step or batch >= batches_per_epoch:
                break
        else:
            batch = batches_per_epoch  # the stream ended
        if stopping or batch < batches_per_epoch:
            break  # Ctrl-C, or stopped inside the epoch (optim.max_steps)
        epoch, batch = epoch + 1, 0
        if val_loader is not None and (epoch % cfg.run.eval_every == 0 or step >= sched.last_step):
            result, row = _evaluate(acc, model, ema, val_loader, num_classes)
            metrics.log(step, epoch=epoch, **row)
            acc.log({f"val/{k[4:]}": v for k, v in row.items()}, step=step)
            logger.info("epoch %d step %d: val top-1 %.2f%%  top-5 %.2f%%", epoch, step, result.top1, result.top5)
        if not cfg.run.ckpt_every and step < sched.last_step:
            checkpoint()  # epoch boundary (the last step is saved inside the loop)
    bar.close()
    metrics.close()
    skipped = skips.report()
    if stopping:
        acc.end_training()
        run.unlock()
        raise TrainingInterrupted(step, run.checkpoints_dir / f"{runs.CKPT_PREFIX}{step:08d}")

    if val_loader is not None and result is None:  # stopped mid-epoch or resumed at the end
        result, _ = _evaluate(acc, model, None, val_loader, num_classes)
    out_path = run.root / CLASSIFIER_FILE
    if acc.is_main_process:
        export_classifier(acc.unwrap_model(model), out_path, header)
        if ema is not None:
            export_classifier(ema.module, run.root / "classifier_ema.safetensors", header)
        save_run_curves(run.root, FINETUNE_PANELS)
    acc.wait_for_everyone()
    acc.end_training()
    run.unlock()
    return {
        "step": step, "epoch": epoch, "loss": losses[-1] if losses else float("nan"), "losses": losses,
        "skipped": skipped,
        "top1": result.top1 if result else None, "top5": result.top5 if result else None,
        **({f"top1_{h}": v for h, v in result.head_top1.items()} if result else {}),
        "run_dir": str(run.root), "classifier": str(out_path), "resumed_from": str(ckpt) if ckpt else None,
        "num_processes": acc.num_processes, "timm_line": timm_load_line(header, out_path),
        "curves": str(run.root / "curves.png") if (run.root / "curves.png").is_file() else None,
    }


def _summary(r: dict[str, Any]) -> str:
    lines = [f"fine-tuning done at step {r['step']} (last logged loss {r['loss']:.4f})"]
    if r["top1"] is not None:
        lines.append(f"  validation       top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%")
        heads = [f"{k[5:]} head {v:.2f}%" for k, v in r.items() if k.startswith("top1_")]
        if heads:
            lines.append(f"  each head top-1  {', '.join(heads)} (the top-1 above averages them)")
    lines += [f"  run directory    {r['run_dir']}", f"  classifier       {r['classifier']}"]
    if r.get("curves"):
        lines.append(f"  curves           {r['curves']}")
    if r.get("timm_line"):
        lines.append(f"  in timm          {r['timm_line']}")
    lines.append(f"next: maevit eval {r['run_dir']} --data LABELED_VAL   (per-class accuracy, confusion matrix)")
    return "\n".join(lines)


def main_finetune(argv: list[str] | None = None) -> int:
    """``maevit finetune [RECIPE.yaml] [key=value ...] [--label-fraction F]``."""
    return run_recipe_command("maevit finetune", "Fine-tune a pretrained encoder for classification.",
                              FinetuneConfig, finetune, argv, summary=_summary, label_fraction_flag=True,
                              epilog="example: maevit finetune finetune/cifar10_vit_tiny.yaml model.pretrained=RUN_DIR "
                                     "data.train=cifar10/train data.val=cifar10/test --label-fraction 0.1")


if __name__ == "__main__":
    sys.exit(main_finetune())
