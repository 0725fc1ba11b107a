"""Convolutions over a dense map whose masked positions must stay invisible.

Under masked pretraining a convolution whose window crosses a mask unit would
mix masked pixels into visible outputs. Running it densely on a map whose
masked positions are zero gives the semantics of a sparse (submanifold)
convolution at the visible sites, as SparK / ConvMAE / Hiera do: masked
neighbours read as zeros, like padding. Two small helpers:

- :func:`masked_conv`: ``conv(x * visible)``;
- :func:`conv_visible`: the visible map of a convolution's *output* when its
  stride makes it coarser than the mask unit, so an output site can no longer
  be assigned to one unit: a site is visible when its window holds any visible
  input (a max-pool of the input map with the convolution's geometry).

torch and timm have neither, hence this file.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_conv(conv: nn.Module, x: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    """``conv`` applied to ``x [B, C, H, W]`` with masked positions zeroed (``visible [B, 1, H, W]``, 1 = visible;
    None = nothing masked)."""
    return conv(x if visible is None else x * visible.to(x.dtype))


def conv_visible(
    visible: torch.Tensor, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
) -> torch.Tensor:
    """Visible map ``[B, 1, h, w]`` of a convolution's output: 1 where its window covers any visible input.

    Args:
        visible: ``[B, 1, H, W]`` 0/1 map of the convolution's input.
        kernel_size, stride, padding: the convolution's geometry (zero padding counts as masked).
    """
    return F.max_pool2d(visible, kernel_size, stride, padding)  # max-pool padding is -inf: never visible
