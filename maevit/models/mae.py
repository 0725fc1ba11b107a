"""MaskedAutoencoder: encoder on visible patches + light decoder + masked L2 loss."""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
from timm.models.vision_transformer import Block
from torch import nn

from .masking import Mask, num_visible, random_masking
from .patch import patchify
from .pos_embed import sincos_2d


def init_mae_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform Linear, zero bias, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MAEOutput(NamedTuple):
    """What :meth:`MaskedAutoencoder.forward` returns, whatever the options.

    Attributes:
        loss: scalar, mean squared error over masked patches.
        pred: ``[B, L, p*p*C]`` predicted patches (normalised pixels if
            ``norm_pix_loss``), in :func:`~maevit.models.patch.patchify` order.
        mask: ``[B, L]``, 1 = masked.
        ids_restore: ``[B, L]`` inverse shuffle used for this batch.
        latent: ``[B, prefix + K, D]`` encoder output on the visible patches (``mask.ids_keep`` order).
    """

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    ids_restore: torch.Tensor
    latent: torch.Tensor


def masked_mse_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = False
) -> torch.Tensor:
    """Mean squared error over masked patches only.

    Args:
        pred, target: ``[B, L, P]``.
        mask: ``[B, L]``, 1 = masked (counted), 0 = visible (ignored).
        norm_pix: normalise each target patch to zero mean, unit variance first.
    """
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as published
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # [B, L]
    return (per_patch * mask).sum() / mask.sum()


class MAEDecoder(nn.Module):
    """Light transformer that rebuilds every patch from the visible tokens.

    Args:
        grid: ``(gh, gw)`` patch grid.
        encoder_dim: width of the encoder tokens.
        embed_dim, depth, num_heads, mlp_ratio: decoder size.
        patch_size, in_chans: size of one predicted patch (``p*p*C`` values).
        num_prefix_tokens: encoder prefix tokens carried through (class token).
    """

    def __init__(
        self,
        grid: tuple[int, int],
        encoder_dim: int,
        embed_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        patch_size: int = 16,
        in_chans: int = 3,
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(encoder_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        table = sincos_2d(embed_dim, grid, num_prefix_tokens).unsqueeze(0)
        self.pos_embed = nn.Parameter(table, requires_grad=False)  # fixed, saved
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(
            *[Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)
        self.pred = nn.Linear(embed_dim, patch_size * patch_size * in_chans)
        init_mae_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """``latent [B, prefix + K, De]``, ``ids_restore [B, L]`` -> ``[B, L, p*p*C]``."""
        x = self.embed(latent)  # [B, prefix + K, D]
        b, length = ids_restore.shape
        n = self.num_prefix_tokens
        prefix, visible = x[:, :n], x[:, n:]
        masked = self.mask_token.expand(b, length - visible.shape[1], -1)
        x = torch.cat([visible, masked], dim=1)  # shuffled order
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # image order
        x = torch.cat([prefix, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.pred(x[:, n:])  # no prediction for prefix tokens (and not a view: FSDP2 warns on views)


class MaskedAutoencoder(nn.Module):
    """MAE: the encoder sees visible units only; the decoder rebuilds every patch.

    Args:
        encoder: any encoder meeting :mod:`maevit.models.contract`.
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder size.
        norm_pix_loss: per-patch normalised pixel targets (the published recipe).
        mask_ratio: default fraction of mask units removed.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = True,
        mask_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = MAEDecoder(
            encoder.grid_size,
            encoder.num_features,
            decoder_embed_dim,
            decoder_depth,
            decoder_num_heads,
            4.0,
            encoder.patch_size,
            encoder.in_chans,
            encoder.num_prefix_tokens,
        )
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = mask_ratio
        self._check_mask_ratio(mask_ratio)
        # "visible" (MAE) or "mask_tokens" (the encoder's SimMIM-style reference path; benchmarks only)
        self.encoder_path = "visible"
        self.mae_args = dict(decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
                             decoder_num_heads=decoder_num_heads, norm_pix_loss=norm_pix_loss, mask_ratio=mask_ratio)

    @property
    def model_name(self) -> str:
        return self.encoder.model_name

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.encoder.grid_size)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    def _check_mask_ratio(self, ratio: float) -> None:
        """A ratio that keeps no unit, or masks none, at this image size is refused when the model is built
        (not at its first step): with few units per image, e.g. 0.95 of 16 keeps int(0.8) = 0."""
        s = self.encoder.mask_unit // self.encoder.patch_size
        gh, gw = self.grid_size
        units = (gh // s) * (gw // s)
        keep = num_visible(units, ratio)  # raises when none is kept
        if keep >= units:
            raise ValueError(f"mask_ratio {ratio} masks no mask unit out of {units} (it keeps {keep}); raise the "
                             f"ratio (MAE: 0.75) or use larger images")

    def random_mask(
        self,
        batch_size: int,
        *,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Mask:
        """Draw a mask at the encoder's mask unit (``noise [B, U]`` or a ``generator`` fixes it)."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        s = self.encoder.mask_unit // self.encoder.patch_size
        return random_masking(batch_size, self.grid_size, ratio, patches_per_unit=s, noise=noise,
                              generator=generator, device=device)

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        mask: Mask | None = None,
    ) -> MAEOutput:
        """Mask, encode, decode and score a batch.

        Args:
            imgs: ``[B, C, H, W]``.
            mask_ratio: overrides the model's default ratio for this call.
            noise: ``[B, U]`` over mask units; the same noise gives the same mask.
            generator: draws the noise when ``noise`` is not given.
            mask: a mask already drawn by :meth:`random_mask` (when the caller needs it too, e.g. a
                distillation teacher that encodes the same visible units); the arguments above are then unused.
        """
        if mask is None:
            mask = self.random_mask(imgs.shape[0], mask_ratio=mask_ratio, noise=noise, generator=generator,
                                    device=imgs.device)
        encode = self.encoder.forward_masked if self.encoder_path == "visible" else self.encoder.forward_mask_tokens
        latent = encode(imgs, mask)  # [B, prefix + K, D]
        pred = self.decoder(latent, mask.ids_restore)  # [B, L, p*p*C]
        target = patchify(imgs, self.patch_size)
        loss = masked_mse_loss(pred, target, mask.mask, self.norm_pix_loss)
        return MAEOutput(loss, pred, mask.mask, mask.ids_restore, latent)
