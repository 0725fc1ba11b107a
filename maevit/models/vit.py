"""Plain ViT encoders (timm's ``VisionTransformer``) with a visible-only MAE path,
position-encoding choices and talking-heads attention.

The encoder *is* a timm ``VisionTransformer``, so its parameter names are
timm's: with the default options an exported state dict loads into
``timm.create_model('vit_base_patch16_224', ...)`` strictly (:meth:`ViTEncoder.timm_spec`
gives the exact call). What timm does not have, and this file adds:

- ``forward_masked``: patches are embedded and given their absolute position
  *before* the masked ones are dropped, so the blocks see visible tokens only;
- position encodings, all visible-only:
  ``sincos`` (MAE's fixed 2-D table), ``learn`` (learned table),
  ``relpos`` (a relative-position bias per block, timm's ``RelPosBias``, gathered
  at the visible indices of each sample), ``rope`` (2-D rotary embedding, timm's
  ``RotaryEmbeddingCat`` + ``AttentionRope``, gathered at the visible indices as
  timm's EVA does after patch dropout) and ``peg`` (CPVT's convolutional position
  generator after the first block, timm's ``twins.PosConv``: visible tokens are
  scattered into a zero grid, convolved depthwise, and gathered back). PEG's
  zeros are a train / fine-tune difference: in pretraining a visible token's
  masked neighbours read as zeros, at fine-tuning they carry content, so the
  conv sees a different input distribution (the table-free encodings do not
  have this gap);
- ``attention='talking_heads'`` (CaiT's ``TalkingHeadAttn``, mixing heads
  before and after the softmax; a remedy for attention collapse in deep ViTs).
"""
from __future__ import annotations

import re
from functools import partial
from typing import Literal

import torch
from timm.layers import RelPosBias, RotaryEmbeddingCat, resample_abs_pos_embed
from timm.layers.attention import AttentionRope
from timm.models.cait import TalkingHeadAttn
from timm.models.twins import PosConv
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .contract import EXTRA_HEAD_TOKENS, EncoderMixin
from .mae import init_mae_weights
from .masking import Mask, gather_tokens, scatter_tokens
from .patch import grid_shape, to_2tuple_size
from .pos_embed import sincos_2d
from .registry import DECODER_BASE, DECODER_SMALL, build_encoder, register_model

PosEncoding = Literal["sincos", "learn", "relpos", "rope", "peg"]


# --------------------------------------------------------------------------- blocks


