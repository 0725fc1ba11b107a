"""Fine-tuning, linear probing and evaluation of pretrained encoders.

``maevit finetune``: the published MAE recipe through timm -- a ViT classifier
with average pooling + ``fc_norm``, layer-wise lr decay, drop path, mixup /
cutmix with label smoothing, RandAugment + random erasing, warm-up + cosine,
optional EMA; Accelerate for devices, precision, accumulation and processes;
exact resume from the run directory. The result is
``RUN_DIR/classifier.safetensors``, loadable by ``timm.create_model(arch,
num_classes=N, ...)`` strictly (arch and sizes are in the file's metadata).

``maevit probe``: frozen encoder, class token -> BatchNorm1d(affine=False) ->
Linear, LARS (base lr 0.1, no weight decay), as published.

``maevit eval``: top-1, top-5, per-class accuracy and a confusion matrix
(printed and saved as PNG), every labeled sample counted once across processes.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

from maevit.config import ConfigError, load_config, to_dict
from maevit.models.classifier import create_classifier, timm_name_for
from maevit.train import runs, throughput
from maevit.train.evaluate import evaluate_classifier, format_report, save_confusion_png
from maevit.train.optim import cosine_lr, param_groups_layer_decay, scaled_lr, set_lr

logger = logging.getLogger(__name__)

CLASSIFIER_FILE = "classifier.safetensors"


# ----------------------------------------------------------------------------- configs
@dataclass
class ModelConfig:
    name: str = "mae_vit_base_patch16"  # maevit MAE name or timm ViT / DeiT name
    pretrained: str | None = None  # RUN_DIR, encoder.safetensors, MAE .pth, HF / timm weights; None = scratch
    num_classes: int | None = None  # default: the number of classes in data.train
    global_pool: Literal["avg", "token"] = "avg"  # MAE fine-tuning: avg + fc_norm
    drop_path: float = 0.1  # stochastic depth (MAE: B 0.1, L 0.2, H 0.3)
    img_size: int = 224  # fine-tuning resolution; pretrained position tables are resampled
    patch_size: int | None = None  # default: the checkpoint's, else the name's
    allow_missing: list[str] = field(default_factory=list)  # key prefixes that may be absent from `pretrained`
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model args (e.g. depth: 6)


@dataclass
class DataConfig:
    train: str = ""  # shard dir / pattern, class-per-folder tree, or "bundled[:split]"
    val: str | None = None  # evaluated after every `run.eval_every` epochs; None = no evaluation
    batch_size: int = 32  # per process (MAE: 1024 in all = 32 x 32 GPUs)
    num_workers: int = 2
    label_fraction: float | None = None  # e.g. 0.1: a fixed, class-balanced subset of the labels
    label_seed: int = 0  # picks that subset (independent of run.seed, so all runs share it)
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # RandAugment m9 (timm spec); None = off
    re_prob: float = 0.25  # random erasing
    mixup: float = 0.8  # mixup alpha (0 = off)
    cutmix: float = 1.0  # cutmix alpha (0 = off)
    smoothing: float = 0.1  # label smoothing
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # input normalisation: use the pretraining's
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def validate(self) -> None:
        if self.label_fraction is not None and not 0.0 < self.label_fraction <= 1.0:
            raise ConfigError(f"data.label_fraction must be in (0, 1], got {self.label_fraction}")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ConfigError(f"data.batch_size={self.batch_size}: mixup / cutmix need an even per-process batch")


@dataclass
class OptimConfig:
    epochs: int = 100
    base_lr: float = 5e-4  # peak lr = base_lr x effective batch / 256 (MAE ViT-B: 5e-4)
    layer_decay: float = 0.65  # per-block lr factor (MAE: B 0.65, L / H 0.75); 1.0 = off
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    min_lr: float = 1e-6
    accum_steps: int = 1  # gradient accumulation (effective batch = batch x processes x this)
    clip_grad: float | None = None  # max gradient norm; None = no clipping (MAE)
    max_steps: int | None = None  # stop early after this many optimizer steps (same schedule)

    def validate(self) -> None:
        if self.accum_steps < 1:
            raise ConfigError(f"optim.accum_steps must be >= 1, got {self.accum_steps}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")


@dataclass
class RunConfig:
    dir: str = "runs/finetune"
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 where native and faster, else fp32
    ema: float | None = None  # EMA decay of the weights (e.g. 0.9999); None = off
    log_every: int = 20  # optimizer steps between metric rows
    ckpt_every: int = 0  # optimizer steps between checkpoints; 0 = at the end of every epoch
    eval_every: int = 1  # epochs between evaluations on data.val
    keep_last: int = 2
    fresh: bool = False  # start over (an existing run is moved aside, never deleted)


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ----------------------------------------------------------------------------- helpers
def _accelerator(precision: str, accum_steps: int = 1, run_dir: str | None = None, fresh: bool = False):
    from accelerate import Accelerator

    choice = throughput.resolve_precision(precision, run_dir, fresh=fresh)  # [throughput] auto -> bf16 / fp32
    if precision == "auto":
        logger.info("precision auto -> %s", choice)
    return Accelerator(
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[choice.precision],
        gradient_accumulation_steps=accum_steps,
    )


def _labeled(source: str, acc, *, img_size: int, batch_size: int, train: bool, num_workers: int, seed: int,
             label_fraction: float | None = None, label_seed: int = 0, **transform):
    """This rank's labeled stream (already split by rank: never passed to accelerator.prepare)."""
    from maevit.data.stream import labeled_loader

    return labeled_loader(
        source, img_size=img_size, batch_size=batch_size, train=train, num_workers=num_workers, seed=seed,
        rank=acc.process_index, world_size=acc.num_processes, label_fraction=label_fraction, label_seed=label_seed,
        **transform,
    )


