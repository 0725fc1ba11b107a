"""Normalization over visible positions only, for convolutional encoders under masking.

A convolutional stage that runs densely on a masked image sees masked
positions as zeros (the encoder multiplies its maps by the visible map before
every convolution that crosses a mask unit). Zeros are still *counted* by a
plain BatchNorm / GroupNorm: the statistics would depend on how much is
masked, and a masked-out position would change the mean every visible
position is normalised with. These norms take their statistics over visible
positions only (ConvMAE / SparK / Hiera do the same) and leave masked
positions at zero. With everything visible they equal ``nn.BatchNorm2d`` /
``nn.GroupNorm`` exactly (same running-statistics update, same outputs), so a
pretrained norm is used unchanged at fine-tuning.

timm and torch have no masked variant of either, hence this file.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_batch_norm(
    x: torch.Tensor,
    visible: torch.Tensor,
    bn: nn.BatchNorm2d,
) -> torch.Tensor:
    """BatchNorm of ``x [B, C, H, W]`` with statistics over positions where ``visible [B, 1, H, W]`` is 1.

    In training mode the batch statistics come from visible positions and the
    running statistics are updated with them (unbiased variance, as torch does);
    in eval mode the running statistics are used. Masked positions come out as 0.
    """
    w = visible.to(x.dtype)
    if bn.training or not bn.track_running_stats:
        n = w.sum(dim=(0, 2, 3)).clamp_min(1.0)  # [1]
        mean = (x * w).sum(dim=(0, 2, 3)) / n  # [C]
        var = (((x - mean[None, :, None, None]) * w) ** 2).sum(dim=(0, 2, 3)) / n  # biased, for normalising
        if bn.training and bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked += 1
                m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp_min(1.0)
                bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), m)
                bn.running_var.lerp_(unbiased.detach().to(bn.running_var.dtype), m)
    else:
        mean, var = bn.running_mean, bn.running_var
    y = (x - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + bn.eps)
    if bn.affine:
        y = y * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    return y * w


def masked_group_norm(x: torch.Tensor, visible: torch.Tensor, gn: nn.GroupNorm) -> torch.Tensor:
    """GroupNorm of ``x [B, C, H, W]`` with per-sample, per-group statistics over visible positions."""
    b, c, h, w_ = x.shape
    g = gn.num_groups
    w = visible.to(x.dtype)  # [B, 1, H, W]
    xg = x.reshape(b, g, c // g, h, w_)
    wg = w.reshape(b, 1, 1, h, w_)
    n = (wg.sum(dim=(2, 3, 4)) * (c // g)).clamp_min(1.0)  # [B, 1]
    mean = (xg * wg).sum(dim=(2, 3, 4)) / n  # [B, G]
    var = (((xg - mean[..., None, None, None]) * wg) ** 2).sum(dim=(2, 3, 4)) / n
    y = (xg - mean[..., None, None, None]) * torch.rsqrt(var[..., None, None, None] + gn.eps)
    y = y.reshape(b, c, h, w_)
    if gn.affine:
        y = y * gn.weight[None, :, None, None] + gn.bias[None, :, None, None]
    return y * w


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters and buffers) that accepts a visible map.

    ``forward(x)`` is the plain BatchNorm; ``forward(x, visible)`` takes its
    statistics over visible positions (:func:`masked_batch_norm`).
    """

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        if visible is None:
            return super().forward(x)
        return masked_batch_norm(x, visible, self)


class MaskedGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters) that accepts a visible map (:func:`masked_group_norm`)."""

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        if visible is None:
            return super().forward(x)
        return masked_group_norm(x, visible, self)
