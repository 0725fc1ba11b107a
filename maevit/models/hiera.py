"""Hiera encoders (timm's ``Hiera``): the hierarchical ViT built for MAE, with the shared decoder.

The encoder *is* a timm ``Hiera`` (names, blocks, mask-unit attention, unrolled
token order), so a classifier exports to a file ``timm.create_model('hiera_tiny_224', ...)``
loads strictly (:meth:`HieraEncoder.timm_spec`), and fine-tuning runs timm's
own dense forward. timm has the visible-only encoder path
(``forward_features(x, mask)``) but no decoder; this file adds maevit's mask
convention, the token order of ``mask.ids_keep`` and the MAE read-out.

Masking. Hiera embeds 4 x 4 patches (7 x 7 convolution, stride 4) and pools
queries by 2 x 2 at the start of stages 2, 3 and 4 (``q_pool = 3``): strides
4 / 8 / 16 / 32. Its mask unit is 8 x 8 stage-1 tokens = 32 px, the coarsest
stride, and that is ``mask_unit``. maevit's :class:`~maevit.models.masking.Mask`
(1 = masked, per unit, row-major unit grid) becomes timm's boolean mask
(True = keep) over the same row-major grid.

What runs visible-only, per stage (``forward_masked``):

- patch embedding: masked pixels are set to zero before the overlapping 7 x 7
  convolution (timm's ``PatchEmbed(x, mask)``; Hiera's ``do_masked_conv``), so a
  visible token at a unit border reads zeros, never masked content; tokens of
  masked units are then dropped (after the absolute position table is added);
- stages 1-2: mask-unit attention inside each visible unit; stages 3-4: global
  attention over the visible tokens; the 2 x 2 query pooling stays inside a unit.
  Nothing runs dense: the encoder is ``visible_only``. The SimMIM-style
  reference :meth:`HieraEncoder.forward_mask_tokens` (benchmarks only) encodes
  every unit with masked stage-1 tokens set to zero.

Read-out (Hiera's MAE). Hiera pretrains with one pooling fewer than it
fine-tunes (``mae_q_pool = 2`` against ``q_pool = 3``; pooling has no
parameters, so the same weights serve both): stage 4 then runs at stride 16 and
every visible unit gives 2 x 2 tokens, each the target of one 16 px patch
(``patch_size`` = 16). The tokens are rolled back to row-major order inside
each unit (timm's ``Reroll``) and the units put in ``mask.ids_keep`` order.
timm keeps Hiera's MAE encoder norm as ``head.norm`` (its classifier pools
first, then normalises); ``forward_masked`` applies it per token. Hiera's
multi-scale fusion heads (stage 1-2 features added to the decoder input) are
left out: the decoder is maevit's shared one.

With ``mae_q_pool != q_pool`` the pretraining and fine-tuning architectures
differ by that pooling, so ``forward_masked`` with nothing masked is not
``forward_features`` (``masked_equals_full`` is False); with equal values it is
(tested), and the masked path equals timm's ``forward_features(x, mask)``
(tested).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.hiera import Hiera, Reroll
from torch import nn

from .contract import EncoderMixin
from .masking import Mask, gather_tokens, visible_map
from .patch import grid_shape, to_2tuple_size
from .registry import DECODER_BASE, DECODER_SMALL, build_encoder, register_model

# --------------------------------------------------------------------------- blocks


@contextmanager
def _without_q_pool(blocks: Sequence[nn.Module]) -> Iterator[None]:
    """Run ``blocks`` without their query pooling (parameter-free: only ``attn.q_stride`` changes).

    timm's ``HieraBlock`` reads ``attn.q_stride`` in its forward (max-pooling the
    shortcut and the queries); a stride of 1 is the same block without pooling.
    """
    saved = [blk.attn.q_stride for blk in blocks]
    try:
        for blk in blocks:
            blk.attn.q_stride = 1
        yield
    finally:
        for blk, q in zip(blocks, saved):
            blk.attn.q_stride = q


# --------------------------------------------------------------------------- encoder


class HieraEncoder(EncoderMixin, Hiera):
    """Hiera with maevit's masking convention and an MAE read-out at stride 16.

    Args:
        img_size: int or ``(H, W)``; multiples of the mask unit (32 px by default).
        in_chans: input channels.
        embed_dim, num_heads, stages: timm's Hiera size arguments.
        q_pool: pooling stages of the classifier (timm's; 3 = strides 4 / 8 / 16 / 32).
        mae_q_pool: pooling stages used by :meth:`forward_masked` (Hiera's MAE: 2, so
            targets are 16 px patches); at most ``q_pool``.
        q_stride, mask_unit_size, mask_unit_attn, patch_kernel, patch_stride, patch_padding, mlp_ratio:
            timm's Hiera arguments.
        drop_path_rate: stochastic depth (fine-tuning).
        **kwargs: passed to timm's ``Hiera`` (e.g. ``init_values``).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        embed_dim: int = 96,
        num_heads: int = 1,
        stages: Sequence[int] = (2, 3, 16, 3),
        q_pool: int = 3,
        mae_q_pool: int = 2,
        q_stride: Sequence[int] = (2, 2),
        mask_unit_size: Sequence[int] = (8, 8),
        mask_unit_attn: Sequence[bool] = (True, True, False, False),
        patch_kernel: Sequence[int] = (7, 7),
        patch_stride: Sequence[int] = (4, 4),
        patch_padding: Sequence[int] = (3, 3),
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        **kwargs,
    ) -> None:
        img_size = to_2tuple_size(img_size)
        q_stride, mask_unit_size, patch_stride = tuple(q_stride), tuple(mask_unit_size), tuple(patch_stride)
        unit = patch_stride[0] * mask_unit_size[0]
        if patch_stride[1] * mask_unit_size[1] != unit or q_stride[0] != q_stride[1]:
            raise ValueError(f"mask units of {patch_stride[0] * mask_unit_size[0]}x{patch_stride[1] * mask_unit_size[1]}"
                             f" px (q_stride {q_stride}) are not square: maevit masks square units; use equal sides")
        if img_size[0] % unit or img_size[1] % unit:
            raise ValueError(
                f"img_size {img_size[0]}x{img_size[1]} is not a multiple of the Hiera mask unit {unit} px "
                f"(patch_stride {patch_stride[0]} x mask_unit_size {mask_unit_size[0]}). Use a multiple of {unit}"
            )
        if not 0 <= mae_q_pool <= q_pool:
            raise ValueError(f"mae_q_pool={mae_q_pool} must lie in [0, q_pool={q_pool}]")
        if mask_unit_size[0] % q_stride[0] ** mae_q_pool:
            raise ValueError(f"{mae_q_pool} query poolings by {q_stride[0]} do not fit in a {mask_unit_size[0]}-token "
                             "mask unit: lower mae_q_pool")
        kwargs.setdefault("num_classes", 0)
        super().__init__(
            img_size=img_size, in_chans=in_chans, embed_dim=embed_dim, num_heads=num_heads, stages=tuple(stages),
            q_pool=q_pool, q_stride=q_stride, mask_unit_size=mask_unit_size, mask_unit_attn=tuple(mask_unit_attn),
            patch_kernel=tuple(patch_kernel), patch_stride=patch_stride, patch_padding=tuple(patch_padding),
            mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate, **kwargs,
        )
        self.img_size = img_size
        self.mask_unit = unit
        self.patch_size = patch_stride[0] * q_stride[0] ** mae_q_pool  # one target per output token of the MAE path
        self.num_prefix_tokens = 0
        self.mae_q_pool = mae_q_pool
        self.masked_equals_full = mae_q_pool == q_pool
        # blocks that pool in the classifier but not in pretraining; mask-unit attention from there on would
        # group tokens by the pooled unit size (silently wrong windows), so those blocks must attend globally
        pool_blocks = [end + 1 for end in self.stage_ends[:q_pool]]
        self._mae_unpooled = [self.blocks[i] for i in pool_blocks[mae_q_pool:]]
        if self._mae_unpooled and any(blk.attn.use_mask_unit_attn for blk in self.blocks[pool_blocks[mae_q_pool]:]):
            raise ValueError(
                f"mae_q_pool={mae_q_pool} leaves out the pooling of block {pool_blocks[mae_q_pool]}, but that block "
                f"or a later one uses mask-unit attention (mask_unit_attn={tuple(mask_unit_attn)}; timm's first "
                "block of a stage attends like the stage before it). Raise mae_q_pool, or make mask_unit_attn False "
                f"from stage {mae_q_pool + 1} on (stages counted from 1)"
            )
        # timm's Reroll for the pretraining schedule (parameter-free): tokens back to row-major inside each unit
        self.mae_reroll = Reroll(img_size, patch_stride, [q_stride] * len(self.stage_ends[:-1]), self.stage_ends,
                                 mae_q_pool)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Reconstruction patches (MAE output tokens) along (H, W)."""
        return grid_shape(self.img_size, self.patch_size)

    @property
    def global_pool(self) -> str:
        """Pooling of the classifier head (timm keeps it in ``head.pool_type``)."""
        return self.head.pool_type

    # ----------------------------------------------------------------- forward

    def hiera_mask(self, mask: Mask) -> torch.Tensor:
        """maevit's mask -> timm's ``[B, #units]`` bool, True = keep (same row-major unit grid)."""
        if list(mask.unit_grid) != list(self.mask_spatial_shape):
            raise ValueError(f"the mask is drawn over a {mask.unit_grid} unit grid; this Hiera has "
                             f"{tuple(self.mask_spatial_shape)} mask units of {self.mask_unit} px: draw it with "
                             "MaskedAutoencoder.random_mask")
        return mask.unit_mask == 0

    def forward_masked(self, x: torch.Tensor, mask: Mask) -> torch.Tensor:
        """Encode only the visible units: ``[B, C, H, W]`` -> ``[B, K, D]`` (``mask.ids_keep`` order, normed)."""
        self.check_input(x)
        keep = self.hiera_mask(mask)  # [B, U]
        b = x.shape[0]
        # timm's masked path: zero masked pixels, embed, add positions, unroll, drop the masked units' tokens
        t = self.patch_embed(x, mask=keep.view(b, 1, *self.mask_spatial_shape))  # [B, N, C]
        t = self.unroll(self._pos_embed(t))
        t = t[keep[..., None].tile(1, self.mu_size, t.shape[2])].view(b, -1, t.shape[-1])  # [B, K_u * mu, C]
        with _without_q_pool(self._mae_unpooled):
            for blk in self.blocks:
                t = blk(t)
        t = self.mae_reroll(t, len(self.blocks) - 1, mask=keep)  # [B, K_u, mh, mw, C], units in ascending index
        rank = torch.argsort(torch.argsort(mask.unit_ids_keep, dim=1), dim=1)  # ascending position of each kept unit
        t = torch.gather(t, 1, rank.view(b, -1, 1, 1, 1).expand_as(t))  # units in noise order
        return self.head.norm(t.flatten(1, 3))  # [B, K_u * mh * mw, C]: unit by unit, row-major inside

    def forward_mask_tokens(self, x: torch.Tensor, mask: Mask) -> torch.Tensor:
        """SimMIM-style reference (benchmarks): every unit encoded, masked stage-1 tokens set to zero.

        Masked pixels are zeroed before the overlapping stem as in :meth:`forward_masked`, so
        visible tokens see the same input; the read-out is the same (stride 16, ``head.norm``).
        """
        self.check_input(x)
        keep = self.hiera_mask(mask)
        b = x.shape[0]
        t = self.patch_embed(x, mask=keep.view(b, 1, *self.mask_spatial_shape))  # [B, N, C]
        t = t * visible_map(mask, tuple(self.tokens_spatial_shape)).flatten(2).transpose(1, 2)  # masked -> 0
        t = self.unroll(self._pos_embed(t))
        with _without_q_pool(self._mae_unpooled):
            for blk in self.blocks:
                t = blk(t)
        t = self.mae_reroll(t, len(self.blocks) - 1).flatten(1, 2)  # [B, L, C] row-major at patch_size
        return self.head.norm(gather_tokens(t, mask.ids_keep))

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                         return_intermediates: bool = False) -> torch.Tensor:
        """timm's forward: ``[B, C, H, W]`` -> ``[B, N, C]`` tokens (timm's order and mask; no norm)."""
        self.check_input(x)
        return super().forward_features(x, mask=mask, return_intermediates=return_intermediates)

    def tokens_of(self, features: torch.Tensor) -> torch.Tensor:
        """Row-major tokens with the MAE encoder norm (``head.norm``) applied, as :meth:`forward_masked` gives."""
        return self.head.norm(self.reroll(features, len(self.blocks) - 1).flatten(1, 2))

    def no_weight_decay(self) -> set[str]:
        """Position tables (besides biases and norms)."""
        names = {n for n, _ in self.named_parameters()}
        return {n for n in names if n.startswith("pos_embed")}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's grouping (stem, then one group per block, final norm last); ``coarse``: one group
        per stage (layer decay over stages, as FCMAE fine-tunes hierarchical models)."""
        matcher = super().group_matcher(coarse)
        if coarse:
            starts = [0] + [end + 1 for end in self.stage_ends[:-1]]
            matcher["blocks"] = [
                (r"^blocks\.(?:" + "|".join(str(i) for i in range(a, b + 1)) + r")\.", (s,))
                for s, (a, b) in enumerate(zip(starts, self.stage_ends))
            ] + [(r"^norm", (99999,))]
        return matcher

    # ----------------------------------------------------------------- classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, reset_other: bool = False) -> None:
        """A new head on average-pooled, normalised features (no class token: ``'token'`` means ``'avg'``).

        The head's norm is kept: it is the pretrained MAE encoder norm (Hiera pools, then normalises).
        """
        if global_pool not in (None, "avg", "token"):
            raise ValueError(f"global_pool={global_pool!r}: Hiera pools by averaging; use 'avg' (or 'token', "
                             "which means the same for encoders without a class token)")
        super().reset_classifier(num_classes, None if global_pool is None else "avg", reset_other=reset_other)
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.fc.weight, std=2e-5)  # MAE fine-tuning's near-zero head
            nn.init.zeros_(self.head.fc.bias)

    # ----------------------------------------------------------------- weights

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """timm / original Hiera weights -> this encoder (timm's ``checkpoint_filter_fn``: ``encoder_norm`` and
        ``norm`` -> ``head.norm``, ``head.projection`` -> ``head.fc``), position table resampled to this grid."""
        from timm.models.hiera import checkpoint_filter_fn

        out = checkpoint_filter_fn(dict(state_dict), self)
        pe = out.get("pos_embed")
        if pe is not None and self.pos_embed is not None and pe.ndim == 3 and pe.shape != self.pos_embed.shape:
            side = math.isqrt(pe.shape[1])
            if side * side != pe.shape[1]:
                raise ValueError(f"cannot resize a {pe.shape[1]}-token Hiera position table (not a square grid): "
                                 "build the model at the checkpoint's image size")
            out["pos_embed"] = resample_abs_pos_embed(pe.float(), list(self.tokens_spatial_shape), [side, side],
                                                      num_prefix_tokens=0).to(pe.dtype)
        return out

    def timm_spec(self) -> tuple[str, dict] | None:
        """``('hiera_<size>_224', kwargs)``: loads this module's state dict strictly."""
        args = dict(self.build_args or {})
        stages = [e - s + 1 for s, e in zip([0] + [e + 1 for e in self.stage_ends[:-1]], self.stage_ends)]
        named = {(96, (1, 2, 7, 2)): "tiny", (96, (1, 2, 11, 2)): "small", (96, (2, 3, 16, 3)): "base",
                 (112, (2, 3, 16, 3)): "base_plus", (144, (2, 6, 36, 4)): "large", (256, (2, 6, 36, 4)): "huge"}
        size = named.get((self.blocks[0].dim, tuple(stages)), "tiny")  # any name: the kwargs fix the architecture
        kwargs: dict = dict(img_size=list(self.img_size), embed_dim=self.blocks[0].dim,
                            num_heads=self.blocks[0].attn.heads, stages=stages, q_pool=self.q_pool,
                            num_classes=self.num_classes, global_pool=self.global_pool)
        for key in ("q_stride", "mask_unit_size", "mask_unit_attn", "patch_kernel", "patch_stride", "patch_padding",
                    "mlp_ratio", "in_chans", "init_values", "dim_mul", "head_mul", "use_expand_proj"):
            if key in args:
                kwargs[key] = args[key]
        return f"hiera_{size}_224", kwargs


