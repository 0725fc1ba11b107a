"""Fine-tuning of pretrained encoders: ``maevit finetune [RECIPE.yaml] key=value ...``.

The published MAE recipe through timm: the pretrained encoder (any registered
family) plus a head, average pooling + ``fc_norm``, layer-wise lr decay, drop
path, mixup / cutmix with label smoothing, RandAugment + random erasing,
warm-up + cosine, optional EMA; Accelerate for devices, precision,
accumulation and processes; exact resume from the run directory. The result is
``RUN_DIR/classifier.safetensors`` whose header rebuilds it (``maevit eval``),
and which timm loads strictly where the family has a timm twin.

Fine-tuning is a task (:class:`FinetuneTask`) on the one training loop
(:mod:`maevit.train.engine`): the loss of a batch (with a teacher's term under
``distill.teacher``), evaluation at epoch ends and EMA as hooks, the classifier
file at the end.
"""
from __future__ import annotations

import logging
import sys
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
from maevit.models.contract import extra_heads
from maevit.train import runs
from maevit.train.command import building_model, run_recipe_command
from maevit.train.curves import FINETUNE_PANELS, save_run_curves
from maevit.train.distill import DistillConfig, UnlabeledImages, build_teacher, distillation_loss
from maevit.train.file_defaults import fill_from_weights
from maevit.train.engine import EmaHook, Hook, Loop, Setup, Task, fit, summary_fields
from maevit.train.evaluate import evaluate_classifier
from maevit.train.inputs import describe_data, label_args, labeled_for_rank, num_classes_of, stream_args
from maevit.train.memory import log_memory_estimate
from maevit.train.optim import build_adamw, param_groups_layer_decay
from maevit.train.perf import meter_for
from maevit.train.precision import make_accelerator, resolve_run_precision
from maevit.train.schedule import plan_for
from maevit.train.sections import AdamWSection, ClassifierModelSection, LabeledDataSection, RunBase

logger = logging.getLogger("maevit.finetune")

CLASSIFIER_FILE = runs.CLASSIFIER_FILE


@dataclass
class ModelConfig(ClassifierModelSection):
    KEY_ORDER = ("name", "pretrained", "num_classes", "global_pool", "drop_path", "img_size", "patch_size", "args",
                 "strict")

    name: str | None = None  # registered name; None: the one `pretrained` names (required from scratch)
    global_pool: Literal["avg", "token"] = "avg"  # MAE fine-tuning: avg + fc_norm
    drop_path: float | None = None  # stochastic depth (MAE: B 0.1, L 0.2, H 0.3); None: the model's
    img_size: int | None = None  # fine-tuning resolution; None: the one `pretrained` records (else 224)
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
class DataConfig(LabeledDataSection):
    KEY_ORDER = ("train", "val", "batch_size", "num_workers", "label_fraction", "label_seed", "auto_augment", "re_prob",
                 "mixup", "cutmix", "smoothing", "mean", "std", "max_pixels")

    val: str | None = None  # evaluated after every `run.eval_every` epochs; None = no evaluation
    batch_size: int = 32  # per process (MAE: 1024 in all = 32 x 32 GPUs)
    label_seed: int = 0  # picks that subset (independent of run.seed, so all runs share it)
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # RandAugment m9 (timm spec); None = off
    re_prob: float = 0.25  # random erasing
    mixup: float = 0.8  # mixup alpha (0 = off)
    cutmix: float = 1.0  # cutmix alpha (0 = off)
    smoothing: float = 0.1  # label smoothing
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # larger images are skipped and counted (64 MP); None: no limit

    def validate(self) -> None:
        if self.label_fraction is not None and not 0.0 < self.label_fraction <= 1.0:
            raise ConfigError(f"data.label_fraction must be in (0, 1], got {self.label_fraction}")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ConfigError(f"data.batch_size={self.batch_size}: mixup / cutmix need an even per-process batch")


@dataclass
class OptimConfig(AdamWSection):
    KEY_ORDER = ("epochs", "base_lr", "layer_decay", "layer_decay_by", "layer_decay_exempt", "weight_decay",
                 "warmup_epochs", "min_lr", "accum_steps", "clip_grad", "max_steps")

    epochs: int = 100  # length of the schedule (MAE: B 100, L / H 50)
    base_lr: float = 5e-4  # peak lr = base_lr x effective batch / 256 (MAE ViT-B: 5e-4)
    layer_decay: float | None = None  # lr factor per block / stage (MAE: B 0.65, L / H 0.75); 1.0 = off; None: the model's
    layer_decay_by: Literal["block", "stage"] | None = None  # layer-decay groups; None: the model's
    layer_decay_exempt: list[str] | None = None  # parameter patterns at the full lr (e.g. a CNN stem); None: the model's
    min_lr: float = 1e-6
    accum_steps: int = 1  # gradient accumulation (effective batch = batch x processes x this)
    clip_grad: float | None = None  # max gradient norm; None = no clipping (MAE)
    max_steps: int | None = None  # stop early after this many optimizer steps (same schedule)

    def validate(self) -> None:
        super().validate()
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


