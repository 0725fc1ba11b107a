"""Classification metrics counted exactly once across processes, and a confusion-matrix PNG.

Every rank counts its own samples into a confusion matrix and a top-5 counter;
one ``sum`` reduction at the end combines them. No per-batch gather, so ranks
may hold different numbers of batches (exactly-once loaders) and no sample is
padded or duplicated.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from maevit.fileio import save_image_atomic, write_text_atomic
from maevit.models.contract import extra_heads
from maevit.runlayout import EVAL_FILE
from maevit.train.runs import RunDir


@dataclass
class ClassificationResult:
    """Metrics of one evaluation pass (all processes combined).

    Attributes:
        confusion: ``[C, C]`` int64 counts, rows = true class, columns = predicted.
        top5_correct: samples whose label is among the 5 highest scores.
        loss_sum: summed cross-entropy over all samples.
        head_correct: for classifiers with two heads (DeiT: ``cls`` and ``dist``), the
            samples each head alone gets right (the prediction above averages them).
    """

    confusion: torch.Tensor
    top5_correct: int
    loss_sum: float
    head_correct: dict[str, int] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.confusion.sum())

    @property
    def top1(self) -> float:
        return 100.0 * float(self.confusion.diag().sum()) / max(1, self.num_samples)

    @property
    def top5(self) -> float:
        return 100.0 * self.top5_correct / max(1, self.num_samples)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.num_samples)

    @property
    def per_class(self) -> torch.Tensor:
        """``[C]`` accuracy (%) per true class (nan for classes without samples)."""
        rows = self.confusion.sum(1).double()
        return 100.0 * self.confusion.diag().double() / rows.where(rows > 0, torch.nan)

    @property
    def head_top1(self) -> dict[str, float]:
        """Top-1 (%) of each head alone (empty for one-head classifiers)."""
        return {h: 100.0 * n / max(1, self.num_samples) for h, n in self.head_correct.items()}

    def summary(self) -> dict[str, float]:
        out = {"top1": self.top1, "top5": self.top5, "loss": self.loss, "samples": self.num_samples}
        out.update({f"top1_{h}": v for h, v in self.head_top1.items()})
        return out


def count_predictions(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Confusion counts ``[C, C]`` and top-5 hits (scalar) of one batch."""
    pred = logits.argmax(-1)  # [B]
    conf = torch.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
    top = logits.topk(min(5, num_classes), dim=-1).indices  # [B, 5]
    return conf.view(num_classes, num_classes), (top == labels[:, None]).any(-1).sum()