# --------------------------------------------------------------------------- registrations

HIERA_SIZES: dict[str, dict] = {
    # timm / Meta Hiera sizes
    "tiny": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2)),
    "small": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2)),
    "base": dict(embed_dim=96, num_heads=1, stages=(2, 3, 16, 3)),
}

# smoke size: every stage, one block each, 4 mask units (one visible at ratio 0.75)
_SMOKE = dict(img_size=64, embed_dim=16, stages=(1, 1, 1, 1))

# MAE settings that suit Hiera: its paper's ratio 0.6 (mask units of 32 px at 224: 49 units, 19 kept);
# fine-tuning decays the lr over its four stages
_PRETRAIN = dict(mask_ratio=0.6)
_FINETUNE = dict(layer_decay=0.9, layer_decay_by="stage")


def _hiera(kwargs: dict, size: str) -> HieraEncoder:
    return build_encoder(HieraEncoder, kwargs, img_size=224, **HIERA_SIZES[size])


@register_model(decoder=DECODER_SMALL, smoke=_SMOKE, pretrain=_PRETRAIN, finetune=_FINETUNE)
def mae_hiera_tiny_224(**kwargs) -> HieraEncoder:
    """Hiera-T (28M), MAE read out at stride 16 (Hiera's pretraining)."""
    return _hiera(kwargs, "tiny")


@register_model(decoder=DECODER_SMALL, smoke=_SMOKE, pretrain=_PRETRAIN, finetune=_FINETUNE)
def mae_hiera_small_224(**kwargs) -> HieraEncoder:
    """Hiera-S (35M)."""
    return _hiera(kwargs, "small")


@register_model(decoder=DECODER_BASE, smoke=_SMOKE, pretrain=_PRETRAIN, finetune=_FINETUNE)
def mae_hiera_base_224(**kwargs) -> HieraEncoder:
    """Hiera-B (52M): 84.5% fine-tuned on ImageNet-1K (Hiera)."""
    return _hiera(kwargs, "base")
