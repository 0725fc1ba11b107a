"""Linear probing of a frozen encoder: ``maevit probe [RECIPE.yaml] key=value ...``.

MAE's probe: frozen encoder -> pooled feature (the mean of the patch tokens, the default; or, with
``model.global_pool=token``, MAE's protocol: the class token after ``norm``) -> BatchNorm1d(affine=False) -> Linear,
trained with LARS (no weight decay); the LARS peak lr is the same at every batch
size (see :class:`ProbeOptimConfig`).

Probing is a task (:class:`ProbeTask`) on the one training loop
(:mod:`maevit.train.engine`), without checkpoints (probes are short and start
fresh): features are computed once (:class:`FeatureBatches`) unless
``data.augment``, one log row per epoch, evaluation and the head file (with its
header, written atomically) at the end.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from maevit.config import ConfigError
from maevit.models import create_classifier
from maevit.train import runs
from maevit.train.command import building_model, run_recipe_command
from maevit.train.inputs import describe_data, label_args, labeled_for_rank, num_classes_of, stream_args
from maevit.train.precision import make_accelerator, resolve_run_precision
from maevit.train.progress import progress_bar
from maevit.train.schedule import clip_warmup
from maevit.train.sections import (
    ClassifierModelSection, LabeledDataSection, OptimSection, Precision, RunSection,
)
from maevit.train.evaluate import evaluate_classifier
from maevit.train.knn import encoder_features, extract_features
from maevit.models.weights import header_of, save_weights
from maevit.train.file_defaults import fill_from_weights
from maevit.train.engine import Loop, Policy, Setup, Task, fit
from maevit.train.schedule import Schedule

logger = logging.getLogger("maevit.probe")


@dataclass
class ProbeModelConfig(ClassifierModelSection):
    KEY_ORDER = ("name", "pretrained", "global_pool", "img_size", "num_classes", "args")

    pretrained: str | None = None  # None = a randomly initialised encoder (a baseline)
    # avg: the mean of the patch tokens, which MAE trains from its first steps; "token": MAE's protocol, the class
    # token, which MAE trains only indirectly and late (CIFAR-10 ViT after 585 MAE steps: token 33.9% vs random
    # init 35.2%, avg 42.2% vs 35.6%; BENCHMARKS.md "Every family learns from MAE")
    global_pool: Literal["token", "avg"] = "avg"


@dataclass
class ProbeDataConfig(LabeledDataSection):
    KEY_ORDER = ("train", "val", "batch_size", "num_workers", "label_fraction", "label_seed", "mean", "std", "augment")

    train: str = ""  # labeled source: shards with .cls, class-per-folder tree, or "bundled:train"
    val: str | None = None  # evaluated at the end; None = no evaluation
    batch_size: int = 256  # per process (MAE: 16384 in all)
    augment: bool = False  # RandomResizedCrop + flip each epoch (published); False: features computed once


@dataclass
class ProbeOptimConfig(OptimSection):
    KEY_ORDER = ("epochs", "lr", "weight_decay", "warmup_epochs", "min_lr")

    epochs: int = 90  # MAE: 90 (ViT-B), 50 (ViT-L / H)
    # LARS peak lr, the same at every batch size: the published 0.1 x 16384 / 256. LARS's trust
    # ratio sets each layer's step from |w| / |grad|, so scaling the lr down with the batch (as
    # for AdamW) starves small-batch probes (CIFAR-10 at batch 256: 35.6% at 0.1, 52.4% at 10)
    lr: float = 6.4
    weight_decay: float = 0.0  # MAE's probe: none
    warmup_epochs: float = 10.0  # linear warm-up, then cosine; clipped to a tenth of short schedules


@dataclass
class ProbeRunConfig(RunSection):
    dir: str = "runs/probe"  # run directory: config, metrics, probe head, TensorBoard
    precision: Precision = "fp32"  # bf16 on recent GPUs; fp32 on CPU
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


class FeatureBatches:
    """Batches of features computed once (``data.augment=false``): a stream for the loop.

    Every epoch is a fresh permutation of all samples, drawn in turn from one generator seeded
    with ``run.seed``; ``len()`` batches of ``batch_size`` (a ragged tail is left out).
    """

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int) -> None:
        self.feats, self.labels, self.batch_size = feats, labels, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.perms: list[torch.Tensor] = []
        self.num_samples = feats.shape[0]
        self._epoch, self._position, self._skip = 0, 0, 0

    def __len__(self) -> int:
        return max(1, self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        while len(self.perms) <= epoch:  # the draws of the epochs before, in order
            self.perms.append(torch.randperm(self.num_samples, generator=self.gen))
        self._epoch, self._position, self._skip = epoch, 0, 0

    def skip_batches(self, n: int) -> None:
        self._skip = n

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batch": self._position}

    def __iter__(self):
        perm = self.perms[self._epoch].to(self.feats.device)
        for i in range(self._skip, len(self)):
            self._position = i + 1
            idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.feats[idx], self.labels[idx]


class ProbeTask(Task):
    """The linear probe on the loop: cross-entropy of the head on frozen features (computed once, or
    every epoch with ``data.augment``), LARS; no checkpoints (probes are short and start fresh);
    evaluation and the head file at the end."""

    def __init__(self, cfg: ProbeConfig) -> None:
        self.cfg = cfg

    def resolve(self, cfg: ProbeConfig) -> ProbeConfig:
        return fill_from_weights(cfg)  # size and mean / std of the weights file unless set

    def build(self):
        from accelerate.utils import set_seed

        cfg, d = self.cfg, self.cfg.data
        if not d.train:
            raise ConfigError("data.train is not set: pass data.train=SHARDS_OR_FOLDER (or data.train=bundled:train)")
        self.precision = resolve_run_precision(cfg.run)
        acc = self.acc = make_accelerator(self.precision, run_dir=cfg.run.dir, tracker=cfg.run.tracker)
        set_seed(cfg.run.seed)
        common = stream_args(d, img_size=cfg.model.img_size, seed=cfg.run.seed)
        self.train_loader = labeled_for_rank(d.train, acc, train=d.augment, **common, **label_args(d),
                                             **({"auto_augment": None, "re_prob": 0.0} if d.augment else {}))
        self.num_classes = num_classes_of(cfg.model.num_classes, self.train_loader)
        with building_model():
            self.encoder = create_classifier(cfg.model.name, 0, pretrained=cfg.model.pretrained,
                                             global_pool=cfg.model.global_pool, img_size=cfg.model.img_size,
                                             **cfg.model.args)
        # a bad source changes no files
        self.val_loader = labeled_for_rank(d.val, acc, train=False, class_names=self.train_loader.class_names,
                                           classes_from=f"the training data {d.train}", **common) if d.val else None
        return acc, self.encoder

    def start(self, run: runs.RunDir) -> Setup:
        cfg, acc, d, o = self.cfg, self.acc, self.cfg.data, self.cfg.optim
        logger.info("%s", self.encoder.load_report or "model.pretrained is not set: probing a randomly initialised "
                                                      "encoder")
        logger.info("%s", describe_data(self.train_loader, d.batch_size, acc.num_processes, d.label_fraction,
                                        d.label_seed))
        model = self.model = LinearProbe(self.encoder, self.num_classes).to(acc.device)
        if d.augment:  # features recomputed every epoch (published); the head synchronised by DDP
            loader, eff_batch = self.train_loader, d.batch_size * acc.num_processes
            model.head = acc.prepare(model.head)
        else:  # every process trains the same head on all features, with the same seed: no sync needed
            bar = progress_bar(acc.is_main_process, len(self.train_loader), unit="batch", desc="features")
            feats, labels = extract_features(model.encoder, _counted(self.train_loader, bar), accelerator=acc)
            bar.close()
            eff_batch = d.batch_size * acc.num_processes
            loader = FeatureBatches(feats.to(acc.device), labels.to(acc.device), eff_batch, cfg.run.seed)
        optimizer = acc.prepare(build_lars(model.head, o.lr, o.weight_decay))
        steps = len(loader)
        total = o.epochs * steps
        warmup = clip_warmup(round(o.warmup_epochs * steps), total, o.warmup_epochs, o.epochs)
        sched = Schedule(steps, total, total, warmup, o.lr, o.min_lr)  # LARS: the same peak lr at any batch
        header = header_of(self.encoder, "probe_head", num_classes=self.num_classes, mean=list(d.mean),
                           std=list(d.std), class_names=list(getattr(self.train_loader, "class_names", None) or []))
        for key in ("timm_model", "timm_kwargs"):  # a head alone: no timm twin
            header.pop(key, None)
        self.header = header
        return Setup(acc=acc, run=run, model=model.head, optimizer=optimizer, loader=loader, schedule=sched,
                     params=[p for p in model.head.parameters() if p.requires_grad], eff_batch=eff_batch,
                     meter=None, header=header, precision=self.precision,
                     policy=Policy(log_every=steps, checkpoints=False, desc="probe"))

    def loss(self, batch) -> dict[str, torch.Tensor]:
        x, y = (t.to(self.acc.device) for t in batch)
        feats = self.model.features(x) if self.cfg.data.augment else x  # [B, D]
        return {"loss": nn.functional.cross_entropy(self.model.head(feats), y)}

    def export(self, loop: Loop) -> dict[str, Any]:
        acc, model = self.acc, self.model
        model.head = acc.unwrap_model(model.head)
        head_path = loop.run.probe_head_path
        out: dict[str, Any] = {"losses": loop.losses, "top1": None, "top5": None, "run_dir": str(loop.run.root),
                               "num_processes": acc.num_processes, "head": str(head_path)}
        if self.val_loader is not None:
            bar = progress_bar(acc.is_main_process, len(self.val_loader), unit="batch", desc="validation")
            res = evaluate_classifier(model, _counted(self.val_loader, bar), self.num_classes, accelerator=acc)
            bar.close()
            out.update(top1=res.top1, top5=res.top5)
            loop.log(loop.step, epoch=loop.epoch, **{f"val_{k}": v for k, v in res.summary().items()})
            acc.log({"probe/val_top1": res.top1, "probe/val_top5": res.top5}, step=loop.step)
        if acc.is_main_process:
            save_weights(model.head.state_dict(), head_path, self.header)  # atomic, with its header
        return out


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
    return fit(ProbeTask(cfg))


def _counted(loader, bar):
    """Iterate ``loader``, advancing ``bar`` by one per batch."""
    for item in loader:
        yield item
        bar.update(1)


def _summary(r: dict[str, Any]) -> str:
    top = f"val top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%" if r["top1"] is not None else "no data.val given"
    loss = f" (final training loss {r['losses'][-1]:.4f})" if r["losses"] else ""
    return (f"linear probe done: {top}{loss}\n  run directory    {r['run_dir']}\n  probe head       {r['head']}\n"
            f"  metrics          {r['run_dir']}/metrics.jsonl")


def main_probe(argv: list[str] | None = None) -> int:
    """``maevit probe [RECIPE.yaml] [key=value ...] [--label-fraction F]`` (ProbeConfig keys)."""
    return run_recipe_command("maevit probe", "Linear probe (BatchNorm + linear, LARS) on a frozen encoder.",
                              ProbeConfig, probe, argv, summary=_summary, label_fraction_flag=True)


if __name__ == "__main__":
    sys.exit(main_probe())
