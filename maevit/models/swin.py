"""Swin Transformer encoders (timm's ``SwinTransformer``) pretrained visible-only with
GreenMIM's group window attention.

The encoder *is* a timm ``SwinTransformer``: its blocks, window attention,
relative-position bias tables and patch merging are timm's modules with timm's
names, so a classifier exports to a file ``timm.create_model('swin_tiny_patch4_window7_224', ...)``
loads strictly (:meth:`SwinEncoder.timm_spec` gives the call), and fine-tuning
runs timm's own dense forward.

Masking. Swin downsamples by 4 (patch embedding), then 2, 2, 2 (patch merging):
strides 4 / 8 / 16 / 32. The mask unit is the coarsest stride, 32 px, i.e.
8 x 8 stage-1 tokens, 4 x 4 stage-2, 2 x 2 stage-3 and one stage-4 token. The
reconstruction target is one 32 px patch per stage-4 token (``patch_size`` =
``mask_unit``: every output token is one target, as in GreenMIM); note that
the constructor's ``patch_size`` is timm's (the stem stride, 4).

What runs visible-only, per stage (``forward_masked``):

- patch embedding: only the pixels of visible units are cut out and embedded
  (the 4 x 4 / stride-4 convolution never crosses a unit), then timm's norm;
- every stage: patch merging joins 2 x 2 tokens at even coordinates, which
  always lie inside one unit (a unit is 8, 4, 2 tokens wide before merging), so
  merging the visible units' tokens unit by unit is exact;
- every block: window attention over the visible tokens only. Windows do *not*
  line up with units in general (window 7 = 28 px at stage 1 against 32 px
  units; at 224 px: stage 1 56 x 56 tokens / 7 x 7 windows, stage 2 28 x 28,
  stage 3 14 x 14, stage 4 7 x 7 = a single window), so a window holds a ragged
  set of visible tokens. GreenMIM's group window attention
  (:mod:`maevit.layers.window_group`) packs the visible tokens of whole windows
  into equal-size groups with a mask that keeps attention inside each window
  (and timm's shifted-window regions), and gathers the relative-position bias
  per pair from the block's own table. A visible token attends to the visible
  tokens of its window; masked tokens do not exist anywhere, so their pixels
  cannot reach the output. With nothing masked every group is one full window
  and the result equals timm's dense forward (tested against
  ``timm.create_model``).

Nothing runs dense with masking: the encoder is ``visible_only``. The
SimMIM-style reference :meth:`SwinEncoder.forward_mask_tokens` (benchmarks only)
runs timm's dense forward with masked stage-1 tokens set to zero.

Image sizes: the image must be a multiple of the mask unit and each stage's
grid a multiple of its window (timm clips a window larger than the grid to the
grid). timm would otherwise pad windows with zero tokens that take part in the
attention, which a visible-only path cannot reproduce; the constructor says so.

Fine-tuning at another resolution or window: :meth:`SwinEncoder.checkpoint_filter`
(timm's ``checkpoint_filter_fn``) resizes the relative-position tables to the
model's windows (``resize_rel_pos_bias_table``), resamples the patch embedding
and maps the original Microsoft checkpoints' names.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, WindowAttention
from torch import nn

from maevit.layers.window_group import WindowGroups, group_tokens, ungroup_tokens, window_groups

from .contract import EncoderMixin
from .masking import Mask, gather_tokens, visible_map
from .patch import grid_shape, to_2tuple_size
from .registry import DECODER_BASE, DECODER_SMALL, build_encoder, register_model

# --------------------------------------------------------------------------- blocks


def unit_pixels(x: torch.Tensor, unit_ids: torch.Tensor, unit: int) -> torch.Tensor:
    """The pixels of the units ``unit_ids [B, K]``: ``[B, C, H, W]`` -> ``[B * K, C, unit, unit]``."""
    b, c, h, w = x.shape
    uh, uw = h // unit, w // unit
    units = x.reshape(b, c, uh, unit, uw, unit).permute(0, 2, 4, 1, 3, 5).reshape(b, uh * uw, c * unit * unit)
    return gather_tokens(units, unit_ids).reshape(-1, c, unit, unit)  # [B*K, C, u, u]


def unit_token_coords(unit_ids: torch.Tensor, unit_grid: tuple[int, int], s: int) -> torch.Tensor:
    """(row, column) of the ``s x s`` tokens of each unit, unit by unit, row-major inside a unit.

    Args:
        unit_ids: ``[B, K]`` indices into the row-major unit grid.
        unit_grid: ``(uh, uw)``.
        s: tokens per unit side at this stage.

    Returns:
        ``[B, K * s * s, 2]`` long coordinates on the stage's ``(uh * s, uw * s)`` grid.
    """
    r = torch.arange(s, device=unit_ids.device)
    inner = torch.stack(torch.meshgrid(r, r, indexing="ij"), -1).reshape(1, 1, s * s, 2)  # [1, 1, s*s, 2]
    top_left = torch.stack([unit_ids // unit_grid[1], unit_ids % unit_grid[1]], -1) * s  # [B, K, 2]
    return (top_left.unsqueeze(2) + inner).flatten(1, 2)


def grouped_window_attention(attn: WindowAttention, x: torch.Tensor, groups: WindowGroups) -> torch.Tensor:
    """timm's ``WindowAttention`` over grouped visible tokens: ``x [B, N, C]`` -> ``[B, N, C]``.

    The projections run on the N real tokens; only the attention itself runs on
    the padded groups. The relative-position bias is gathered per pair from the
    module's own table, so with full windows this is timm's computation (fused
    or not, following ``attn.fused_attn``).
    """
    qkv = group_tokens(attn.qkv(x), groups)  # [BG, G, 3 * H * hd]
    bg, g, _ = qkv.shape
    q, k, v = qkv.reshape(bg, g, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [BG, H, G, hd]
    bias = attn.relative_position_bias_table[groups.rel_index].permute(0, 3, 1, 2)  # [BG, H, G, G]
    if attn.fused_attn:
        mask = (bias + groups.attn_mask).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1) + bias + groups.attn_mask  # timm's order of additions
        out = attn.attn_drop(attn.softmax(logits)) @ v
    out = ungroup_tokens(out.transpose(1, 2).reshape(bg, g, -1), groups)  # [B, N, H * hd]
    return attn.proj_drop(attn.proj(out))


def visible_block(blk: SwinTransformerBlock, x: torch.Tensor, groups: WindowGroups) -> torch.Tensor:
    """timm's ``SwinTransformerBlock.forward`` on visible tokens ``x [B, N, C]`` (windows as ``groups``)."""
    x = x + blk.drop_path1(grouped_window_attention(blk.attn, blk.norm1(x), groups))
    return x + blk.drop_path2(blk.mlp(blk.norm2(x)))


