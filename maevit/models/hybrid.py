"""Hybrid ViT: a ResNet-V2 stem (GroupNorm, weight-standardised convolutions) feeding ViT blocks,
with a leak-free MAE path.

The encoder is timm's hybrid, ``VisionTransformer(embed_layer=HybridEmbed(backbone=ResNetV2(...)))``,
with the backbone built by timm's own helper, so every parameter name is timm's and a classifier
loads into ``timm.create_model('vit_base_r50_s16_224', ...)`` strictly (:meth:`HybridEncoder.timm_spec`).
It subclasses :class:`~maevit.models.vit.ViTEncoder`: position table, class token, blocks,
pooling and head are the plain ViT's; only the embedding differs.

Masked pretraining, part by part (the mask unit is the token stride, ``patch_size``: 16 px for
R50 cut at stride 16, so every stem window is either inside one unit or straddles units whose
masked side reads as zeros):

- **ResNet stem and stages: dense with masking.** The pixels of masked units are zeroed; every
  GroupNorm takes its statistics over visible positions only and leaves masked positions at zero
  (:func:`~maevit.layers.masked_group_norm`), so each 7x7 / 3x3 convolution and the stem's
  max-pool read zeros there (the pool follows a ReLU, so a zero never beats a visible value: the
  same as skipping masked positions). Weight standardisation is per filter, with no spatial
  statistics, so it needs nothing. A dense CNN cannot skip masked units without sparse
  convolutions: the stem's FLOPs are the same masked or not, and the masked GroupNorm makes it
  1.4-1.6x timm's dense stem in CPU time (BENCHMARKS.md, "Encoder costs").
- **Patch projection** (non-overlapping, unit-aligned convolution) and position table: per token;
  the visible tokens are gathered right after.
- **ViT blocks: visible tokens only** (MAE's 75% saving).

As with every convolutional MAE (SparK, ConvMAE), stem windows at a unit border see zeros in
pretraining and real neighbours in fine-tuning; the GroupNorm statistics are over the visible
region in pretraining and the whole image in fine-tuning.
"""
from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from timm.layers import HybridEmbed
from timm.models.resnetv2 import ResNetV2
# timm's own backbone builder for its hybrids (same modules and names as vit_base_r50_s16_224 etc.)
from timm.models.vision_transformer_hybrid import _resnetv2
from torch import nn

from maevit.layers import masked_group_norm

from .masking import Mask, visible_map
from .patch import grid_shape, to_2tuple_size
from .registry import DECODER_BASE, DECODER_SMALL, build_encoder, register_model
from .vit import VIT_SIZES, ViTEncoder

# timm's hybrid architectures by ResNet-V2 stage depths (the backbone is fixed per architecture;
# the ViT part and the projection patch are arguments)
TIMM_HYBRIDS: dict[tuple[int, ...], str] = {
    (): "vit_tiny_r_s16_p8_224",  # stem only (stride 4) + a patch projection
    (3, 4, 9): "vit_base_r50_s16_224",  # R50 cut after stage 3: stride 16
    (2, 2, 2, 2): "vit_small_r26_s32_224",  # R26: stride 32
    (3, 4, 6, 3): "vit_large_r50_s32_224",  # R50: stride 32
}


# --------------------------------------------------------------------------- blocks


def backbone_stride(layers: tuple[int, ...]) -> int:
    """Output stride of timm's hybrid ResNet-V2: 4 after the stem, x2 for every stage after the first."""
    return 4 * 2 ** max(len(layers) - 1, 0)


def _norm(norm: nn.GroupNorm, x: torch.Tensor, mask: Mask) -> torch.Tensor:
    """timm's ``GroupNormAct`` on ``x [B, C, h, w]`` with statistics over its visible positions (masked -> 0)."""
    y = masked_group_norm(x, visible_map(mask, x.shape[-2:]), norm)
    return norm.act(norm.drop(y))