class FinetuneTask(Task):
    """Fine-tuning on the loop: cross-entropy with mixup / cutmix and label smoothing (plus a teacher's
    term when ``distill.teacher`` is set); evaluation at epoch ends and EMA as hooks; the classifier
    file as the result."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg

    def resolve(self, cfg: FinetuneConfig) -> FinetuneConfig:
        cfg = fill_from_weights(cfg)  # size and mean / std of the weights file unless set
        return fill_unset(cfg, family_defaults(_model_name(cfg.model), "finetune"))  # the model's settings

    def build(self):
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env, set_seed

        cfg, d, m = self.cfg, self.cfg.data, self.cfg.model
        if not d.train:
            raise ConfigError("data.train is not set: pass data.train=SHARDS_OR_FOLDER (or data.train=bundled:train)")
        ranks = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # the processes the Accelerator shares
        set_seed(cfg.run.seed)  # same init on every rank; numpy / random for Mixup too
        common = stream_args(d, img_size=m.img_size, seed=cfg.run.seed)
        self.loader = labeled_for_rank(d.train, ranks, train=True, **common, **label_args(d),
                                       auto_augment=d.auto_augment, re_prob=d.re_prob)
        self.unlabeled = None  # distill.unlabeled: images only the teacher labels, one batch per micro-batch
        if cfg.distill.unlabeled:
            from maevit.data.stream import DataSourceError

            try:
                images = labeled_for_rank(cfg.distill.unlabeled, ranks, train=True, images_only=True,
                                          **{**common, "seed": cfg.run.seed + 1}, auto_augment=d.auto_augment,
                                          re_prob=d.re_prob)
            except DataSourceError as e:  # say which setting named it
                raise DataSourceError(f"distill.unlabeled={cfg.distill.unlabeled}: {e}") from None
            self.unlabeled = UnlabeledImages(images, cfg.distill.unlabeled)
        self.val_loader = labeled_for_rank(d.val, ranks, train=False, class_names=self.loader.class_names,
                                           classes_from=f"the training data {d.train}", **common) if d.val else None
        self.num_classes = num_classes_of(m.num_classes, self.loader)
        self.class_names = list(getattr(self.loader, "class_names", None) or [])
        with building_model():
            model = self.model = create_classifier(m.name, self.num_classes, pretrained=m.pretrained,
                                                   global_pool=m.global_pool, strict=m.strict, **m.overrides())
        self.precision = resolve_run_precision(cfg.run)  # auto: from the hardware, the same for every run
        self.acc = make_accelerator(self.precision, cfg.optim.accum_steps, cfg.run.dir, cfg.run.tracker)
        return self.acc, model

    def start(self, run: runs.RunDir) -> Setup:
        from timm.utils import ModelEmaV3

        cfg, acc, model, d, o = self.cfg, self.acc, self.model, self.cfg.data, self.cfg.optim
        logger.info("%s", model.load_report or f"model.pretrained is not set: training {model.model_name} from scratch")
        logger.info("%s", describe_data(self.loader, d.batch_size, acc.num_processes, d.label_fraction, d.label_seed))
        self.teacher = None  # frozen, outside the optimizer, the checkpoints and prepare: rebuilt on resume
        if cfg.distill.enabled:
            self.teacher = build_teacher(cfg.distill, num_classes=self.num_classes, student_mean=d.mean,
                                         student_std=d.std, device=acc.device)
            heads = extra_heads(model)  # DeiT: training returns (class, distillation) logits
            if heads:
                heads.set_training(model, True)
            logger.info("distilling from %s: %s, alpha %g%s", self.teacher.source, cfg.distill.type,
                        cfg.distill.alpha, "" if heads else " (one head: classic knowledge distillation)")
            if self.unlabeled is not None:
                logger.info("the distillation term also reads %d images of distill.unlabeled=%s that the teacher "
                            "labels (one batch of them beside each labeled batch)", self.unlabeled.loader.num_samples,
                            cfg.distill.unlabeled)
        sched, eff_batch = plan_for(o, self.loader, d.batch_size, acc.num_processes)
        if acc.is_main_process:
            log_memory_estimate(acc, model, (d.batch_size, model.in_chans, *model.img_size), self.precision)
        model.to(acc.device)
        meter = meter_for(  # FLOPs per image, peak, MFU
            model, (3, *model.img_size), acc.device, self.precision, num_processes=acc.num_processes,
            log=acc.is_main_process)
        meter.in_process_data = getattr(self.loader, "num_workers", 1) == 0
        if self.unlabeled is not None:  # images/s counts the labeled images, each of which
            meter.flops_per_image *= 2  # brings one of distill.unlabeled through the student (the teacher: not counted)
        optimizer = build_adamw(param_groups_layer_decay(model, o.weight_decay, o.layer_decay, by=o.layer_decay_by,
                                                         exempt=o.layer_decay_exempt), sched.peak_lr,
                                o.weight_decay, betas=(0.9, 0.999))
        ema = ModelEmaV3(model, decay=cfg.run.ema) if cfg.run.ema else None
        model, optimizer = acc.prepare(model, optimizer)
        self.model = model.train()
        self.mixup_fn, self.criterion = build_criterion(d, self.num_classes)
        header = classifier_header(acc.unwrap_model(model), self.class_names, d.mean, d.std)
        self.ema = None if ema is None else EmaHook(ema, header)
        self.evaluation = _Evaluation(self)
        logger.info("fine-tuning %s: %d classes, effective batch %d, peak lr %.3g after %d warm-up steps, "
                    "%d steps/epoch, %d steps%s", getattr(model, "model_name", cfg.model.name), self.num_classes,
                    eff_batch, sched.peak_lr, sched.warmup_steps, sched.steps_per_epoch, sched.total_steps,
                    f" (stopping at {sched.last_step})" if sched.last_step < sched.total_steps else "")
        return Setup(acc=acc, run=run, model=model, optimizer=optimizer, loader=self.loader, schedule=sched,
                     params=[p for p in model.parameters() if p.requires_grad], eff_batch=eff_batch, meter=meter,
                     header=header, precision=self.precision, clip_grad=o.clip_grad, panels=FINETUNE_PANELS,
                     hooks=[h for h in (self.ema, self.evaluation, self.unlabeled) if h is not None],
                     side_loaders=[self.unlabeled.loader] if self.unlabeled is not None else [])

    def loss(self, batch) -> dict[str, torch.Tensor]:
        x, y = (t.to(self.acc.device, non_blocking=True) for t in batch)  # [B, C, H, W], [B]
        if self.mixup_fn is not None:
            x, y = self.mixup_fn(x, y)  # y: [B, num_classes] soft targets
        n_labeled = len(x)
        if self.unlabeled is not None:  # [B + U, C, H, W]: the teacher labels the last U (mixed among themselves)
            xu = self.unlabeled.next().to(self.acc.device, non_blocking=True)
            if self.mixup_fn is not None:
                xu, _ = self.mixup_fn(xu, torch.zeros(len(xu), dtype=torch.long, device=xu.device))
            x = torch.cat([x, xu])
        with self.acc.autocast():  # the teacher, too, runs at the run's precision, on the same mixed images
            out = self.model(x)
            if self.teacher is None:
                return {"loss": self.criterion(out, y)}
            d = self.cfg.distill
            parts = distillation_loss(out, y, self.teacher(x), self.criterion, kind=d.type, alpha=d.alpha, tau=d.tau,
                                      labeled=n_labeled)
        return {"loss": parts.loss, "loss_label": parts.base, "loss_distill": parts.distill}

    def advice(self) -> str:
        return (f"Try a lower optim.base_lr (now {self.cfg.optim.base_lr}), optim.clip_grad=1.0, or "
                f"run.precision=fp32; then resume from the last checkpoint in {self.cfg.run.dir}.")

    def export(self, loop: Loop) -> dict[str, Any]:
        acc, result = self.acc, self.evaluation.result
        if self.val_loader is not None and result is None:  # stopped mid-epoch or resumed at the end
            result, _ = self.evaluation.evaluate(loop, ema=False)
        out_path = loop.run.classifier_path
        header = loop.s.header
        if acc.is_main_process:
            export_classifier(acc.unwrap_model(self.model), out_path, header)
            if self.ema is not None:
                export_classifier(self.ema.ema.module, loop.run.classifier_ema_path, header)
            save_run_curves(loop.run.root, FINETUNE_PANELS)
        return {
            **summary_fields(loop), "loss": loop.losses[-1] if loop.losses else float("nan"), "losses": loop.losses,
            "top1": result.top1 if result else None, "top5": result.top5 if result else None,
            **({f"top1_{h}": v for h, v in result.head_top1.items()} if result else {}),
            "classifier": str(out_path), "timm_line": timm_load_line(header, out_path),
        }


class _Evaluation(Hook):
    """Validation on ``data.val`` every ``run.eval_every`` epochs (and of the EMA weights, when kept)."""

    def __init__(self, task: FinetuneTask) -> None:
        self.task, self.result = task, None

    def evaluate(self, loop: Loop, ema: bool = True) -> tuple[Any, dict[str, float]]:
        t = self.task
        result = evaluate_classifier(loop.acc.unwrap_model(loop.model), t.val_loader, t.num_classes,
                                     accelerator=loop.acc)
        row = {f"val_{k}": v for k, v in result.summary().items()}
        if ema and t.ema is not None:
            row.update({f"val_ema_{k}": v for k, v in evaluate_classifier(
                t.ema.ema.module, t.val_loader, t.num_classes, accelerator=loop.acc).summary().items()})
        return result, row

    def on_epoch_end(self, loop: Loop) -> None:
        if self.task.val_loader is None:
            return
        if loop.epoch % self.task.cfg.run.eval_every == 0 or loop.step >= loop.s.schedule.last_step:
            self.result, row = self.evaluate(loop)
            loop.metrics.log(loop.step, epoch=loop.epoch, **row)
            loop.acc.log({f"val/{k[4:]}": v for k, v in row.items()}, step=loop.step)
            logger.info("epoch %d step %d: val top-1 %.2f%%  top-5 %.2f%%", loop.epoch, loop.step, self.result.top1,
                        self.result.top5)


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
    return fit(FinetuneTask(cfg))


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