def _num_classes(cfg_value: int | None, loader) -> int:
    names = getattr(loader, "class_names", None)
    if cfg_value is None:
        if not names:
            raise ConfigError("model.num_classes is not set and the training data has no class names; set it")
        return len(names)
    if names and len(names) > cfg_value:
        raise ConfigError(f"model.num_classes={cfg_value} but the data has {len(names)} classes")
    return cfg_value


def export_classifier(model: nn.Module, path: str | Path, meta: dict[str, Any]) -> Path:
    """Write a classifier's weights (timm names) as safetensors, with build metadata.

    ``meta`` (arch, num_classes, img_size, patch_size, global_pool, class names)
    goes into the safetensors header, so ``maevit eval`` can rebuild the model;
    timm ignores it and loads the tensors strictly.
    """
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {k: json.dumps(v) for k, v in meta.items()}
    path = Path(path)
    try:
        from maevit.train.checkpoint import atomic_write

        atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata=header))
    except ImportError:  # stream A's helper missing: same thing inline
        tmp = path.with_name(f"{path.name}.tmp")
        save_file(sd, str(tmp), metadata=header)
        tmp.replace(path)
    return path


def read_classifier_meta(path: str | Path) -> dict[str, Any]:
    """The metadata :func:`export_classifier` stored (empty for other files)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, json.JSONDecodeError):
            out[k] = v
    return out


def _ema_path(run: runs.RunDir, step: int) -> Path:
    # EMA weights beside the checkpoint as safetensors: Accelerate's register_for_checkpointing
    # would pickle them (and unpickle with weights_only=False on resume)
    return run.checkpoints_dir / f"ema-{step:08d}.safetensors"


# ----------------------------------------------------------------------------- fine-tuning
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


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune (or resume) a classifier as ``cfg`` says; returns a summary.

    Returns:
        ``{"step", "epoch", "loss", "top1", "top5", "losses", "run_dir", "classifier", "resumed_from"}``;
        ``losses`` are this call's per-step training losses (rank-mean), ``top1`` / ``top5``
        the last evaluation (None without ``data.val``).
    """
    from accelerate.utils import set_seed
    from timm.utils import ModelEmaV3

    if not cfg.data.train:
        raise ConfigError("data.train is not set: pass data.train=SHARDS_OR_FOLDER (or data.train=bundled:train)")
    acc = _accelerator(cfg.run.precision, cfg.optim.accum_steps, cfg.run.dir, cfg.run.fresh)
    run, ckpt = runs.open_run(cfg.run.dir, acc, cfg, fresh=cfg.run.fresh)
    set_seed(cfg.run.seed)  # same init on every rank; numpy / random for Mixup too
    d, o = cfg.data, cfg.optim
    train_loader = _labeled(d.train, acc, img_size=cfg.model.img_size, batch_size=d.batch_size, train=True,
                            num_workers=d.num_workers, seed=cfg.run.seed, label_fraction=d.label_fraction,
                            label_seed=d.label_seed, auto_augment=d.auto_augment, re_prob=d.re_prob,
                            mean=d.mean, std=d.std)
    val_loader = None
    if d.val:
        val_loader = _labeled(d.val, acc, img_size=cfg.model.img_size, batch_size=d.batch_size, train=False,
                              num_workers=d.num_workers, seed=cfg.run.seed, mean=d.mean, std=d.std)
    num_classes = _num_classes(cfg.model.num_classes, train_loader)
    class_names = list(getattr(train_loader, "class_names", None) or [])

    model = create_classifier(
        cfg.model.name, num_classes, pretrained=cfg.model.pretrained, img_size=cfg.model.img_size,
        patch_size=cfg.model.patch_size, global_pool=cfg.model.global_pool, drop_path_rate=cfg.model.drop_path,
        allow_missing=tuple(cfg.model.allow_missing), **cfg.model.timm_kwargs,
    )
    if model.load_report is not None and acc.is_main_process:
        logger.info("%s", model.load_report)
    elif acc.is_main_process:
        logger.info("model.pretrained is not set: training %s from scratch", cfg.model.name)

    accum = o.accum_steps
    eff_batch = d.batch_size * acc.num_processes * accum
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch < 1:
        raise ConfigError(
            f"{len(train_loader)} batches per epoch is less than optim.accum_steps={accum}: "
            f"lower data.batch_size or accum_steps"
        )
    total_steps = o.epochs * steps_per_epoch
    last_step = min(total_steps, o.max_steps or total_steps)
    peak_lr = scaled_lr(o.base_lr, eff_batch)
    warmup = round(o.warmup_epochs * steps_per_epoch)
    model.to(acc.device)
    meter = throughput.meter_for(  # [throughput] FLOPs per image, peak, MFU
        model, (3, cfg.model.img_size, cfg.model.img_size), acc.device,
        {"no": "fp32"}.get(acc.mixed_precision, acc.mixed_precision), num_processes=acc.num_processes,
        log=acc.is_main_process)
    optimizer = torch.optim.AdamW(param_groups_layer_decay(model, o.weight_decay, o.layer_decay),
                                  lr=peak_lr, betas=(0.9, 0.999))
    ema = ModelEmaV3(model, decay=cfg.run.ema) if cfg.run.ema else None
    model, optimizer = acc.prepare(model, optimizer)
    mixup_fn, criterion = build_criterion(d, num_classes)

    state = {"step": 0, "epoch": 0, "batch": 0,
             "precision": {"no": "fp32"}.get(acc.mixed_precision, acc.mixed_precision)}  # [throughput] for resume
    if ckpt is not None:
        state.update(runs.load_checkpoint(acc, ckpt))
        if ema is not None:
            from safetensors.torch import load_file

            ema.module.load_state_dict(load_file(str(_ema_path(run, state["step"]))))
    step, epoch, batch = state["step"], state["epoch"], state["batch"]
    metrics = runs.MetricsLogger(run.metrics_path, enabled=acc.is_main_process,
                                 resume_step=step if ckpt is not None else None)
    if acc.is_main_process:
        logger.info("fine-tuning %s: %d classes, effective batch %d, lr %.3g, %d steps/epoch, %d steps",
                    cfg.model.name, num_classes, eff_batch, peak_lr, steps_per_epoch, total_steps)

    def checkpoint() -> None:
        state.update(step=step, epoch=epoch, batch=batch)
        if ema is not None and acc.is_main_process:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in ema.module.state_dict().items()}, str(_ema_path(run, step)))
        runs.save_checkpoint(acc, run, step, state, keep_last=cfg.run.keep_last)
        if ema is not None and acc.is_main_process:  # drop EMA files of removed checkpoints
            kept = {runs.checkpoint_step(p) for p in run.checkpoints()}
            for p in run.checkpoints_dir.glob("ema-*.safetensors"):
                if int(p.stem.split("-")[1]) not in kept:
                    p.unlink()

    losses: list[torch.Tensor] = []  # device scalars: read back at log time, not every step
    loss_acc, t0, step_t0 = torch.zeros((), device=acc.device), time.perf_counter(), step
    per_epoch = steps_per_epoch * accum  # batches used per epoch (a ragged tail is skipped)
    result = None
    while step < last_step:
        train_loader.set_epoch(epoch)
        if batch:
            train_loader.skip_batches(batch)  # mid-epoch resume: same data as an uninterrupted run
        model.train()
        for x, y in meter.timed(train_loader):  # [throughput] data-wait time
            if batch >= per_epoch:
                break
            x, y = x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)  # [B,C,H,W], [B]
            if mixup_fn is not None:
                x, y = mixup_fn(x, y)  # y: [B, num_classes] soft targets
            batch += 1
            with acc.accumulate(model):
                with acc.autocast():
                    loss = criterion(model(x), y)
                acc.backward(loss)
                if acc.sync_gradients:
                    set_lr(optimizer, cosine_lr(step, base_lr=peak_lr, warmup_steps=warmup,
                                                total_steps=total_steps, min_lr=o.min_lr))
                    if o.clip_grad:
                        acc.clip_grad_norm_(model.parameters(), o.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_acc += loss.detach().float() / accum
            if not acc.sync_gradients:
                continue
            step += 1
            losses.append(acc.reduce(loss_acc.clone(), "mean"))
            loss_acc.zero_()
            if ema is not None:
                ema.update(acc.unwrap_model(model), step=step)
            if step % cfg.run.log_every == 0 or step == last_step:
                rate = eff_batch * (step - step_t0) / (time.perf_counter() - t0)
                metrics.log(step, epoch=round(epoch + batch / len(train_loader), 4), loss=losses[-1].item(),
                            lr=optimizer.param_groups[-1]["lr"], images_per_sec=round(rate, 2),
                            **meter.fields(rate))  # [throughput] tflops, mfu, data_wait
                t0, step_t0 = time.perf_counter(), step
            if (cfg.run.ckpt_every and step % cfg.run.ckpt_every == 0) or step == last_step:
                checkpoint()
            if step >= last_step:
                break
        if batch < per_epoch:
            break  # stopped inside the epoch (optim.max_steps)
        epoch, batch = epoch + 1, 0
        if val_loader is not None and (epoch % cfg.run.eval_every == 0 or step >= last_step):
            result = evaluate_classifier(acc.unwrap_model(model), val_loader, num_classes, accelerator=acc)
            row = {f"val_{k}": v for k, v in result.summary().items()}
            if ema is not None:
                ema_res = evaluate_classifier(ema.module, val_loader, num_classes, accelerator=acc)
                row.update({f"val_ema_{k}": v for k, v in ema_res.summary().items()})
            metrics.log(step, epoch=epoch, **row)
            if acc.is_main_process:
                logger.info("epoch %d step %d: val top-1 %.2f%%  top-5 %.2f%%", epoch, step, result.top1, result.top5)
        if not cfg.run.ckpt_every and step < last_step:
            checkpoint()  # epoch boundary (the last step is saved inside the loop)
    metrics.close()
    losses = [v.item() for v in losses]

    if val_loader is not None and result is None:  # stopped mid-epoch or resumed at the end
        result = evaluate_classifier(acc.unwrap_model(model), val_loader, num_classes, accelerator=acc)
    out_path = run.root / CLASSIFIER_FILE
    meta = dict(arch=timm_name_for(cfg.model.name), num_classes=num_classes, img_size=cfg.model.img_size,
                patch_size=int(acc.unwrap_model(model).patch_embed.proj.weight.shape[-1]),
                in_chans=int(acc.unwrap_model(model).patch_embed.proj.weight.shape[1]),
                global_pool=cfg.model.global_pool, class_names=class_names,
                timm_kwargs=cfg.model.timm_kwargs, mean=list(d.mean), std=list(d.std))
    if acc.is_main_process:
        export_classifier(acc.unwrap_model(model), out_path, meta)
        if ema is not None:
            export_classifier(ema.module, run.root / "classifier_ema.safetensors", meta)
        logger.info("done: step %d, classifier weights in %s", step, out_path)
    acc.wait_for_everyone()
    return {
        "step": step, "epoch": epoch, "loss": losses[-1] if losses else float("nan"), "losses": losses,
        "top1": result.top1 if result else None, "top5": result.top5 if result else None,
        "run_dir": str(run.root), "classifier": str(out_path), "resumed_from": str(ckpt) if ckpt else None,
        "num_processes": acc.num_processes,
    }


# ----------------------------------------------------------------------------- linear probe
@dataclass
class ProbeModelConfig:
    name: str = "mae_vit_base_patch16"
    pretrained: str | None = None  # None = a randomly initialised encoder (a baseline)
    global_pool: Literal["token", "avg"] = "token"  # MAE's probe uses the class token
    img_size: int = 224
    patch_size: int | None = None
    num_classes: int | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model args


@dataclass
class ProbeDataConfig:
    train: str = ""
    val: str | None = None
    batch_size: int = 256  # per process (MAE: 16384 in all)
    num_workers: int = 2
    label_fraction: float | None = None
    label_seed: int = 0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    augment: bool = False  # RandomResizedCrop + flip each epoch (published); False: features computed once


@dataclass
class ProbeOptimConfig:
    epochs: int = 90
    # LARS peak lr, the same at every batch size: the published 0.1 x 16384 / 256. LARS's trust
    # ratio sets each layer's step from |w| / |grad|, so scaling the lr down with the batch (as
    # for AdamW) starves small-batch probes (CIFAR-10 at batch 256: 35.6% at 0.1, 52.4% at 10)
    lr: float = 6.4
    weight_decay: float = 0.0
    warmup_epochs: float = 10.0
    min_lr: float = 0.0


@dataclass
class ProbeRunConfig:
    dir: str = "runs/probe"
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    fresh: bool = True  # probes are short; a rerun starts over (the old one is moved aside)


@dataclass
class ProbeConfig:
    model: ProbeModelConfig = field(default_factory=ProbeModelConfig)
    data: ProbeDataConfig = field(default_factory=ProbeDataConfig)
    optim: ProbeOptimConfig = field(default_factory=ProbeOptimConfig)
    run: ProbeRunConfig = field(default_factory=ProbeRunConfig)


class LinearProbe(nn.Module):
    """Frozen encoder -> pooled feature -> BatchNorm1d(affine=False) -> Linear (MAE's probe).

    The parameter-free BatchNorm whitens the features, which makes the probe
    insensitive to the feature scale (MAE features are not normalised).
    """

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        dim = encoder.num_features
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout / drop path, whatever the mode
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            from maevit.train.knn import encoder_features

            return encoder_features(self.encoder, x)  # [B, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # [B, num_classes]


def build_lars(head: nn.Module, lr: float, weight_decay: float = 0.0):
    """timm's LARS with MAE's rule: trust-ratio scaling for matrices only, momentum 0.9.

    timm adapts only where weight decay is non-zero unless ``always_adapt``;
    MAE's LARS adapts every >1-D parameter regardless (and leaves biases alone).
    """
    from timm.optim import Lars

    mats = [p for p in head.parameters() if p.requires_grad and p.ndim > 1]
    vecs = [p for p in head.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": mats, "always_adapt": True, "weight_decay": weight_decay},
              {"params": vecs, "always_adapt": False, "weight_decay": 0.0}]
    return Lars([g for g in groups if g["params"]], lr=lr, momentum=0.9)


def train_linear_head(
    head: nn.Module,
    batches,
    *,
    epochs: int,
    steps_per_epoch: int,
    lr: float,
    warmup_epochs: float = 0.0,
    min_lr: float = 0.0,
    weight_decay: float = 0.0,
    on_epoch=None,
) -> list[float]:
    """Train a probe head with LARS + warm-up / cosine; ``batches(epoch)`` yields ``(feats, labels)``.

    Returns the mean loss of each epoch.
    """
    opt = build_lars(head, lr, weight_decay)
    total, warm = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)
    step, hist = 0, []
    for epoch in range(epochs):
        head.train()
        tot, n = 0.0, 0
        for f, y in batches(epoch):
            set_lr(opt, cosine_lr(step, base_lr=lr, warmup_steps=warm, total_steps=total, min_lr=min_lr))
            loss = nn.functional.cross_entropy(head(f), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            tot, n = tot + loss.item(), n + 1
        hist.append(tot / max(1, n))
        if on_epoch is not None:
            on_epoch(epoch, hist[-1])
    return hist


def probe(cfg: ProbeConfig) -> dict[str, Any]:
    """Linear probe of a frozen encoder; returns ``{"top1", "top5", "losses", ...}``.

    Without augmentation (``data.augment=false``, the default) the encoder runs
    once over the train set (no crop randomness, so features never change) and
    the head trains on the cached features: on a CPU this turns hours into
    minutes. Every process then trains the same head on all features with
    the same seed (the head is tiny), so no gradient sync is needed. With
    augmentation the features are recomputed every epoch (published setting)
    and the head is synchronised by DDP.
    """
    from accelerate.utils import set_seed

    from maevit.train.knn import extract_features

    if not cfg.data.train:
        raise ConfigError("data.train is not set: pass data.train=SHARDS_OR_FOLDER (or data.train=bundled:train)")
    acc = _accelerator(cfg.run.precision, run_dir=cfg.run.dir, fresh=cfg.run.fresh)
    run, _ = runs.open_run(cfg.run.dir, acc, cfg, fresh=cfg.run.fresh)
    set_seed(cfg.run.seed)
    d, o = cfg.data, cfg.optim
    common = dict(img_size=cfg.model.img_size, batch_size=d.batch_size, num_workers=d.num_workers, seed=cfg.run.seed,
                  mean=d.mean, std=d.std)
    train_loader = _labeled(d.train, acc, train=d.augment, label_fraction=d.label_fraction, label_seed=d.label_seed,
                            **common, **({"auto_augment": None, "re_prob": 0.0} if d.augment else {}))
    num_classes = _num_classes(cfg.model.num_classes, train_loader)
    encoder = create_classifier(cfg.model.name, 0, pretrained=cfg.model.pretrained, img_size=cfg.model.img_size,
                                patch_size=cfg.model.patch_size, global_pool=cfg.model.global_pool,
                                **cfg.model.timm_kwargs)
    if encoder.load_report is not None and acc.is_main_process:
        logger.info("%s", encoder.load_report)
    model = LinearProbe(encoder, num_classes).to(acc.device)
    metrics = runs.MetricsLogger(run.metrics_path, enabled=acc.is_main_process)
    log = lambda e, loss: metrics.log(e + 1, epoch=e + 1, loss=loss)  # noqa: E731

    if not d.augment:
        feats, labels = extract_features(model.encoder, train_loader, accelerator=acc)  # all ranks: all samples
        feats, labels = feats.to(acc.device), labels.to(acc.device)
        eff_batch = d.batch_size * acc.num_processes
        n = feats.shape[0]
        gen = torch.Generator().manual_seed(cfg.run.seed)
        steps = max(1, n // eff_batch)

        def batches(epoch: int):
            perm = torch.randperm(n, generator=gen).to(acc.device)
            for i in range(steps):
                idx = perm[i * eff_batch:(i + 1) * eff_batch]
                yield feats[idx], labels[idx]

        hist = train_linear_head(model.head, batches, epochs=o.epochs, steps_per_epoch=steps,
                                 lr=o.lr, warmup_epochs=o.warmup_epochs,
                                 min_lr=o.min_lr, weight_decay=o.weight_decay, on_epoch=log)
    else:
        head = acc.prepare(model.head)
        model.head = head

        def batches(epoch: int):
            train_loader.set_epoch(epoch)
            for x, y in train_loader:
                x, y = x.to(acc.device), y.to(acc.device)
                yield model.features(x), y

        hist = train_linear_head(head, batches, epochs=o.epochs, steps_per_epoch=len(train_loader),
                                 lr=o.lr,
                                 warmup_epochs=o.warmup_epochs, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                 on_epoch=log)
        model.head = acc.unwrap_model(head)
    out: dict[str, Any] = {"losses": hist, "top1": None, "top5": None, "run_dir": str(run.root),
                           "num_processes": acc.num_processes}
    if d.val:
        val_loader = _labeled(d.val, acc, train=False, **common)
        res = evaluate_classifier(model, val_loader, num_classes, accelerator=acc)
        out.update(top1=res.top1, top5=res.top5)
        metrics.log(o.epochs, **{f"val_{k}": v for k, v in res.summary().items()})
        if acc.is_main_process:
            logger.info("linear probe: val top-1 %.2f%%  top-5 %.2f%%", res.top1, res.top5)
    metrics.close()
    if acc.is_main_process:
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in model.head.state_dict().items()}, str(run.root / "probe_head.safetensors"))
    acc.wait_for_everyone()
    return out