class TalkingHeadsAttention(TalkingHeadAttn):
    """timm's CaiT talking-heads attention with the ``(x, attn_mask)`` call of timm's ``Block``.

    timm's ``TalkingHeadAttn.forward`` takes no mask, so a relative-position bias
    could not reach it; this forward is the same computation with the additive
    mask applied to the logits before the pre-softmax head mixing.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, **_: object) -> None:
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]  # [B, H, N, hd]
        attn = q @ k.transpose(-2, -1)  # [B, H, N, N]
        if attn_mask is not None:
            attn = attn + attn_mask
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # mix heads (logits)
        attn = attn.softmax(dim=-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # mix heads (weights)
        x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


def _with_rel_pos(attn_cls: type, grid: tuple[int, int], num_prefix_tokens: int) -> type:
    """``attn_cls`` plus a ``rel_pos`` submodule (timm's ``RelPosBias``) for one block.

    The bias itself is applied by the encoder (gathered per sample at the visible
    indices and passed as the block's additive ``attn_mask``); the table lives in
    the attention module so its name matches timm's ``blocks.N.attn.rel_pos.*``.
    """

    class _Attn(attn_cls):
        def __init__(self, dim: int, num_heads: int = 8, **kwargs) -> None:
            super().__init__(dim, num_heads=num_heads, **kwargs)
            self.rel_pos = RelPosBias(grid, num_heads, prefix_tokens=min(num_prefix_tokens, 1))

    _Attn.__name__ = f"RelPos{attn_cls.__name__}"
    return _Attn


class RopeBlock(Block):
    """timm's ``Block`` whose attention (timm's ``AttentionRope``) receives the rotary embedding."""

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


# --------------------------------------------------------------------------- encoder


class ViTEncoder(EncoderMixin, VisionTransformer):
    """Plain ViT encoder with a visible-patches-only path for MAE.

    Args:
        img_size: int or ``(H, W)``; both must be multiples of ``patch_size``.
        patch_size: patch side in pixels (the reconstruction and mask unit).
        in_chans: input channels (any number).
        embed_dim, depth, num_heads, mlp_ratio: transformer size.
        pos_encoding: ``sincos`` | ``learn`` | ``relpos`` | ``rope`` | ``peg`` (module docstring).
        attention: ``mha`` (timm's fused attention) or ``talking_heads``.
        drop_path_rate: stochastic depth (fine-tuning).
        **kwargs: passed to timm's ``VisionTransformer`` (e.g. ``qk_norm``, ``init_values``).
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
        pos_encoding: PosEncoding = "sincos",
        attention: Literal["mha", "talking_heads"] = "mha",
        drop_path_rate: float = 0.0,
        **kwargs,
    ) -> None:
        img_size = to_2tuple_size(img_size)
        grid = grid_shape(img_size, patch_size)  # clear error for sizes that do not divide
        if pos_encoding not in ("sincos", "learn", "relpos", "rope", "peg"):
            raise ValueError(f"pos_encoding={pos_encoding!r}: use sincos, learn, relpos, rope or peg")
        if attention not in ("mha", "talking_heads"):
            raise ValueError(f"attention={attention!r}: use mha or talking_heads")
        if pos_encoding == "rope" and attention != "mha":
            raise ValueError("pos_encoding='rope' works with attention='mha' only (timm's AttentionRope)")
        attn_layer = TalkingHeadsAttention if attention == "talking_heads" else kwargs.pop("attn_layer", "attn")
        block_fn = kwargs.pop("block_fn", Block)
        if pos_encoding == "rope":
            attn_layer, block_fn = AttentionRope, RopeBlock
        elif pos_encoding == "relpos":
            from timm.layers.attention import Attention

            attn_layer = _with_rel_pos(Attention if attn_layer == "attn" else attn_layer, grid, 1)
        kwargs.setdefault("num_classes", 0)
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, class_token=True,
            pos_embed="learn" if pos_encoding in ("sincos", "learn") else "none",
            attn_layer=attn_layer, block_fn=block_fn, drop_path_rate=drop_path_rate, **kwargs,
        )
        self.in_chans = in_chans
        self.img_size = img_size
        self.patch_size = patch_size
        self.mask_unit = patch_size  # plain ViT is masked per patch
        self.pos_encoding = pos_encoding
        self.rope = None
        self.peg = None
        if pos_encoding == "rope":
            self.rope = RotaryEmbeddingCat(embed_dim // num_heads, in_pixels=False, feat_shape=list(grid),
                                           ref_feat_shape=list(grid))
        if pos_encoding == "peg":
            self.peg = PosConv(embed_dim, embed_dim)  # depthwise 3x3 + residual (CPVT), after block 0
        self._init_mae(pos_encoding == "sincos")

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches along (H, W)."""
        return tuple(self.patch_embed.grid_size)

    def _init_mae(self, sincos: bool) -> None:
        init_mae_weights(self.blocks)
        init_mae_weights(self.norm)
        w = self.patch_embed.proj.weight.data  # initialised like a Linear layer (MAE)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        if self.pos_embed is not None:
            if sincos:
                self.pos_embed.requires_grad_(False)
                self.pos_embed.data.copy_(sincos_2d(self.embed_dim, self.grid_size, self.num_prefix_tokens)[None])
            else:
                nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.pos_encoding == "relpos":
            for blk in self.blocks:
                blk.attn.rel_pos.reset_parameters()

    # ----------------------------------------------------------------- forward

    def _embed(self, x: torch.Tensor, mask: Mask | None = None) -> torch.Tensor:
        """Patch tokens ``[B, L, D]`` with their absolute position (per patch: no mixing, so the
        ``mask`` is not needed here; embeddings that mix neighbours, like the hybrid's CNN, use it)."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed[:, self.num_prefix_tokens:]
        return x

    def _prefix_tokens(self) -> torch.Tensor:
        """The prefix tokens ``[1, num_prefix_tokens, D]`` before their position (the class token;
        DeiT adds its distillation token here)."""
        return self.cls_token

    def _encode(self, x: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """Blocks over prefix + patch tokens ``x [B, K, D]`` that sit at patch indices ``ids [B, K]``
        (None: all patches in order)."""
        b = x.shape[0]
        prefix = self._prefix_tokens()  # [1, n, D]
        if self.pos_embed is not None:
            prefix = prefix + self.pos_embed[:, :self.num_prefix_tokens]
        x = torch.cat([prefix.expand(b, -1, -1), x], dim=1)  # [B, n + K, D]
        x = self.norm_pre(x)
        rope = bias_index = None
        if self.rope is not None:
            rope = self.rope.get_embed()  # [L, 2 * head_dim]
            rope = rope[None] if ids is None else rope[ids]  # [B | 1, K, 2 * head_dim]
            rope = rope.unsqueeze(1)  # broadcast over heads
        if self.pos_encoding == "relpos":
            n = self.num_prefix_tokens
            full = torch.arange(n + self.patch_embed.num_patches, device=x.device)[None]
            bias_index = full if ids is None else torch.cat([full[:, :n].expand(b, -1), ids + n], dim=1)
        for i, blk in enumerate(self.blocks):
            if rope is not None:
                x = blk(x, rope=rope)
            elif bias_index is not None:
                x = blk(x, attn_mask=self._rel_bias(blk, bias_index))
            else:
                x = blk(x)
            if i == 0 and self.peg is not None:
                x = self._apply_peg(x, ids)
        return self.norm(x)

    @staticmethod
    def _rel_bias(blk: nn.Module, index: torch.Tensor) -> torch.Tensor:
        """The block's relative-position bias between the tokens at ``index [B|1, N]`` -> ``[B|1, H, N, N]``."""
        full = blk.attn.rel_pos.get_bias()[0]  # [H, T, T] over all tokens
        rows = full[:, index]  # [H, B, N, T]
        bias = torch.gather(rows, 3, index[None, :, None, :].expand(rows.shape[0], -1, index.shape[1], -1))
        return bias.transpose(0, 1)  # [B, H, N, N]

    def _apply_peg(self, x: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """PEG on the patch tokens: masked positions are zeros (scatter -> depthwise conv -> gather)."""
        n = self.num_prefix_tokens
        prefix, tokens = x[:, :n], x[:, n:]
        if ids is None:
            return torch.cat([prefix, self.peg(tokens, self.grid_size)], dim=1)
        full = scatter_tokens(tokens, ids, self.patch_embed.num_patches)  # [B, L, D], zeros where masked
        out = self.peg(full, self.grid_size)  # residual inside: tokens + conv(zero-filled grid)
        return torch.cat([prefix, gather_tokens(out, ids)], dim=1)

    def forward_masked(self, x: torch.Tensor, mask: Mask) -> torch.Tensor:
        """Encode only the visible patches: ``[B, C, H, W]`` -> ``[B, prefix + K, D]`` (``mask.ids_keep`` order)."""
        self.check_input(x)
        # dropping masked patches after the per-patch embedding means their pixels cannot reach the output
        tokens = gather_tokens(self._embed(x, mask), mask.ids_keep)  # [B, K, D]
        return self._encode(tokens, mask.ids_keep)

    def forward_mask_tokens(self, x: torch.Tensor, mask: Mask) -> torch.Tensor:
        """SimMIM-style reference: all positions encoded, masked ones as zero tokens (benchmarks)."""
        self.check_input(x)
        tokens = self._embed(x, mask) * (1.0 - mask.mask).unsqueeze(-1)  # [B, L, D]; masked -> 0 (+ position)
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed[:, self.num_prefix_tokens:] * mask.mask.unsqueeze(-1)
        out = self._encode(tokens, None)
        n = self.num_prefix_tokens
        return torch.cat([out[:, :n], gather_tokens(out[:, n:], mask.ids_keep)], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens ``[B, prefix + L, D]`` of the full image (timm's meaning)."""
        return self._encode(self._embed(x), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the classifier (or pooled features without a head)."""
        return self.forward_head(self.forward_features(x))

    def no_weight_decay(self) -> set[str]:
        """Class token, position table and relative-position tables (besides biases and norms)."""
        names = {n for n, _ in self.named_parameters()}
        return {n for n in names if n in ("cls_token", "pos_embed") or n.endswith("relative_position_bias_table")}

    # ----------------------------------------------------------------- classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head; ``global_pool='avg'`` (MAE fine-tuning) or ``'token'`` (class token, linear probe).

        timm decides at construction whether a ViT has ``norm`` (token pooling) or
        ``fc_norm`` (average pooling); switching pools here rebuilds that pair the
        same way, so a classifier has exactly the modules (and names) of timm's
        ``create_model(..., global_pool=...)``: the pretrained final ``norm`` is
        dropped under average pooling and a fresh ``fc_norm`` is used, as in the
        published fine-tuning. A classifier's fixed sin-cos table becomes
        trainable, as in MAE fine-tuning.
        """
        if global_pool is not None and global_pool not in ("avg", "token"):
            raise ValueError(f"global_pool={global_pool!r}: use 'avg' (MAE fine-tuning) or 'token' (class token)")
        pool = global_pool or self.global_pool
        if pool != self.global_pool:
            norm_layer = partial(nn.LayerNorm, eps=1e-6)
            use_fc_norm = pool == "avg"
            self.norm = nn.Identity() if use_fc_norm else norm_layer(self.embed_dim)
            self.fc_norm = norm_layer(self.embed_dim) if use_fc_norm else nn.Identity()
        super().reset_classifier(num_classes, pool)
        if num_classes > 0:
            # MAE fine-tuning: head weights trunc-normal(std 2e-5), zero bias (a near-zero head keeps
            # early updates from wrecking the pretrained features)
            nn.init.trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)
            if self.pos_embed is not None:
                self.pos_embed.requires_grad_(True)

    # ----------------------------------------------------------------- weights

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """timm-named ViT weights -> this encoder: resample the position table and the
        relative-position tables to this grid (bicubic, as the published fine-tuning does)."""
        from timm.layers import resize_rel_pos_bias_table

        out = dict(state_dict)
        n = self.num_prefix_tokens
        # prefix tokens in the file: the class token, and the tokens of a family's extra heads when present
        # (a DeiT file's distillation token; maevit.models.contract.ExtraHeads.distill_tokens)
        extra = sorted(k for k in EXTRA_HEAD_TOKENS if k in out)
        n_src = ("cls_token" in out) + len(extra) if "cls_token" in out else n
        if n == 1:
            for k in extra:  # a file with extra heads into a plain ViT: the class token is kept
                out.pop(k)
        pe = out.get("pos_embed")
        if pe is not None and self.pos_embed is not None and pe.shape != self.pos_embed.shape:
            out["pos_embed"] = adapt_pos_embed(pe, n_src, n, self.grid_size)
        if self.pos_encoding == "relpos":
            own = self.state_dict()
            for k, v in state_dict.items():
                if k.endswith("relative_position_bias_table") and k in own and v.shape != own[k].shape:
                    out[k] = resize_rel_pos_bias_table(v, new_window_size=self.grid_size,
                                                       new_bias_shape=own[k].shape)
        return out

    def _timm_archs(self, size: str) -> tuple[str, ...]:
        """timm architectures of this family and size, in order of preference (the sizes are overridden)."""
        return f"vit_{size}_patch{self.patch_size}_224", f"vit_{size}_patch16_224", f"vit_{size}_patch14_224"

    def timm_spec(self) -> tuple[str, dict] | None:
        """The timm architecture and arguments that load this module's state dict strictly.

        None for options timm's ``VisionTransformer`` does not have (relpos / rope / peg /
        talking heads).
        """
        import timm

        args = self.build_args or {}
        if args.get("pos_encoding", "sincos") not in ("sincos", "learn") or args.get("attention", "mha") != "mha":
            return None
        m = re.match(r"mae_[a-z]+_(tiny|small|base|large|huge)_", self.model_name or "")
        size = m.group(1) if m else {v["embed_dim"]: k for k, v in VIT_SIZES.items()}.get(self.embed_dim, "base")
        arch = next((a for a in self._timm_archs(size) if timm.is_model(a)), None)
        if arch is None:
            return None
        kwargs: dict = dict(img_size=list(self.img_size), patch_size=self.patch_size, num_classes=self.num_classes,
                            global_pool=self.global_pool)
        if self.in_chans != 3:
            kwargs["in_chans"] = self.in_chans
        std = VIT_SIZES[size]
        if self.embed_dim != std["embed_dim"]:
            kwargs["embed_dim"] = self.embed_dim
        if len(self.blocks) != std["depth"]:
            kwargs["depth"] = len(self.blocks)
        if self.blocks[0].attn.num_heads != std["num_heads"]:
            kwargs["num_heads"] = self.blocks[0].attn.num_heads
        mlp_ratio = self.blocks[0].mlp.fc1.out_features / self.embed_dim
        if mlp_ratio != 4.0:
            kwargs["mlp_ratio"] = mlp_ratio
        return arch, kwargs


def adapt_pos_embed(pos_embed: torch.Tensor, n_src: int, n_dst: int, grid: tuple[int, int]) -> torch.Tensor:
    """A ``[1, n_src + L, D]`` position table -> ``[1, n_dst + gh * gw, D]``.

    The patch rows are resampled to ``grid`` (bicubic, as the published fine-tuning
    does); the first ``min(n_src, n_dst)`` prefix rows are kept, extra source rows
    (a DeiT distillation slot going into a plain ViT) are dropped and new ones
    (a plain ViT / MAE file going into a DeiT) are zeros: a prefix token's position
    row only adds to the token's own learned vector, so a new token needs no
    position of its own, and zero is what MAE's sin-cos table gives the class token.

    Args:
        pos_embed: ``[1, n_src + L, D]`` with ``L`` a square number of patches.
        n_src: prefix rows in ``pos_embed``.
        n_dst: prefix rows wanted.
        grid: ``(gh, gw)`` patch grid wanted.
    """
    prefix, patches = pos_embed[:, :n_src], pos_embed[:, n_src:]  # [1, n_src, D], [1, L, D]
    old = _square_grid(patches.shape[1])
    if tuple(old) != tuple(grid):
        patches = resample_abs_pos_embed(patches.float(), list(grid), list(old), num_prefix_tokens=0)
        patches = patches.to(pos_embed.dtype)
    if n_dst > n_src:
        prefix = torch.cat([prefix, prefix.new_zeros(1, n_dst - n_src, prefix.shape[-1])], dim=1)
    return torch.cat([prefix[:, :n_dst], patches], dim=1)  # [1, n_dst + gh * gw, D]


def _square_grid(num_patches: int) -> tuple[int, int]:
    side = int(round(num_patches**0.5))
    if side * side != num_patches:
        raise ValueError(
            f"cannot resize a {num_patches}-patch position table (not a square grid): build the model at the "
            f"checkpoint's image size"
        )
    return side, side


# --------------------------------------------------------------------------- registrations

VIT_SIZES: dict[str, dict] = {
    # name: (embed_dim, depth, num_heads) as in timm / DeiT / MAE
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}


def _vit(kwargs: dict, size: str, patch_size: int, **options) -> ViTEncoder:
    return build_encoder(ViTEncoder, kwargs, patch_size=patch_size, **VIT_SIZES[size], **options)


# smoke sizes: same structure, one block, 16 patches; the widest sizes are also narrowed
_SMOKE16 = dict(img_size=64, depth=1)
_NARROW = dict(depth=1, embed_dim=128, num_heads=4)

# MAE settings: the published ones (the registry's defaults: ratio 0.75, norm-pix targets, layer decay
# 0.65 per block for Base). Tiny and Small fine-tune with 0.75 (MAE's value for L / H and the CIFAR-10
# reproduction's): at 0.65 the patch embedding of a 12-block model keeps 0.65^13 = 0.4% of the lr.
_FT_SMALL = dict(layer_decay=0.75)


@register_model(decoder=DECODER_SMALL, smoke=_SMOKE16, finetune=_FT_SMALL)
def mae_vit_tiny_patch16(**kwargs) -> ViTEncoder:
    """ViT-Tiny/16 (5.7M parameters; DeiT-Ti width)."""
    return _vit(kwargs, "tiny", 16)


@register_model(decoder=DECODER_SMALL, smoke=_SMOKE16, finetune=_FT_SMALL)
def mae_vit_small_patch16(**kwargs) -> ViTEncoder:
    """ViT-Small/16 (22M)."""
    return _vit(kwargs, "small", 16)


@register_model(decoder=DECODER_SMALL, smoke=dict(img_size=128, depth=1))
def mae_vit_small_patch32(**kwargs) -> ViTEncoder:
    """ViT-Small/32 (23M; 49 patches at 224 px)."""
    return _vit(kwargs, "small", 32)


@register_model(decoder=DECODER_BASE, smoke=_SMOKE16)
def mae_vit_base_patch16(**kwargs) -> ViTEncoder:
    """ViT-Base/16 (86M): MAE's main model, 83.6% fine-tuned on ImageNet-1K."""
    return _vit(kwargs, "base", 16)


@register_model(decoder=DECODER_BASE, smoke=dict(img_size=128, **_NARROW))
def mae_vit_base_patch32(**kwargs) -> ViTEncoder:
    """ViT-Base/32 (88M; 4x fewer tokens than /16)."""
    return _vit(kwargs, "base", 32)


@register_model(decoder=DECODER_BASE, smoke=dict(img_size=64, **_NARROW))
def mae_vit_large_patch16(**kwargs) -> ViTEncoder:
    """ViT-Large/16 (304M): 85.9% fine-tuned (MAE)."""
    return _vit(kwargs, "large", 16)


@register_model(decoder=DECODER_BASE, smoke=dict(img_size=56, **_NARROW))
def mae_vit_large_patch14(**kwargs) -> ViTEncoder:
    """ViT-Large/14 (304M; 256 patches at 224 px)."""
    return _vit(kwargs, "large", 14)


@register_model(decoder=DECODER_BASE, smoke=dict(img_size=56, **_NARROW))
def mae_vit_huge_patch14(**kwargs) -> ViTEncoder:
    """ViT-Huge/14 (632M): 86.9% fine-tuned (MAE)."""
    return _vit(kwargs, "huge", 14)


_SMOKE_OPT = dict(img_size=64, depth=2)  # two blocks: PEG sits between them


@register_model(decoder=DECODER_SMALL, smoke=_SMOKE_OPT)
def mae_vit_small_patch16_learnpos(**kwargs) -> ViTEncoder:
    """ViT-Small/16 with a learned absolute position table."""
    return _vit(kwargs, "small", 16, pos_encoding="learn")


@register_model(decoder=DECODER_SMALL, smoke=_SMOKE_OPT)
def mae_vit_small_patch16_relpos(**kwargs) -> ViTEncoder:
    """ViT-Small/16 with a relative-position bias per block, no absolute table."""
    return _vit(kwargs, "small", 16, pos_encoding="relpos")


@register_model(decoder=DECODER_SMALL, smoke=_SMOKE_OPT)
def mae_vit_small_patch16_rope(**kwargs) -> ViTEncoder:
    """ViT-Small/16 with 2-D rotary position embeddings (RoPE), no absolute table."""
    return _vit(kwargs, "small", 16, pos_encoding="rope")


@register_model(decoder=DECODER_SMALL, smoke=_SMOKE_OPT)
def mae_vit_small_patch16_peg(**kwargs) -> ViTEncoder:
    """ViT-Small/16 with a convolutional position generator (CPVT's PEG) after block 0."""
    return _vit(kwargs, "small", 16, pos_encoding="peg")


@register_model(decoder=DECODER_SMALL, smoke=_SMOKE_OPT)
def mae_vit_small_patch16_talkinghead(**kwargs) -> ViTEncoder:
    """ViT-Small/16 with talking-heads attention (CaiT) and the sin-cos table."""
    return _vit(kwargs, "small", 16, attention="talking_heads")