# --------------------------------------------------------------------------- encoder


class SwinEncoder(EncoderMixin, SwinTransformer):
    """Swin Transformer with a visible-only MAE path (GreenMIM's group window attention).

    Args:
        img_size: int or ``(H, W)``; multiples of the mask unit (``patch_size * 2 ** (stages - 1)``).
        patch_size: timm's stem stride (4); the reconstruction patch is the mask unit.
        in_chans: input channels.
        embed_dim, depths, num_heads, window_size, mlp_ratio: timm's Swin size arguments.
        drop_path_rate: stochastic depth (timm's default 0.1 is for supervised training; 0 for MAE).
        **kwargs: passed to timm's ``SwinTransformer`` (e.g. ``qkv_bias``, ``attn_drop_rate``).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence = 7,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        **kwargs,
    ) -> None:
        img_size = to_2tuple_size(img_size)
        unit = patch_size * 2 ** (len(depths) - 1)
        if img_size[0] % unit or img_size[1] % unit:
            raise ValueError(
                f"img_size {img_size[0]}x{img_size[1]} is not a multiple of the Swin mask unit {unit} px "
                f"(stem stride {patch_size} x 2^{len(depths) - 1} patch mergings): masking must follow the coarsest "
                f"stride. Use a multiple of {unit} (e.g. {max(unit, img_size[0] // unit * unit)})"
            )
        kwargs.setdefault("num_classes", 0)
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depths=tuple(depths),
            num_heads=tuple(num_heads), window_size=window_size, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate,
            **kwargs,
        )
        self._check_windows()
        self.img_size = img_size
        self.mask_unit = unit
        self.patch_size = unit  # one reconstruction target per stage-4 token (timm's stem stride: patch_embed.patch_size)
        self.num_prefix_tokens = 0
        self._window_arg = window_size

    def _check_windows(self) -> None:
        for i, stage in enumerate(self.layers):
            for blk in stage.blocks:
                (h, w), (wh, ww) = blk.input_resolution, blk.window_size
                if h % wh or w % ww:
                    raise ValueError(
                        f"stage {i} of this Swin has a {h}x{w} token grid that {wh}x{ww} windows do not tile: timm "
                        "would pad the windows with zero tokens that take part in attention, which the visible-only "
                        "MAE path cannot reproduce. Pick a window_size that divides every stage grid "
                        f"({[tuple(s.blocks[0].input_resolution) for s in self.layers]}) or an image size that makes "
                        "them multiples of the window (e.g. 224 with window 7, 256 with window 8)"
                    )

    @property
    def grid_size(self) -> tuple[int, int]:
        """Reconstruction patches (stage-4 tokens) along (H, W)."""
        return grid_shape(self.img_size, self.patch_size)

    # ----------------------------------------------------------------- forward

    def forward_masked(self, x: torch.Tensor, mask: Mask) -> torch.Tensor:
        """Encode only the visible units: ``[B, C, H, W]`` -> ``[B, K, D]`` (``mask.ids_keep`` order)."""
        self.check_input(x)
        if tuple(mask.unit_grid) != self.grid_size or mask.patches_per_unit != 1:
            raise ValueError(f"the mask is drawn over a {mask.unit_grid} unit grid with {mask.patches_per_unit}^2 "
                             f"patches per unit; this Swin needs {self.grid_size} units of one patch (mask_unit "
                             f"{self.mask_unit} px): draw it with MaskedAutoencoder.random_mask")
        b = x.shape[0]
        units = mask.unit_ids_keep  # [B, K]
        k = units.shape[1]
        t = self.patch_embed.proj(unit_pixels(x, units, self.mask_unit))  # [B*K, D, s, s]: no pixel of another unit
        t = self.patch_embed.norm(t.permute(0, 2, 3, 1))  # [B*K, s, s, D]
        for stage in self.layers:
            t = stage.downsample(t)  # [B*K, s, s, D]: 2x2 merging inside each unit (Identity in stage 0)
            s, dim = t.shape[2], t.shape[3]
            coords = unit_token_coords(units, self.grid_size, s)  # [B, K*s*s, 2]
            tokens = t.reshape(b, k * s * s, dim)
            cache: dict[tuple, WindowGroups] = {}  # one packing per (window, shift), shared by the stage's blocks
            for blk in stage.blocks:
                key = (tuple(blk.window_size), tuple(blk.shift_size))
                if key not in cache:
                    cache[key] = window_groups(coords, tuple(blk.input_resolution), *key)
                tokens = visible_block(blk, tokens, cache[key])
            t = tokens.reshape(b * k, s, s, dim)
        return self.norm(t.reshape(b, k, -1))  # s == 1: one token per visible unit, in noise order

    def forward_mask_tokens(self, x: torch.Tensor, mask: Mask) -> torch.Tensor:
        """SimMIM-style reference (benchmarks): timm's dense forward with masked stage-1 tokens set to zero.

        A zero token rather than a learned one keeps the parameters timm's; the cost is the same.
        """
        self.check_input(x)
        t = self.patch_embed(x)  # [B, h, w, D]
        t = t * visible_map(mask, t.shape[1:3]).permute(0, 2, 3, 1)  # masked tokens -> 0: their pixels stop here
        t = self.norm(self.layers(t))  # [B, gh, gw, C]
        return gather_tokens(t.flatten(1, 2), mask.ids_keep)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """timm's dense forward: ``[B, C, H, W]`` -> ``[B, gh, gw, C]`` (NHWC, final norm applied)."""
        self.check_input(x)
        return super().forward_features(x)

    def tokens_of(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, gh, gw, C]`` -> ``[B, gh * gw, C]`` (row-major)."""
        return features.flatten(1, 2)

    # ----------------------------------------------------------------- classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head on average-pooled features (Swin has no class token: ``'token'`` means ``'avg'``)."""
        if global_pool not in (None, "avg", "token"):
            raise ValueError(f"global_pool={global_pool!r}: Swin pools by averaging; use 'avg' (or 'token', "
                             "which means the same for encoders without a class token)")
        super().reset_classifier(num_classes, None if global_pool is None else "avg")
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.fc.weight, std=2e-5)  # MAE fine-tuning's near-zero head
            nn.init.zeros_(self.head.fc.bias)

    # ----------------------------------------------------------------- weights

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """timm / Microsoft Swin weights -> this encoder (timm's ``checkpoint_filter_fn``): relative-position
        tables resized to this model's windows, patch embedding resampled, old names mapped."""
        from timm.models.swin_transformer import checkpoint_filter_fn

        own = self.state_dict()
        # timm's filter looks up the module of every bias table; tables of blocks this model lacks pass through
        # untouched (the loader reports them as unexpected)
        theirs = {k: v for k, v in state_dict.items()
                  if not k.endswith("relative_position_bias_table") or k in own}
        out = checkpoint_filter_fn(theirs, self)
        out.update({k: v for k, v in state_dict.items() if k not in theirs})
        return out

    def timm_spec(self) -> tuple[str, dict] | None:
        """``('swin_<size>_patch4_window7_224', kwargs)``: loads this module's state dict strictly."""
        depths = [len(s.blocks) for s in self.layers]
        heads = [s.blocks[0].attn.num_heads for s in self.layers]
        size = {96: "tiny" if depths == [2, 2, 6, 2] else "small", 128: "base", 192: "large"}.get(self.embed_dim, "tiny")
        window = self._window_arg
        kwargs: dict = dict(img_size=list(self.img_size), patch_size=self.patch_embed.patch_size[0],
                            window_size=list(window) if isinstance(window, (tuple, list)) else window,
                            embed_dim=self.embed_dim, depths=depths, num_heads=heads,
                            num_classes=self.num_classes, global_pool=self.global_pool)
        mlp_ratio = self.layers[0].blocks[0].mlp.fc1.out_features / self.layers[0].blocks[0].mlp.fc1.in_features
        if mlp_ratio != 4.0:
            kwargs["mlp_ratio"] = mlp_ratio
        if self.in_chans != 3:
            kwargs["in_chans"] = self.in_chans
        return f"swin_{size}_patch4_window7_224", kwargs