# ----------------------------------------------------------------------------- evaluation
def load_classifier(path: str | Path, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a classifier from ``classifier.safetensors`` (or its run directory).

    The build arguments come from the file's metadata (written by
    :func:`export_classifier`); ``overrides`` (name, num_classes, img_size,
    patch_size, global_pool) fill in or replace them for other timm files.

    Raises:
        ValueError: the file lacks what is needed to rebuild it, or lacks a head.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CLASSIFIER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a fine-tuning RUN_DIR or a classifier .safetensors")
    meta = read_classifier_meta(path) if path.suffix == ".safetensors" else {}
    meta.update({k: v for k, v in overrides.items() if v is not None})
    name = meta.get("name") or meta.get("arch")
    if not name:
        raise ValueError(f"{path} has no maevit metadata: pass --model NAME (and --num-classes, --img-size)")
    from maevit.train.checkpoint import read_state_dict

    sd = read_state_dict(path)
    if "head.weight" not in sd:
        raise ValueError(f"{path} has no classification head (head.weight): fine-tune it first (maevit finetune)")
    model = create_classifier(
        name, meta.get("num_classes") or int(sd["head.weight"].shape[0]), pretrained=sd,
        img_size=meta.get("img_size", 224), patch_size=meta.get("patch_size"),
        global_pool=meta.get("global_pool") or ("avg" if "fc_norm.weight" in sd else "token"),
        **(meta.get("timm_kwargs") or {}),
    )
    if model.load_report.new:
        raise ValueError(f"{path}: {', '.join(model.load_report.new)} missing or of the wrong shape; "
                         f"check --num-classes / --global-pool")
    return model, meta