def masked_bottleneck(block: nn.Module, x: torch.Tensor, mask: Mask) -> torch.Tensor:
    """timm's (non-pre-activation) ``resnetv2.Bottleneck.forward`` with masked norms.

    ``x`` is zero at masked positions and so is the output: every norm zeroes them, so the 3x3
    convolution reads zeros there, and the residual sum is zero + zero.
    """
    shortcut = x
    if block.downsample is not None:  # DownsampleConv: strided 1x1 convolution + norm
        shortcut = _norm(block.downsample.norm, block.downsample.conv(x), mask)
    y = _norm(block.norm1, block.conv1(x), mask)
    y = _norm(block.norm2, block.conv2(y), mask)
    y = _norm(block.norm3, block.conv3(y), mask)
    return block.act3(block.drop_path(y) + shortcut)


def masked_resnetv2(backbone: nn.Module, x: torch.Tensor, mask: Mask) -> torch.Tensor:
    """timm's hybrid backbone (a ``ResNetV2``, or its stem alone) on ``x [B, C, H, W]``, masked.

    Walks timm's modules (their forward calls the norms without a mask) and returns the feature
    map ``[B, C', H / s, W / s]``, zero at masked positions. With nothing masked it equals
    ``backbone(x)`` up to float rounding.
    """
    stem = backbone.stem if isinstance(backbone, ResNetV2) else backbone
    x = x * visible_map(mask, x.shape[-2:])  # masked pixels -> 0 before the 7x7 convolution
    for layer in stem:  # conv, norm, pool
        x = _norm(layer, x, mask) if isinstance(layer, nn.GroupNorm) else layer(x)
    x = x * visible_map(mask, x.shape[-2:])  # the max-pool spreads visible values into masked units
    if isinstance(backbone, ResNetV2):
        if not isinstance(backbone.norm, nn.Identity):
            raise ValueError("masked_resnetv2 supports timm's non-pre-activation ResNetV2 (the hybrids' backbone)")
        for stage in backbone.stages:
            for block in stage.blocks:
                x = masked_bottleneck(block, x, mask)
    return x


class MaskedHybridEmbed(HybridEmbed):
    """timm's ``HybridEmbed`` (same modules and names) whose forward also takes a mask.

    ``forward(x)`` is timm's; ``forward(x, mask)`` runs the backbone masked
    (:func:`masked_resnetv2`), then the same projection and flattening.
    """

    def forward(self, x: torch.Tensor, mask: Mask | None = None) -> torch.Tensor:
        if mask is None:
            return super().forward(x)
        feats = masked_resnetv2(self.backbone, x, mask)  # [B, C', h, w], zero where masked
        return self.proj(feats).flatten(2).transpose(1, 2)  # [B, L, D]


# --------------------------------------------------------------------------- encoder


