"""Optimisation pieces: learning-rate schedules, parameter groups, AdamW.

Schedules are pure functions of the optimizer step, so resuming only needs the
step counter (no scheduler object to save, and none of Accelerate's
scheduler-stepping rules to get wrong).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

# Parameters that never get weight decay besides biases and norm weights (1-D,
# handled by timm): position tables (if learned), and class / mask / other tokens.
NO_WEIGHT_DECAY = ("*pos_embed", "*cls_token", "*mask_token", "*reg_token")  # (families add theirs)


def cosine_lr(step: float, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0, then half-cosine decay from ``base_lr`` to ``min_lr``.

    Args:
        step: optimizer steps done (may be fractional).
        base_lr: peak learning rate, reached at ``warmup_steps``.
        warmup_steps: length of the linear warm-up.
        total_steps: the schedule ends at ``min_lr`` here (and stays there).
        min_lr: final learning rate.
    """
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if total_steps <= warmup_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(base_lr: float, effective_batch: int, reference_batch: int = 256) -> float:
    """The linear scaling rule: ``base_lr * effective_batch / 256``.

    Args:
        effective_batch: per-process batch x processes x accumulation steps.
    """
    return base_lr * effective_batch / reference_batch


def no_weight_decay_names(model: nn.Module, extra: Iterable[str] = NO_WEIGHT_DECAY) -> tuple[str, ...]:
    """Names / patterns without weight decay: the model's own ``no_weight_decay()`` (the encoder
    contract; an MAE's encoder names are prefixed ``encoder.``) plus ``extra`` patterns."""
    names = set(extra)
    for prefix, module in (("", model), ("encoder.", getattr(model, "encoder", None))):
        if module is not None and hasattr(module, "no_weight_decay"):
            names |= {prefix + n for n in module.no_weight_decay()}
    return tuple(sorted(names))


def param_groups(
    model: nn.Module, weight_decay: float, no_weight_decay: Iterable[str] = NO_WEIGHT_DECAY
) -> list[dict[str, Any]]:
    """Two groups: decayed weights, and biases / norms / position tables / tokens.

    Frozen parameters (``requires_grad=False``, e.g. MAE's fixed sin-cos tables)
    are left out. ``no_weight_decay`` holds fnmatch patterns on parameter names,
    added to the model's own ``no_weight_decay()``.
    """
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_weight_decay_names(model, no_weight_decay))


def fused_supported(device: torch.device) -> bool:
    """Whether ``torch.optim.AdamW(fused=True)`` runs on ``device``."""
    return device.type in ("cuda", "cpu", "xpu", "mps")


def build_adamw(
    model_or_groups: nn.Module | list[dict[str, Any]],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` of a model, or over given parameter groups (MAE's betas by default).

    Args:
        model_or_groups: a model, or groups such as :func:`param_groups_layer_decay`'s.
        fused: use the fused kernel (default: where supported). The fused kernel can
            skip a step on the device (``optimizer.found_inf``), which the training
            loops use to drop non-finite steps without a host synchronisation.
    """
    if isinstance(model_or_groups, nn.Module):
        groups = param_groups(model_or_groups, weight_decay)
    else:
        groups = model_or_groups
    if fused is None:
        first = next(p for g in groups for p in g["params"])
        fused = fused_supported(first.device)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr (groups with ``lr_scale``, e.g. layer decay, are scaled)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def param_groups_layer_decay(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float,
    no_weight_decay: Iterable[str] = NO_WEIGHT_DECAY,
    *,
    by: str | None = "block",
    exempt: Iterable[str] | None = (),
) -> list[dict[str, Any]]:
    """Layer-wise lr decay groups for fine-tuning (BEiT / MAE; by stage: FCMAE).

    Layer ids come from the model's ``group_matcher`` (timm's): with ``by="block"``, 0 for the
    stem / ``patch_embed`` / tokens, ``i + 1`` for block ``i``, the last id for the final norm
    and the head; with ``by="stage"``, ``group_matcher(coarse=True)``: one id per stage of a
    hierarchical model. Each group's ``lr_scale`` is ``layer_decay ** (last_id - layer_id)``
    (the published rule); parameters matching ``exempt`` keep the full lr (scale 1: a CNN stem
    that pretraining on masked images left far from what whole images need). :func:`set_lr`
    applies the scales. Biases, norms, position tables and tokens get no weight decay. Frozen
    parameters are left out.

    Args:
        model: an encoder with ``group_matcher`` (every registered family has one).
        weight_decay: for matrices (0 for the rest).
        layer_decay: per-group lr factor (MAE: 0.65 for ViT-B, 0.75 for L / H; 1.0: off).
        by: ``"block"`` or ``"stage"`` (None: ``"block"``).
        exempt: fnmatch patterns of parameter names that keep the full lr.
    """
    from fnmatch import fnmatchcase

    from timm.models import group_parameters

    if by not in (None, "block", "stage"):
        raise ValueError(f"layer-decay grouping by={by!r}: use 'block' or 'stage'")
    layer_map = group_parameters(model, model.group_matcher(coarse=by == "stage"), reverse=True)
    last = max(layer_map.values(), default=0)  # the final norm; the head and anything unmatched join it
    skip_decay = no_weight_decay_names(model, no_weight_decay)
    exempt = tuple(exempt or ())
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or any(fnmatchcase(name, pat) for pat in skip_decay))
        layer = last if any(fnmatchcase(name, pat) for pat in exempt) else layer_map.get(name, last)
        group = groups.setdefault((layer, decay), dict(
            lr_scale=layer_decay ** (last - layer), weight_decay=weight_decay if decay else 0.0, params=[]))
        group["params"].append(param)
    return list(groups.values())
