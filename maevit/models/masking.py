"""Masking: which mask units (and so which patches) the encoder sees.

One convention everywhere (the published MAE one): for ``noise [B, U]`` over
the *mask units*, the ``K_u`` units with the smallest noise are kept; ``mask``
is 1 where a patch was removed. A mask unit is a square of ``s x s`` patches
(``s = mask_unit // patch_size``): 1 for a plain ViT, more for encoders that
downsample (a unit is their coarsest stride, so every window of every stage is
either fully visible or fully masked). The unit mask is expanded to patch level
for the decoder and the loss:

- ``ids_keep [B, K]``: visible patches, unit by unit in ascending-noise order,
  row-major inside a unit (``K = K_u * s * s``);
- ``ids_restore [B, L]``: the inverse of that shuffle (visible first, then
  masked), so ``shuffled.gather(1, ids_restore)`` is back in image order;
- ``mask [B, L]``: 1 = masked.

With ``s == 1`` this is exactly the published MAE masking (same noise, same
mask, bit for bit). Pass ``noise`` or a ``torch.Generator`` to reproduce a
mask exactly; the model draws the noise (:meth:`MaskedAutoencoder.random_mask`),
callers never build it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Mask(NamedTuple):
    """A batch of masks, at patch level and at mask-unit level.

    Attributes:
        ids_keep: ``[B, K]`` indices of visible patches (unit by unit, ascending noise).
        ids_restore: ``[B, L]`` inverse permutation: ``shuffled.gather(ids_restore)``
            puts tokens back in image order.
        mask: ``[B, L]`` float, 1 = masked (removed), 0 = visible.
        unit_ids_keep: ``[B, K_u]`` indices of visible units, ascending noise.
        unit_mask: ``[B, U]`` float, 1 = masked unit.
        unit_grid: ``(uh, uw)`` mask units along H and W.
        patches_per_unit: ``s``: a unit is ``s x s`` patches.
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor
    unit_ids_keep: torch.Tensor
    unit_mask: torch.Tensor
    unit_grid: tuple[int, int]
    patches_per_unit: int

    @property
    def patch_grid(self) -> tuple[int, int]:
        """``(gh, gw)`` patches along H and W."""
        return self.unit_grid[0] * self.patches_per_unit, self.unit_grid[1] * self.patches_per_unit


