"""Feature extraction and weighted kNN classification of frozen encoders.

kNN as in InstDisc / DINO: cosine similarity, the ``k`` nearest training
features vote with weight ``exp(sim / T)``. It needs no training, so it is the
quick check of an encoder, and the online probe during pretraining.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    T: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores of temperature-weighted kNN with cosine similarity.

    Args:
        train_feats: ``[N, D]`` features of the labeled set (need not be normalised).
        train_labels: ``[N]`` int64 labels in ``[0, num_classes)``.
        query_feats: ``[Q, D]`` features to classify.
        num_classes: number of classes.
        k: neighbours that vote (clipped to N).
        T: temperature of the vote weights ``exp(cos / T)``.
        chunk: queries per similarity block (bounds memory to ``chunk x N``).

    Returns:
        ``[Q, num_classes]`` vote totals; ``argmax(-1)`` is the prediction.
    """
    if train_feats.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train_feats.shape[0]} training features but {train_labels.shape[0]} labels")
    k = min(k, train_feats.shape[0])
    bank = F.normalize(train_feats.float(), dim=-1)  # [N, D]
    out = []
    for q in torch.split(F.normalize(query_feats.float(), dim=-1), chunk):
        sim = q @ bank.T  # [q, N]
        top_sim, top_idx = sim.topk(k, dim=-1)  # [q, k]
        weights = (top_sim / T).exp()  # [q, k]
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)  # [q, C]
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def encoder_features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled features ``[B, D]`` of a timm-style encoder (class token after ``norm``
    for maevit encoders / ``global_pool='token'``; the pooled, ``fc_norm``-ed patch
    tokens for ``'avg'``). Falls back to ``encoder(images)`` for other modules."""
    if hasattr(encoder, "forward_features") and hasattr(encoder, "forward_head"):
        return encoder.forward_head(encoder.forward_features(images), pre_logits=True)
    return encoder(images)


def patch_features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last feature map ``[B, h, w, D]`` of an encoder: its patch tokens (prefix tokens dropped),
    in row-major order, on the grid of the final stage (the patch grid for plain ViTs, stride 32 for
    Swin, ...; the grid's aspect follows the image's)."""
    tokens = encoder.tokens_of(encoder.forward_features(images))[:, getattr(encoder, "num_prefix_tokens", 0):]
    n, (H, W) = tokens.shape[1], images.shape[-2:]
    h = max(1, round(math.sqrt(n * H / W)))
    if n % h:
        raise ValueError(f"{n} patch tokens do not form a grid with the aspect of {H}x{W} images")
    return tokens.reshape(tokens.shape[0], h, n // h, tokens.shape[-1])  # [B, h, w, D]


def gather_uneven(tensor: torch.Tensor, accelerator: Any = None) -> torch.Tensor:
    """Concatenate a per-rank tensor from all ranks when ranks hold different lengths.

    Exactly-once loaders give ranks different sample counts; plain ``gather``
    needs equal shapes, so pad to the longest rank, gather, and strip the pads
    (Accelerate's ``gather_for_metrics`` would instead drop samples it thinks
    are duplicates of a padded sampler we do not use).
    """
    if accelerator is None or accelerator.num_processes == 1:
        return tensor
    n = torch.tensor([tensor.shape[0]], device=accelerator.device)
    sizes = accelerator.gather(n).tolist()  # [world]
    padded = accelerator.pad_across_processes(tensor.to(accelerator.device), dim=0)
    gathered = accelerator.gather(padded)  # [world * max, ...]
    chunks = gathered.split(max(sizes))
    return torch.cat([c[:s] for c, s in zip(chunks, sizes)])


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    accelerator: Any = None,
    max_batches: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every sample a labeled loader yields (all ranks).

    Args:
        encoder: a timm-style encoder or classifier (see :func:`encoder_features`).
        loader: yields ``(images [B, C, H, W], labels [B])``.
        device: where to run (default: the encoder's device).
        accelerator: gather from all processes (ranks may hold different counts).
        max_batches: stop early (quick checks).

    Returns:
        ``(features [N, D] float32 on CPU, labels [N] int64 on CPU)``.
    """
    was_training = encoder.training
    encoder.eval()
    device = device or next(encoder.parameters()).device
    feats, labels = [], []
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        feats.append(encoder_features(encoder, x.to(device)).float())  # [B, D]
        labels.append(y.to(device))
    encoder.train(was_training)
    d = feats[0].shape[-1] if feats else 0
    f = torch.cat(feats) if feats else torch.zeros(0, d, device=device)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    if accelerator is not None and accelerator.num_processes > 1:
        # a rank that got no batch still takes part in the gathers, with [0, D]
        d = int(accelerator.reduce(torch.tensor(d, device=accelerator.device), "max"))
        if f.shape[-1] != d:
            f = torch.zeros(0, d, device=device)
        f, y = gather_uneven(f, accelerator), gather_uneven(y, accelerator)
    return f.cpu(), y.cpu()


def knn_accuracy(
    encoder: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    *,
    num_classes: int | None = None,
    k: int = 20,
    T: float = 0.07,
    accelerator: Any = None,
) -> dict[str, float]:
    """Top-1 / top-5 kNN accuracy (%) of a frozen encoder.

    Args:
        encoder: a timm-style encoder (e.g. maevit ``ViTEncoder`` or a classifier).
        train_loader: labeled memory bank (no augmentation, ideally).
        val_loader: labeled queries.
        num_classes: default: from the loader's ``class_names``, else max label + 1.
        k, T: neighbours and temperature (20 and 0.07, as in DINO).
        accelerator: run on every rank; every rank gets the same numbers.

    Returns:
        ``{"knn_top1": ..., "knn_top5": ..., "knn_samples": N_val}``.
    """
    train_f, train_y = extract_features(encoder, train_loader, accelerator=accelerator)
    val_f, val_y = extract_features(encoder, val_loader, accelerator=accelerator)
    if num_classes is None:
        names = getattr(train_loader, "class_names", None)
        num_classes = len(names) if names else int(max(train_y.max(), val_y.max())) + 1
    return knn_top_k(train_f, train_y, val_f, val_y, num_classes=num_classes, k=k, T=T)


def knn_top_k(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    query_labels: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    T: float = 0.07,
) -> dict[str, float]:
    """Top-1 / top-5 kNN accuracy (%) of features already computed (the online probe, ``maevit knn``).

    Returns:
        ``{"knn_top1": ..., "knn_top5": ..., "knn_samples": Q}``.
    """
    val_y = query_labels
    scores = knn_classify(train_feats, train_labels, query_feats, num_classes=num_classes, k=k, T=T)  # [Q, C]
    top = scores.topk(min(5, num_classes), dim=-1).indices  # [Q, 5]
    n = max(1, val_y.numel())
    return {
        "knn_top1": 100.0 * (top[:, 0] == val_y).sum().item() / n,
        "knn_top5": 100.0 * (top == val_y[:, None]).any(-1).sum().item() / n,
        "knn_samples": int(val_y.numel()),
    }
