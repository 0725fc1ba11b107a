"""Plain ViT encoder for MAE (timm's ``VisionTransformer`` with a masked path).

The encoder *is* a timm ``VisionTransformer`` (class token, no head), so its
parameter names are timm's and an exported state dict loads into
``timm.create_model('vit_base_patch16_224', num_classes=0)`` strictly. We only
add what timm does not have: a fixed 2-D sin-cos position table for any grid,
MAE's initialisation, and ``forward_masked`` that runs on visible patches only.
"""
from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .patch import grid_shape, to_2tuple_size
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


class ViTEncoder(VisionTransformer):
    """ViT encoder with a visible-patches-only path for MAE.

    Args:
        img_size: int or ``(H, W)``; both must be multiples of ``patch_size``.
        patch_size: patch side in pixels (the reconstruction unit).
        in_chans: input channels (any number).
        embed_dim, depth, num_heads, mlp_ratio: transformer size.
        sincos_pos_embed: fixed 2-D sin-cos table (MAE) instead of a learned one.
        **kwargs: passed to timm's ``VisionTransformer`` (e.g. ``drop_path_rate``).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        sincos_pos_embed: bool = True,
        **kwargs,
    ) -> None:
        img_size = to_2tuple_size(img_size)
        grid_shape(img_size, patch_size)  # clear error for sizes that do not divide
        kwargs.setdefault("num_classes", 0)
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            class_token=True,
            **kwargs,
        )
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.mask_unit = patch_size  # plain ViT is masked per patch
        if sincos_pos_embed:
            self.pos_embed.requires_grad_(False)
            self.pos_embed.data.copy_(
                sincos_2d(embed_dim, self.grid_size, self.num_prefix_tokens).unsqueeze(0)
            )
        self._init_mae()

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches along (H, W)."""
        return tuple(self.patch_embed.grid_size)

    def _init_mae(self) -> None:
        init_mae_weights(self.blocks)
        init_mae_weights(self.norm)
        # patch embedding initialised like a Linear layer (MAE)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def _check_input(self, x: torch.Tensor) -> None:
        expected = tuple(self.patch_embed.img_size)
        if tuple(x.shape[-2:]) != expected or x.shape[1] != self.in_chans:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not match the model: expected "
                f"[B, {self.in_chans}, {expected[0]}, {expected[1]}]; build the model with "
                f"img_size={tuple(x.shape[-2:])} / in_chans={x.shape[1]} or resize the images"
            )

    def forward_masked(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encode only the visible patches.

        Args:
            x: images ``[B, C, H, W]``.
            ids_keep: ``[B, K]`` indices of visible patches (row-major patch order).

        Returns:
            ``[B, num_prefix_tokens + K, D]`` normalised tokens.
        """
        self._check_input(x)
        x = self.patch_embed(x)  # [B, L, D]
        b, _, d = x.shape
        x = x + self.pos_embed[:, self.num_prefix_tokens :]
        # dropping masked patches after the (per-patch) embedding means their pixels
        # cannot reach the output
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # [B, K, D]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1)  # [B, 1 + K, D]
        x = self.norm_pre(x)
        x = self.blocks(x)
        return self.norm(x)


VIT_SIZES: dict[str, dict] = {
    # name: (embed_dim, depth, num_heads) as in timm / DeiT / MAE
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}


def timm_vit_name(size: str, patch_size: int, img_size: int | tuple[int, int] = 224) -> str:
    """The timm model name for a plain ViT of this size (for export / loading)."""
    h, _ = to_2tuple_size(img_size)
    return f"vit_{size}_patch{patch_size}_{h if h in (224, 384, 518) else 224}"


