"""Patchify / unpatchify: images <-> sequences of flattened patches.

Pixel order inside a patch is (row, column, channel), the order used by the
published MAE code and by Hugging Face's ViTMAE, so predictions and targets
can be compared across the three.
"""
from __future__ import annotations

import torch


def to_2tuple_size(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Return ``(H, W)`` for an int or a pair."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def grid_shape(img_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Number of patches along (H, W); raises if the image does not divide evenly.

    Args:
        img_size: image size as an int or ``(H, W)``.
        patch_size: side of one square patch in pixels.
    """
    h, w = to_2tuple_size(img_size)
    if h % patch_size or w % patch_size:
        raise ValueError(
            f"image size {h}x{w} is not divisible by patch size {patch_size}; "
            f"use an image size that is a multiple of {patch_size} "
            f"(e.g. {h // patch_size * patch_size}x{w // patch_size * patch_size})"
        )
    return h // patch_size, w // patch_size


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Split images into flattened patches.

    Args:
        imgs: ``[B, C, H, W]``; H and W must be multiples of ``patch_size``.
        patch_size: side of one square patch.

    Returns:
        ``[B, L, patch_size**2 * C]`` with ``L = (H / p) * (W / p)``, patches in
        row-major order.
    """
    b, c, _, _ = imgs.shape
    gh, gw = grid_shape(tuple(imgs.shape[-2:]), patch_size)
    p = patch_size
    x = imgs.reshape(b, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # [B, gh, gw, p, p, C]
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(
    patches: torch.Tensor, patch_size: int, grid: tuple[int, int], in_chans: int
) -> torch.Tensor:
    """Inverse of :func:`patchify`.

    Args:
        patches: ``[B, L, patch_size**2 * in_chans]``.
        patch_size: side of one square patch.
        grid: ``(gh, gw)`` patches along H and W, ``gh * gw == L``.
        in_chans: channels per pixel.

    Returns:
        ``[B, in_chans, gh * p, gw * p]``.
    """
    b, length, dim = patches.shape
    gh, gw = grid
    p = patch_size
    if gh * gw != length or dim != p * p * in_chans:
        raise ValueError(
            f"cannot unpatchify [B, {length}, {dim}] into a {gh}x{gw} grid of "
            f"{p}x{p}x{in_chans} patches (expected [B, {gh * gw}, {p * p * in_chans}])"
        )
    x = patches.reshape(b, gh, gw, p, p, in_chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, in_chans, gh * p, gw * p)