# --------------------------------------------------------------------------- registrations

SWIN_SIZES: dict[str, dict] = {
    # timm / Microsoft Swin sizes
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}

# smoke size: every stage, a shifted block in stages 1-2, 16 mask units (4 visible at ratio 0.75)
_SMOKE = dict(img_size=128, window_size=4, embed_dim=16, depths=(2, 2, 1, 1), num_heads=(1, 2, 4, 8))

# MAE settings that suit Swin: GreenMIM / UM-MAE keep 0.75 with 32 px units; fine-tuning decays the lr
# over its four stages (not its 12-24 blocks, which would leave the patch embedding a few % of the lr)
_PRETRAIN = dict(mask_ratio=0.75)
_FINETUNE = dict(layer_decay=0.9, layer_decay_by="stage")


def _swin(kwargs: dict, size: str) -> SwinEncoder:
    return build_encoder(SwinEncoder, kwargs, img_size=224, patch_size=4, window_size=7, **SWIN_SIZES[size])


@register_model(decoder=DECODER_SMALL, smoke=_SMOKE, pretrain=_PRETRAIN, finetune=_FINETUNE)
def mae_swin_tiny_patch4_window7_224(**kwargs) -> SwinEncoder:
    """Swin-T (28M), visible-only MAE with group window attention (GreenMIM)."""
    return _swin(kwargs, "tiny")


@register_model(decoder=DECODER_SMALL, smoke=_SMOKE, pretrain=_PRETRAIN, finetune=_FINETUNE)
def mae_swin_small_patch4_window7_224(**kwargs) -> SwinEncoder:
    """Swin-S (50M), visible-only MAE with group window attention."""
    return _swin(kwargs, "small")


@register_model(decoder=DECODER_BASE, smoke=_SMOKE, pretrain=_PRETRAIN, finetune=_FINETUNE)
def mae_swin_base_patch4_window7_224(**kwargs) -> SwinEncoder:
    """Swin-B (88M): GreenMIM reports 83.8% fine-tuned on ImageNet-1K."""
    return _swin(kwargs, "base")
