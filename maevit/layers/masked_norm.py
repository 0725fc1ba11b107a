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

import functools

import torch
from torch import nn


def _float32(fn):
    """Run a masked norm in float32 with autocast off and return the input's dtype (as autocast
    does for torch's own norms: reduced-precision statistics over thousands of positions drift)."""

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, visible: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        if x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
            return fn(x, visible, norm)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return fn(x.float(), visible.float(), norm).to(x.dtype)

    return wrapper


def _visible_sum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_p x[b, c, p] * w[b, p]`` -> ``[B, C]``: a batched matrix-vector product, no ``[B, C, P]`` temporary."""
    return torch.einsum("bcp,bp->bc", x, w)


@_float32
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
    b, c = x.shape[:2]
    w = visible.to(x.dtype).reshape(b, -1)  # [B, P]
    xf = x.reshape(b, c, -1)  # [B, C, P]
    if bn.training or not bn.track_running_stats:
        n = w.sum().clamp_min(1.0)
        mean = _visible_sum(xf, w).sum(0) / n  # [C]
        d = xf - mean[None, :, None]
        var = _visible_sum(d * d, w).sum(0) / n  # biased, for normalising
        if bn.training and bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked += 1
                m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp_min(1.0)
                bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), m)
                bn.running_var.lerp_(unbiased.detach().to(bn.running_var.dtype), m)
    else:
        mean, var = bn.running_mean, bn.running_var
        d = xf - mean[None, :, None]
    scale = torch.rsqrt(var + bn.eps)  # [C]
    if bn.affine:
        y = torch.addcmul(bn.bias[None, :, None], d, (scale * bn.weight)[None, :, None])
    else:
        y = d * scale[None, :, None]
    return (y * w[:, None, :]).reshape(x.shape)


@_float32
def masked_group_norm(x: torch.Tensor, visible: torch.Tensor, gn: nn.GroupNorm) -> torch.Tensor:
    """GroupNorm of ``x [B, C, H, W]`` with per-sample, per-group statistics over visible positions."""
    b, c = x.shape[:2]
    g = gn.num_groups
    w = visible.to(x.dtype).reshape(b, -1)  # [B, P]
    xf = x.reshape(b, c, -1)  # [B, C, P]
    n = (w.sum(dim=1) * (c // g)).clamp_min(1.0)[:, None]  # [B, 1]
    mean = _visible_sum(xf, w).reshape(b, g, -1).sum(-1) / n  # [B, G]
    d = xf - mean.repeat_interleave(c // g, dim=1)[..., None]
    var = _visible_sum(d * d, w).reshape(b, g, -1).sum(-1) / n
    scale = torch.rsqrt(var + gn.eps).repeat_interleave(c // g, dim=1)  # [B, C]
    if gn.affine:
        y = torch.addcmul(gn.bias[None, :, None], d, (scale * gn.weight)[..., None])
    else:
        y = d * scale[..., None]
    return (y * w[:, None, :]).reshape(x.shape)


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