def classifier_logits(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's logits, and each head's own for classifiers with extra heads
    (:class:`~maevit.models.contract.ExtraHeads`, e.g. DeiT's), from one forward of the trunk."""
    heads = extra_heads(model)
    if heads is None:
        return model(images), {}
    features = model.forward_features(images)
    return model.forward_head(features), heads.logits(model, features)


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    loader: Iterable,
    num_classes: int,
    *,
    accelerator: Any = None,
    device: torch.device | str | None = None,
) -> ClassificationResult:
    """Top-1 / top-5 / per-class counts of ``model`` over a labeled loader.

    Args:
        model: maps ``[B, C, H, W]`` to logits ``[B, num_classes]`` (pass the
            unwrapped model: no DDP sync is needed and ranks may have different
            numbers of batches).
        loader: this rank's share of the samples, each exactly once.
        num_classes: size of the confusion matrix.
        accelerator: combine counts of all processes (one ``sum`` reduce).
    """
    device = device or (accelerator.device if accelerator is not None else next(model.parameters()).device)
    was_training = model.training
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    top5 = torch.zeros((), dtype=torch.long, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    # per-head hits exist on every rank (even one without batches), so the reduction below matches up
    heads = {h: torch.zeros((), dtype=torch.long, device=device) for h in getattr(extra_heads(model), "names", ())}
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            logits, per_head = classifier_logits(model, x)
        logits = logits.float()  # [B, C]
        for h, v in per_head.items():
            heads[h] += (v.argmax(-1) == y).sum()
        if int(y.max()) >= num_classes or int(y.min()) < 0:
            from maevit.data.stream import DataSourceError

            raise DataSourceError(f"label {int(y.max())} outside [0, {num_classes}): the data has more classes than "
                                  "the model; pass the labeled data the classifier was trained for")
        c, t5 = count_predictions(logits, y, num_classes)
        conf += c
        top5 += t5
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").double()
    model.train(was_training)
    if accelerator is not None and accelerator.num_processes > 1:
        conf = accelerator.reduce(conf, "sum")
        top5 = accelerator.reduce(top5, "sum")
        loss = accelerator.reduce(loss, "sum")
        heads = {h: accelerator.reduce(v, "sum") for h, v in heads.items()}
    return ClassificationResult(conf.cpu(), int(top5), float(loss), {h: int(v) for h, v in heads.items()})


def format_report(result: ClassificationResult, class_names: Sequence[str] | None = None, max_rows: int = 50) -> str:
    """Plain-text report: totals, per-class accuracy, confusion matrix (small C)."""
    c = result.confusion.shape[0]
    names = list(class_names) if class_names else [str(i) for i in range(c)]
    lines = [f"samples {result.num_samples}  top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  loss {result.loss:.4f}"]
    if result.head_correct:
        lines.append("each head alone: " + ", ".join(f"{h} top-1 {v:.2f}%" for h, v in result.head_top1.items())
                     + " (the top-1 above averages the heads)")
    per = result.per_class
    order = range(c) if c <= max_rows else per.nan_to_num(101.0).argsort()[:max_rows].tolist()
    lines.append("per-class accuracy" + ("" if c <= max_rows else f" (worst {max_rows})") + ":")
    w = max(len(n) for n in names)
    for i in order:
        lines.append(f"  {names[i]:<{w}}  {per[i]:6.2f}%  ({int(result.confusion[i].sum())} samples)")
    if c <= 20:
        lines.append("confusion matrix (rows: true, columns: predicted):")
        cw = max(4, len(str(int(result.confusion.max()))) + 1)
        lines.append(" " * (w + 2) + "".join(f"{j:>{cw}}" for j in range(c)))
        for i in range(c):
            lines.append(f"  {names[i]:<{w}}" + "".join(f"{int(v):>{cw}}" for v in result.confusion[i]))
    return "\n".join(lines)


def save_confusion_png(
    confusion: torch.Tensor, path: str | os.PathLike, class_names: Sequence[str] | None = None
) -> Path:
    """Row-normalised confusion matrix as a PNG heat map (rows: true class, columns: predicted).

    Drawn with PIL (already a dependency) rather than adding matplotlib: a
    grid of cells, white -> dark blue by the row fraction, counts written in
    the cells, and class names on both axes (written upwards over the columns)
    when there is room.
    """
    from PIL import Image, ImageDraw

    c = confusion.shape[0]
    rows = confusion.sum(1, keepdim=True).clamp(min=1).double()
    frac = (confusion.double() / rows).numpy()  # [C, C]
    cell = max(2, min(40, 1000 // max(1, c)))
    names = list(class_names) if class_names else [str(i) for i in range(c)]
    show_text = cell >= 12
    names = [n if len(n) <= 24 else n[:23] + "~" for n in names]
    margin = (max(len(n) for n in names) * 6 + 22) if show_text else 4
    size = margin + c * cell + 4
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    for i in range(c):
        for j in range(c):
            v = float(frac[i, j])
            color = (int(255 * (1 - v) + 8 * v), int(255 * (1 - v) + 48 * v), int(255 * (1 - v) + 107 * v))
            x0, y0 = margin + j * cell, margin + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=color, outline=(220, 220, 220))
            if cell >= 18 and confusion[i, j] > 0:
                n = int(confusion[i, j])
                draw.text((x0 + 2, y0 + cell // 2 - 5), str(n), fill="white" if v > 0.5 else "black")
    if show_text:
        for i, name in enumerate(names):
            draw.text((14, margin + i * cell + cell // 2 - 5), name, fill="black")  # true class (rows)
            label = Image.new("RGB", (len(name) * 6 + 4, 12), "white")  # predicted class (columns), upwards
            ImageDraw.Draw(label).text((2, 0), name, fill="black")
            label = label.rotate(90, expand=True)
            img.paste(label, (margin + i * cell + cell // 2 - 6, margin - label.height - 4))
        draw.text((2, 2), "rows: true / columns: predicted", fill=(90, 90, 90))
    return save_image_atomic(img, path)


# ----------------------------------------------------------------------------- maevit eval


def load_classifier(path: str | os.PathLike, *, name: str | None = None, img_size: int | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a classifier from ``classifier.safetensors``, its fine-tuning run directory, or a
    training checkpoint of one; the file's header gives the architecture, classes and pooling.

    Args:
        name: a registered model name, for classifier files that do not name theirs.
        img_size: evaluate at another resolution (position tables are resampled).

    Raises:
        FileNotFoundError / CheckpointError / ModelArgumentError: with what to pass instead.
    """
    from maevit.models import CheckpointError, create_classifier, read_header
    from maevit.models.weights import encoder_state_dict

    p = Path(path)
    if p.is_dir() and RunDir(p).classifier_path.is_file():
        p = RunDir(p).classifier_path
    header = read_header(p)
    if header.get("kind") not in (None, "classifier"):
        what = {"mae": "a pretrained MAE (encoder and decoder)", "encoder": "a pretrained encoder",
                "probe_head": "a linear probe's head (`maevit probe` reports its accuracy itself)"}
        raise CheckpointError(f"{path} holds {what.get(header['kind'], repr(header['kind']))}, not a classifier: "
                              f"fine-tune it first (maevit finetune model.pretrained={path} data.train=LABELED), then "
                              f"evaluate that run directory")
    sd = encoder_state_dict(p)
    # timm's classifier layer: head (ViT, DeiT), head.fc (Swin, Hiera: pooling / norm live in the head), fc (ResNet)
    head_key = next((k for k in ("head.weight", "head.fc.weight", "fc.weight") if k in sd), None)
    num_classes = header.get("num_classes") or (int(sd[head_key].shape[0]) if head_key else 0)
    if not num_classes:
        raise CheckpointError(f"{path} has no classification head (head.weight / head.fc.weight): fine-tune it "
                              "first (maevit finetune)")
    overrides = {} if img_size is None else {"img_size": img_size}
    model = create_classifier(name, num_classes, pretrained=p, global_pool=None, **overrides)
    if model.load_report.new:
        raise CheckpointError(f"{path}: {', '.join(model.load_report.new)} missing or of the wrong shape")
    return model, header


def main_eval(argv: list[str] | None = None) -> int:
    """``maevit eval CLASSIFIER --data VAL``: top-1 / top-5 / per-class / confusion matrix."""
    import argparse
    import json
    import math
    import sys

    from maevit.config import Range, ranged
    from maevit.train.command import building_model, setup_logging, usage_errors
    from maevit.train.inputs import labeled_for_rank, resolve_num_workers
    from maevit.train.precision import make_accelerator
    from maevit.train.progress import progress_bar

    p = argparse.ArgumentParser(prog="maevit eval", description=main_eval.__doc__)
    p.add_argument("checkpoint", help="fine-tuning RUN_DIR or a classifier .safetensors")
    p.add_argument("--data", required=True, help="labeled source (shards, class folders, bundled:val)")
    p.add_argument("--model", default=None, help="model name, for files that do not name theirs")
    p.add_argument("--img-size", type=ranged(int, Range(1)), default=None, help="default: the classifier's")
    p.add_argument("--batch-size", type=ranged(int, Range(1)), default=64)
    p.add_argument("--num-workers", type=ranged(int, Range(0)), default=None, help="default: min(4, CPUs - 1)")
    p.add_argument("--out", default=None, help="where to write eval.json + confusion.png (default: beside the checkpoint)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    acc = make_accelerator("fp32")
    try:
        with building_model():
            model, header = load_classifier(a.checkpoint, name=a.model, img_size=a.img_size)
        model.to(acc.device)
        loader = labeled_for_rank(a.data, acc, img_size=int(model.img_size[0]), batch_size=a.batch_size, train=False,
                                  num_workers=resolve_num_workers(a.num_workers), seed=0,
                                  class_names=header.get("class_names"), classes_from=f"the classifier {a.checkpoint}",
                                  **{k: tuple(header[k]) for k in ("mean", "std") if k in header})
        names = header.get("class_names") or getattr(loader, "class_names", None) or None
        bar = progress_bar(acc.is_main_process, len(loader), unit="batch", desc="evaluating")
        res = evaluate_classifier(model, _with_bar(loader, bar), model.num_classes, accelerator=acc)
        bar.close()
    except usage_errors() as e:
        print(f"maevit eval: error: {e}", file=sys.stderr)
        return 2
    if acc.is_main_process:
        print(format_report(res, names))
        ckpt = Path(a.checkpoint)
        out_dir = Path(a.out) if a.out else (ckpt if ckpt.is_dir() else ckpt.parent)
        out_dir.mkdir(parents=True, exist_ok=True)
        png = save_confusion_png(res.confusion, out_dir / "confusion.png", names)
        write_text_atomic(out_dir / EVAL_FILE, json.dumps({
            **res.summary(), "per_class": [None if math.isnan(v) else v for v in res.per_class.tolist()],
            "confusion": res.confusion.tolist(), "class_names": names, "data": a.data,
            "num_processes": acc.num_processes}, indent=1))
        print(f"confusion matrix  {png}\nmetrics           {out_dir / EVAL_FILE}")
    acc.wait_for_everyone()
    return 0


def _with_bar(loader, bar):
    for item in loader:
        yield item
        bar.update(1)