class HybridEncoder(ViTEncoder):
    """ResNet-V2 + ViT (timm's hybrid) with a masked CNN stem and visible-only blocks for MAE.

    Args:
        img_size: int or ``(H, W)``; multiples of ``patch_size``.
        patch_size: token stride in pixels: the reconstruction target and the mask unit. The
            backbone's stride (4 for the stem alone, 16 for three stages, 32 for four) times the
            side of the patch projection on top of it.
        layers: ResNet-V2 bottleneck blocks per stage, as in timm's hybrids: ``[]`` stem only,
            ``[3, 4, 9]`` R50 cut at stride 16, ``[2, 2, 2, 2]`` R26 and ``[3, 4, 6, 3]`` R50 at stride 32.
        in_chans, embed_dim, depth, num_heads, mlp_ratio, drop_path_rate: as :class:`ViTEncoder`.
        pos_encoding: ``sincos`` | ``learn`` | ``peg`` (``relpos`` / ``rope`` are built for the plain
            ViT's patch grid and are not offered here).
        attention: ``mha`` | ``talking_heads``.
        **kwargs: passed to timm's ``VisionTransformer``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        layers: tuple[int, ...] | list[int] = (3, 4, 9),
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        pos_encoding: Literal["sincos", "learn", "peg"] = "sincos",
        attention: Literal["mha", "talking_heads"] = "mha",
        drop_path_rate: float = 0.0,
        **kwargs,
    ) -> None:
        img_size = to_2tuple_size(img_size)
        layers = tuple(int(n) for n in layers)
        stride = backbone_stride(layers)
        if patch_size % stride:
            raise ValueError(
                f"patch_size={patch_size} is not a multiple of the ResNet's stride {stride} (layers={list(layers)}): "
                f"the token stride is the backbone's stride times the projection patch; use a multiple of {stride}"
            )
        if pos_encoding not in ("sincos", "learn", "peg"):
            raise ValueError(f"pos_encoding={pos_encoding!r} for a hybrid ViT: use sincos, learn or peg")
        if "embed_layer" in kwargs:
            raise ValueError("HybridEncoder builds its own embed_layer (timm's HybridEmbed); do not pass one")
        grid_shape(img_size, patch_size)  # clear error for sizes that do not divide
        backbone = _resnetv2(layers, in_chans=in_chans)
        super().__init__(
            img_size, patch_size // stride, in_chans, embed_dim, depth, num_heads, mlp_ratio, pos_encoding,
            attention, drop_path_rate, embed_layer=partial(MaskedHybridEmbed, backbone=backbone), **kwargs,
        )
        self.patch_size = patch_size  # ViTEncoder set the projection's patch; a token is patch_size pixels
        self.mask_unit = patch_size
        self.layers = layers
        if isinstance(backbone, ResNetV2):
            # timm's ViT init calls the backbone's init_weights() with its default zero_init_last=True,
            # zeroing the last norm of every residual branch (timm's _resnetv2 asks for False); with
            # those zeros the branch convolutions get no gradient on the first step
            backbone.init_weights(zero_init_last=False)

    def _embed(self, x: torch.Tensor, mask: Mask | None = None) -> torch.Tensor:
        """Tokens ``[B, L, D]`` with their position; with a ``mask``, masked pixels never reach them."""
        x = self.patch_embed(x, mask)
        if self.pos_embed is not None:
            x = x + self.pos_embed[:, self.num_prefix_tokens:]
        return x

    def timm_spec(self) -> tuple[str, dict] | None:
        """timm's hybrid with this backbone and these ViT sizes (None where timm has no such backbone)."""
        args = self.build_args or {}
        arch = TIMM_HYBRIDS.get(self.layers)
        if arch is None or args.get("pos_encoding", "sincos") not in ("sincos", "learn"):
            return None
        if args.get("attention", "mha") != "mha":
            return None
        own = {"img_size", "patch_size", "layers", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
               "pos_encoding", "attention", "drop_path_rate"}
        kwargs: dict = {k: v for k, v in args.items() if k not in own}  # extra timm VisionTransformer arguments
        kwargs.update(img_size=list(self.img_size), patch_size=self.patch_embed.patch_size[0],
                      embed_dim=self.embed_dim, depth=len(self.blocks), num_heads=self.blocks[0].attn.num_heads,
                      num_classes=self.num_classes, global_pool=self.global_pool)
        mlp_ratio = self.blocks[0].mlp.fc1.out_features / self.embed_dim
        if mlp_ratio != 4.0:
            kwargs["mlp_ratio"] = mlp_ratio
        if self.in_chans != 3:
            kwargs["in_chans"] = self.in_chans
        return arch, kwargs


# --------------------------------------------------------------------------- registrations


# MAE settings: the plain ViT's (registry defaults: ratio 0.75; layer decay per block, 0.75 for the Tiny as
# for ViT-Ti). The stem is not exempt from layer decay: giving it the full lr changed nothing measurable
# (BENCHMARKS.md, "Hybrid and SReT experiments").
@register_model(decoder=DECODER_SMALL, smoke=dict(img_size=64, depth=1), finetune=dict(layer_decay=0.75))
def mae_vit_tiny_r_s16(**kwargs) -> HybridEncoder:
    """ResNet stem + ViT-Ti at stride 16 (5.6M): timm's vit_tiny_r_s16_p8_224 with a 4x4 projection."""
    return build_encoder(HybridEncoder, kwargs, layers=[], patch_size=16, **VIT_SIZES["tiny"])


@register_model(decoder=DECODER_BASE, smoke=dict(img_size=64, depth=1, layers=[1, 1, 1], embed_dim=128, num_heads=4))
def mae_vit_base_r50_s16(**kwargs) -> HybridEncoder:
    """R50 (3 stages, GroupNorm) + ViT-B at stride 16 (98M): timm's vit_base_r50_s16_224."""
    return build_encoder(HybridEncoder, kwargs, layers=[3, 4, 9], patch_size=16, **VIT_SIZES["base"])