def num_visible(num_units: int, mask_ratio: float) -> int:
    """Units kept per sample: ``int(U * (1 - mask_ratio))``, as in published MAE."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep = int(num_units * (1.0 - mask_ratio))
    if keep < 1:
        raise ValueError(
            f"mask_ratio {mask_ratio} keeps no mask unit out of {num_units}; lower the ratio or use larger images"
        )
    return keep


def unit_patch_ids(unit_ids: torch.Tensor, unit_grid: tuple[int, int], s: int) -> torch.Tensor:
    """Patch indices ``[B, N * s * s]`` of units ``[B, N]``, unit by unit, row-major inside a unit.

    Args:
        unit_ids: ``[B, N]`` indices into the row-major unit grid.
        unit_grid: ``(uh, uw)``.
        s: patches per unit side.
    """
    if s == 1:
        return unit_ids
    uw = unit_grid[1]
    gw = uw * s
    r = torch.arange(s, device=unit_ids.device)
    inner = (r[:, None] * gw + r[None, :]).reshape(-1)  # [s*s] offsets of a unit's patches
    top_left = (unit_ids // uw) * s * gw + (unit_ids % uw) * s  # [B, N]
    return (top_left[..., None] + inner).flatten(1)  # [B, N*s*s]


def mask_from_noise(noise: torch.Tensor, num_keep: int, unit_grid: tuple[int, int] | None = None, s: int = 1) -> Mask:
    """Keep the ``num_keep`` units with the smallest noise, per sample.

    Args:
        noise: ``[B, U]`` any float values; ties are broken by index (stable sort).
        num_keep: units kept per sample, the same for every sample.
        unit_grid: ``(uh, uw)`` with ``uh * uw == U``; default ``(1, U)`` (only
            meaningful with ``s == 1``).
        s: patches per unit side.
    """
    b, num_units = noise.shape
    unit_grid = unit_grid or (1, num_units)
    if unit_grid[0] * unit_grid[1] != num_units:
        raise ValueError(f"noise has {num_units} units but the unit grid {unit_grid} has {unit_grid[0] * unit_grid[1]}")
    unit_shuffle = torch.argsort(noise, dim=1, stable=True)  # ascending: small is kept
    unit_mask = torch.ones(b, num_units, device=noise.device)
    unit_mask.scatter_(1, unit_shuffle[:, :num_keep], 0.0)
    ids_shuffle = unit_patch_ids(unit_shuffle, unit_grid, s)  # [B, L]
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    num_keep_patches = num_keep * s * s
    mask = torch.ones(b, ids_shuffle.shape[1], device=noise.device)
    mask[:, :num_keep_patches] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to image order
    return Mask(ids_shuffle[:, :num_keep_patches], ids_restore, mask, unit_shuffle[:, :num_keep], unit_mask,
                tuple(unit_grid), s)


def random_masking(
    batch_size: int,
    num_patches: int | tuple[int, int],
    mask_ratio: float,
    *,
    patches_per_unit: int = 1,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Mask:
    """Per-sample uniform random masking of mask units, by sorting noise.

    Args:
        batch_size: B.
        num_patches: L, or the patch grid ``(gh, gw)`` (needed when ``patches_per_unit > 1``).
        mask_ratio: fraction of units removed; ``int(U * (1 - ratio))`` units are kept.
        patches_per_unit: ``s``: units are ``s x s`` patches.
        noise: optional ``[B, U]``; when given, the mask is a pure function of it.
        generator: optional generator drawing the noise (ignored if ``noise`` is given).
        device: device of the result.
    """
    grid = (1, num_patches) if isinstance(num_patches, int) else tuple(num_patches)
    s = patches_per_unit
    if grid[0] % s or grid[1] % s:
        raise ValueError(f"a {grid[0]}x{grid[1]} patch grid does not divide into {s}x{s}-patch mask units")
    unit_grid = (grid[0] // s, grid[1] // s)
    num_units = unit_grid[0] * unit_grid[1]
    if noise is None:
        gen_device = generator.device if generator is not None else device
        noise = torch.rand(batch_size, num_units, generator=generator, device=gen_device)
    elif noise.shape != (batch_size, num_units):
        raise ValueError(
            f"noise has shape {tuple(noise.shape)}, expected [batch={batch_size}, mask units={num_units}]"
        )
    if device is not None:
        noise = noise.to(device)
    return mask_from_noise(noise, num_visible(num_units, mask_ratio), unit_grid, s)


def visible_map(mask: Mask, size: tuple[int, int]) -> torch.Tensor:
    """``[B, 1, h, w]`` float map, 1 where visible, at any resolution that the unit grid divides.

    Encoders with convolutions multiply their feature maps by this before every
    convolution that crosses a unit boundary, so masked positions read as zeros.
    """
    uh, uw = mask.unit_grid
    h, w = size
    if h % uh or w % uw:
        raise ValueError(f"a {h}x{w} map does not divide into the {uh}x{uw} grid of mask units")
    vis = (1.0 - mask.unit_mask).reshape(-1, 1, uh, uw)
    return F.interpolate(vis, size=(h, w), mode="nearest") if (h, w) != (uh, uw) else vis


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``x [B, N, D]`` at ``ids [B, K]`` -> ``[B, K, D]``."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(x: torch.Tensor, ids: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`gather_tokens`: ``x [B, K, D]`` placed at ``ids`` in zeros ``[B, length, D]``."""
    out = x.new_zeros(x.shape[0], length, x.shape[-1])
    return out.scatter(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)
