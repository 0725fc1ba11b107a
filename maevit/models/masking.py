"""Masking: which patches (or units) the encoder sees.

One convention everywhere (the published MAE one): for ``noise [B, L]`` the
``K`` patches with the smallest noise are kept; ``mask`` is 1 where a patch was
removed. Pass ``noise`` or a ``torch.Generator`` to reproduce a mask exactly.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Mask(NamedTuple):
    """Result of a masking function.

    Attributes:
        ids_keep: ``[B, K]`` indices of visible patches, in ascending-noise order.
        ids_restore: ``[B, L]`` inverse permutation: ``shuffled.gather(ids_restore)``
            puts tokens back in image order.
        mask: ``[B, L]`` float, 1 = masked (removed), 0 = visible.
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches kept per sample: ``int(L * (1 - mask_ratio))``, as in published MAE."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep = int(num_patches * (1.0 - mask_ratio))
    if keep < 1:
        raise ValueError(
            f"mask_ratio {mask_ratio} keeps no patch out of {num_patches}; lower the ratio"
        )
    return keep


def mask_from_noise(noise: torch.Tensor, num_keep: int) -> Mask:
    """Keep the ``num_keep`` patches with the smallest noise, per sample.

    Args:
        noise: ``[B, L]`` any float values; ties are broken by index (stable sort).
        num_keep: patches kept per sample, the same for every sample.
    """
    b, length = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # ascending: small is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_keep]
    mask = torch.ones(b, length, device=noise.device)
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to image order
    return Mask(ids_keep, ids_restore, mask)


def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Mask:
    """Per-sample uniform random masking by sorting noise.

    Args:
        batch_size: B.
        num_patches: L.
        mask_ratio: fraction removed; ``int(L * (1 - ratio))`` patches are kept.
        noise: optional ``[B, L]``; when given, the mask is a pure function of it.
        generator: optional generator drawing the noise (ignored if ``noise`` given).
        device: device of the generated noise.
    """
    if noise is None:
        gen_device = generator.device if generator is not None else device
        noise = torch.rand(batch_size, num_patches, generator=generator, device=gen_device)
        if device is not None:
            noise = noise.to(device)
    elif noise.shape != (batch_size, num_patches):
        raise ValueError(
            f"noise has shape {tuple(noise.shape)}, expected [batch={batch_size}, patches={num_patches}]"
        )
    return mask_from_noise(noise, num_visible(num_patches, mask_ratio))