def main_eval(argv: list[str]) -> int:
    """``maevit eval CLASSIFIER --data VAL``: top-1 / top-5 / per-class / confusion matrix."""
    p = argparse.ArgumentParser(prog="maevit eval", description=main_eval.__doc__)
    p.add_argument("checkpoint", help="fine-tuning RUN_DIR or a classifier .safetensors")
    p.add_argument("--data", required=True, help="labeled source (shards, class folders, bundled:val)")
    p.add_argument("--model", default=None, help="model name (default: from the file's metadata)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--global-pool", choices=("avg", "token"), default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--out", default=None, help="where to write eval.json + confusion.png (default: beside the checkpoint)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    acc = _accelerator("fp32")
    model, meta = load_classifier(a.checkpoint, name=a.model, num_classes=a.num_classes, img_size=a.img_size,
                                  patch_size=a.patch_size, global_pool=a.global_pool)
    model.to(acc.device)
    loader = _labeled(a.data, acc, img_size=meta.get("img_size", 224) if a.img_size is None else a.img_size,
                      batch_size=a.batch_size, train=False, num_workers=a.num_workers, seed=0,
                      **{k: tuple(meta[k]) for k in ("mean", "std") if k in meta})
    num_classes = model.num_classes
    names = meta.get("class_names") or getattr(loader, "class_names", None) or None
    res = evaluate_classifier(model, loader, num_classes, accelerator=acc)
    if acc.is_main_process:
        print(format_report(res, names))
        ckpt = Path(a.checkpoint)
        out_dir = Path(a.out) if a.out else (ckpt if ckpt.is_dir() else ckpt.parent)
        out_dir.mkdir(parents=True, exist_ok=True)
        png = save_confusion_png(res.confusion, out_dir / "confusion.png", names)
        (out_dir / "eval.json").write_text(json.dumps({
            **res.summary(), "per_class": [None if math.isnan(v) else v for v in res.per_class.tolist()],
            "confusion": res.confusion.tolist(), "class_names": names, "data": a.data,
            "num_processes": acc.num_processes}, indent=1))
        print(f"confusion matrix: {png}\nmetrics: {out_dir / 'eval.json'}")
    acc.wait_for_everyone()
    return 0


# ----------------------------------------------------------------------------- command lines
def _recipe_args(prog: str, doc: str, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=doc)
    p.add_argument("recipe", nargs="?", default=None, help="recipe YAML (optional)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.epochs=10")
    p.add_argument("--label-fraction", type=float, default=None, help="= data.label_fraction (e.g. 0.1)")
    a = p.parse_args(argv)
    if a.recipe is not None and "=" in a.recipe:  # no recipe, only overrides
        a.overrides, a.recipe = [a.recipe, *a.overrides], None
    if a.label_fraction is not None:
        a.overrides.append(f"data.label_fraction={a.label_fraction}")
    return a


def _run_from_recipe(command: str, doc: str, cfg_cls: type, run: Callable, argv: list[str]) -> int:
    """Parse ``[RECIPE.yaml] [key=value ...]`` into ``cfg_cls`` and run it; config errors exit 2."""
    a = _recipe_args(command, doc, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(cfg_cls, a.recipe, a.overrides)
    except ConfigError as e:
        print(f"{command}: {e}", file=sys.stderr)
        return 2
    out = run(cfg)
    print(json.dumps({k: v for k, v in out.items() if k != "losses"}))
    return 0


def main_finetune(argv: list[str]) -> int:
    """``maevit finetune [RECIPE.yaml] [key=value ...] [--label-fraction F]``."""
    return _run_from_recipe("maevit finetune", main_finetune.__doc__, FinetuneConfig, finetune, argv)


def main_probe(argv: list[str]) -> int:
    """``maevit probe [RECIPE.yaml] [key=value ...] [--label-fraction F]`` (ProbeConfig keys)."""
    return _run_from_recipe("maevit probe", main_probe.__doc__, ProbeConfig, probe, argv)


__all__ = [
    "FinetuneConfig", "ProbeConfig", "finetune", "probe", "main_finetune", "main_probe", "main_eval",
    "export_classifier", "read_classifier_meta", "load_classifier", "LinearProbe", "build_lars",
    "train_linear_head", "build_criterion", "to_dict",
]
