"""Linear probing of a frozen encoder: ``maevit probe [RECIPE.yaml] key=value ...``.

MAE's probe: frozen encoder -> pooled feature (class token after ``norm``, or the
average for families without one) -> BatchNorm1d(affine=False) -> Linear,
trained with LARS (no weight decay); the LARS peak lr is the same at every batch
size (see :class:`ProbeOptimConfig`).
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
from maevit.train.common import (
    IMAGENET_MEAN, IMAGENET_STD, Precision, building_model, clip_warmup, describe_data, labeled_for_rank,
    make_accelerator, num_classes_of, progress_bar, resolve_num_workers, resolve_run_precision, run_recipe_command,
    start_trackers,
)
from maevit.train.evaluate import evaluate_classifier
from maevit.train.knn import encoder_features, extract_features
from maevit.train.optim import cosine_lr, set_lr

logger = logging.getLogger("maevit.probe")


@dataclass
class ProbeModelConfig:
    name: str | None = None  # registered name; None: the one `pretrained` names
    pretrained: str | None = None  # None = a randomly initialised encoder (a baseline)
    global_pool: Literal["token", "avg"] = "token"  # MAE's probe uses the class token (families without one: avg)
    img_size: int = 224  # input side in pixels (position tables are resampled)
    num_classes: int | None = None  # default: the number of classes in data.train
    args: dict[str, Any] = field(default_factory=dict)  # encoder arguments on top of the file's


@dataclass
class ProbeDataConfig:
    train: str = ""  # labeled source: shards with .cls, class-per-folder tree, or "bundled:train"
    val: str | None = None  # evaluated at the end; None = no evaluation
    batch_size: int = 256  # per process (MAE: 16384 in all)
    num_workers: int | None = None  # loader processes per rank; None: min(4, CPUs per process - 1)
    label_fraction: float | None = None  # e.g. 0.1: a fixed, class-balanced subset of the labels
    label_seed: int = 0  # picks that subset
    mean: tuple[float, float, float] = IMAGENET_MEAN  # input normalisation: use the pretraining's
    std: tuple[float, float, float] = IMAGENET_STD
    augment: bool = False  # RandomResizedCrop + flip each epoch (published); False: features computed once


@dataclass
class ProbeOptimConfig:
    epochs: int = 90  # MAE: 90 (ViT-B), 50 (ViT-L / H)
    # LARS peak lr, the same at every batch size: the published 0.1 x 16384 / 256. LARS's trust
    # ratio sets each layer's step from |w| / |grad|, so scaling the lr down with the batch (as
    # for AdamW) starves small-batch probes (CIFAR-10 at batch 256: 35.6% at 0.1, 52.4% at 10)
    lr: float = 6.4
    weight_decay: float = 0.0  # MAE's probe: none
    warmup_epochs: float = 10.0  # linear warm-up, then cosine; clipped to a tenth of short schedules
    min_lr: float = 0.0  # the lr at the end of the cosine


@dataclass
class ProbeRunConfig:
    dir: str = "runs/probe"  # run directory: config, metrics, probe head, TensorBoard
    seed: int = 0
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
    total = epochs * steps_per_epoch
    warm = clip_warmup(round(warmup_epochs * steps_per_epoch), total, warmup_epochs, epochs)
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

    if not cfg.data.train:
        raise ConfigError("data.train is not set: pass data.train=SHARDS_OR_FOLDER (or data.train=bundled:train)")
    acc = make_accelerator(resolve_run_precision(cfg.run), run_dir=cfg.run.dir)
    set_seed(cfg.run.seed)
    d, o = cfg.data, cfg.optim
    common = dict(img_size=cfg.model.img_size, batch_size=d.batch_size, num_workers=resolve_num_workers(d.num_workers),
                  seed=cfg.run.seed, mean=d.mean, std=d.std)
    train_loader = labeled_for_rank(d.train, acc, train=d.augment, label_fraction=d.label_fraction,
                                    label_seed=d.label_seed, **common,
                                    **({"auto_augment": None, "re_prob": 0.0} if d.augment else {}))
    num_classes = num_classes_of(cfg.model.num_classes, train_loader)
    with building_model():
        encoder = create_classifier(cfg.model.name, 0, pretrained=cfg.model.pretrained,
                                    global_pool=cfg.model.global_pool, img_size=cfg.model.img_size, **cfg.model.args)
    val_loader = labeled_for_rank(d.val, acc, train=False, class_names=train_loader.class_names,  # matched by name
                                  classes_from=f"the training data {d.train}", **common) if d.val else None
    run, _ = runs.open_run(cfg.run.dir, acc, cfg, fresh=cfg.run.fresh)
    start_trackers(acc, cfg)
    logger.info("%s", encoder.load_report or "model.pretrained is not set: probing a randomly initialised encoder")
    logger.info("%s", describe_data(train_loader, d.batch_size, acc.num_processes, d.label_fraction, d.label_seed))
    model = LinearProbe(encoder, num_classes).to(acc.device)
    metrics = runs.MetricsLogger(run.metrics_path, enabled=acc.is_main_process)
    show = acc.is_main_process
    bar = progress_bar(show, o.epochs, unit="epoch", desc="probe")

    def log(e: int, loss: float) -> None:
        metrics.log(e + 1, epoch=e + 1, loss=loss)
        acc.log({"probe/loss": loss}, step=e + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if bar.disable and show and ((e + 1) % 10 == 0 or e + 1 == o.epochs):
            logger.info("epoch %d/%d  loss %.4f", e + 1, o.epochs, loss)

    if not d.augment:
        batches = progress_bar(show, len(train_loader), unit="batch", desc="features")
        # all ranks: all samples
        feats, labels = extract_features(model.encoder, _counted(train_loader, batches), accelerator=acc)
        batches.close()
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
    bar.close()
    head_path = run.root / "probe_head.safetensors"
    out: dict[str, Any] = {"losses": hist, "top1": None, "top5": None, "run_dir": str(run.root),
                           "num_processes": acc.num_processes, "head": str(head_path)}
    if val_loader is not None:
        batches = progress_bar(show, len(val_loader), unit="batch", desc="validation")
        res = evaluate_classifier(model, _counted(val_loader, batches), num_classes, accelerator=acc)
        batches.close()
        out.update(top1=res.top1, top5=res.top5)
        metrics.log(o.epochs, **{f"val_{k}": v for k, v in res.summary().items()})
        acc.log({"probe/val_top1": res.top1, "probe/val_top5": res.top5}, step=o.epochs)
    metrics.close()
    if acc.is_main_process:
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in model.head.state_dict().items()}, str(head_path))
    acc.wait_for_everyone()
    acc.end_training()
    run.unlock()
    return out


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
