"""CvT (Wu et al., 2021, arXiv 2103.15808): a three-stage convolutional vision transformer, with
a leak-free MAE path.

timm has no CvT, and Hugging Face's ``CvtModel`` has no masked path (and per-module layout
classes that cannot run on a subset of positions), so the blocks are written here. Parameter
names are the authors' (microsoft/CvT ``cls_cvt.py``, with ``stage{i}`` as ``stages.{i}``);
:meth:`CvtEncoder.checkpoint_filter` maps the authors' and Hugging Face's
``CvtForImageClassification`` names, so published CvT checkpoints load.

Architecture. Each stage is a convolutional token embedding (an overlapping strided convolution:
7x7 stride 4 pad 2, then 3x3 stride 2 pad 1 twice; LayerNorm over channels) followed by
transformer blocks whose queries, keys and values come from a depthwise 3x3 convolution +
BatchNorm over the stage's token map (stride 1 for Q, stride 2 for K and V), then linear
projections; attention logits are scaled by the full width (the authors' and HF's choice). No
position table: the convolutions carry position. The class token joins in the last stage only.

Masked pretraining. The mask unit is the last stage's stride (the product of the embedding
strides: 16 px at the published 4 / 2 / 2), so every stage's map divides into whole units (4x4
positions at stride 4, 2x2 at 8, 1 at 16). Per stage:

=============================  ==============================  ==============================  ==============================
part                           stage 1 (stride 4)              stage 2 (stride 8)              stage 3 (stride 16)
=============================  ==============================  ==============================  ==============================
conv embedding                 dense, masked pixels zeroed     dense, masked positions zero    dense, masked positions zero
depthwise Q / K / V conv       dense over the map, masked positions zero (all stages)
BatchNorm of the projections   statistics over visible positions only (on the gathered tokens; masked BN for stage-3 K/V)
linear Q/K/V, attention, MLP   visible tokens only             visible tokens only             visible tokens only
keys / values (stride 2)       visible units' K/V only         visible units' K/V only         K/V grid (stride 32) is coarser
                               (stride 8 lies in a unit)       (stride 16 = one unit)          than a unit: all K/V computed,
                                                                                               those with no visible input
                                                                                               masked out of the attention
=============================  ==============================  ==============================  ==============================

"Dense" parts run over the stage's whole map, rebuilt from the visible tokens with zeros at
masked positions (a sparse convolution's semantics: masked neighbours read as zeros), since a
window at a unit border needs its neighbours; they are cheap (depthwise, or once per stage: 13-21%
of the masked encoder's FLOPs at 224 px). The token-wise work (linear projections, attention, MLP)
is visible-only; BENCHMARKS.md ("Encoder costs") has the FLOPs and times per stage.
:meth:`CvtEncoder.forward_mask_tokens` is the dense SimMIM-style counterpart (masked units
zeroed, every position encoded), for benchmarks.

As in every convolutional MAE, windows at a unit border see zeros in pretraining and real
neighbours in fine-tuning, and BatchNorm's pretraining statistics are over visible positions.
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, get_act_layer, trunc_normal_
from torch import nn

from maevit.layers import MaskedBatchNorm2d, conv_visible

from .contract import EncoderMixin
from .mae import init_mae_weights
from .masking import Mask, gather_tokens, scatter_tokens, unit_patch_ids, visible_map
from .patch import to_2tuple_size
from .registry import DECODER_SMALL, build_encoder, register_model


# --------------------------------------------------------------------------- blocks


class Sites(NamedTuple):
    """Where a stage's tokens sit. Every field but ``size`` is None for the full image.

    Attributes:
        size: ``(h, w)`` of the stage's map.
        ids: ``[B, K]`` positions (row-major in the map) of the visible tokens, in token order.
        visible: ``[B, 1, h, w]`` 1 = visible.
        kv_ids: ``[B, Kkv]`` key / value positions kept, when the K/V grid divides into units.
        kv_visible: ``[B, 1, hk, wk]`` key / value positions with visible input.
        kv_mask: ``[B, 1, 1, prefix + hk * wk]`` boolean attention mask (True = attended), when the
            K/V grid is coarser than a unit (every K/V position is computed, invisible ones ignored).
    """

    size: tuple[int, int]
    ids: torch.Tensor | None = None
    visible: torch.Tensor | None = None
    kv_ids: torch.Tensor | None = None
    kv_visible: torch.Tensor | None = None
    kv_mask: torch.Tensor | None = None


def tokens_to_map(x: torch.Tensor, ids: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
    """Tokens ``x [B, K, C]`` at positions ``ids`` -> map ``[B, C, h, w]``, zero where no token sits."""
    b, _, c = x.shape
    h, w = size
    if ids is not None:
        x = scatter_tokens(x, ids, h * w)  # [B, h*w, C]
    return x.transpose(1, 2).reshape(b, c, h, w)


def map_to_tokens(x: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """Map ``[B, C, h, w]`` -> tokens ``[B, K, C]`` at positions ``ids`` (None: all, row-major)."""
    x = x.flatten(2).transpose(1, 2)  # [B, h*w, C]
    return x if ids is None else gather_tokens(x, ids)


class ConvEmbed(nn.Module):
    """CvT's convolutional token embedding: an overlapping strided convolution, then LayerNorm over channels.

    Args:
        in_chans, embed_dim: channels in and out.
        kernel_size, stride, padding: the convolution (7/4/2 in stage 1, 3/2/1 after).
    """

    def __init__(self, in_chans: int, embed_dim: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size, stride, padding)
        self.norm = nn.LayerNorm(embed_dim)  # per position: no spatial statistics, nothing to mask

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """``x [B, C, H, W]`` (zero where masked) -> normalised tokens ``[B, K, D]`` at ``ids``."""
        return self.norm(map_to_tokens(self.proj(x), ids))


class ConvProjection(nn.Module):
    """CvT's ``dw_bn`` projection: depthwise convolution + BatchNorm, statistics over visible positions.

    Where the output positions kept are listed (``ids``: the visible ones), the convolution's output
    is gathered there first and BatchNorm runs on those tokens alone: its statistics are then over
    exactly the visible positions, and no full-map elementwise work is spent on masked ones. Where
    the output grid is coarser than a mask unit (no fixed list), :class:`MaskedBatchNorm2d` takes
    its statistics over the positions ``visible`` marks.

    Args:
        dim: channels.
        kernel_size, stride, padding: the depthwise convolution (stride 2 for keys and values).
    """

    def __init__(self, dim: int, kernel_size: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, stride, padding, groups=dim, bias=False)
        self.bn = MaskedBatchNorm2d(dim)

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None, ids: torch.Tensor | None) -> torch.Tensor:
        """Map ``x [B, C, h, w]`` (zero where masked) -> tokens ``[B, K', C]`` at output positions ``ids``."""
        y = self.conv(x)  # [B, C, h', w']
        if ids is None:
            return map_to_tokens(self.bn(y, visible), None)
        t = map_to_tokens(y, ids)  # [B, K', C]
        return self.bn(t.reshape(-1, t.shape[-1], 1, 1)).reshape(t.shape)  # BatchNorm2d over B * K' positions


class ConvAttention(nn.Module):
    """Multi-head attention over Q / K / V from convolutional projections (CvT).

    Args:
        dim: width.
        num_heads: heads.
        qkv_bias: biases in the linear Q / K / V projections.
        attn_drop, proj_drop: dropout on attention weights and on the output.
        kernel_size: depthwise kernel of the Q / K / V projections.
        stride_kv, padding_kv, padding_q: their strides and paddings (queries keep stride 1).
        with_cls_token: the first token is a class token, which skips the convolutions.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, kernel_size: int = 3, stride_kv: int = 2, padding_kv: int = 1,
                 padding_q: int = 1, with_cls_token: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = dim**-0.5  # the full width, not the head width (authors' code and HF)
        self.with_cls_token = with_cls_token
        self.conv_proj_q = ConvProjection(dim, kernel_size, 1, padding_q)
        self.conv_proj_k = ConvProjection(dim, kernel_size, stride_kv, padding_kv)
        self.conv_proj_v = ConvProjection(dim, kernel_size, stride_kv, padding_kv)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` -> ``[B, heads, N, C / heads]``."""
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, sites: Sites) -> torch.Tensor:
        """``x [B, prefix + K, C]`` (tokens at ``sites.ids``) -> ``[B, prefix + K, C]``."""
        b, _, c = x.shape
        n = int(self.with_cls_token)
        prefix, tokens = x[:, :n], x[:, n:]
        grid = tokens_to_map(tokens, sites.ids, sites.size)  # [B, C, h, w], zero where masked
        q = self.conv_proj_q(grid, sites.visible, sites.ids)  # [B, K, C]
        k = self.conv_proj_k(grid, sites.kv_visible, sites.kv_ids)  # [B, Kkv, C]
        v = self.conv_proj_v(grid, sites.kv_visible, sites.kv_ids)
        if n:
            q, k, v = (torch.cat([prefix, t], dim=1) for t in (q, k, v))
        q, k, v = self._heads(self.proj_q(q)), self._heads(self.proj_k(k)), self._heads(self.proj_v(v))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=sites.kv_mask, scale=self.scale,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(b, -1, c)  # [B, prefix + K, C]
        return self.proj_drop(self.proj(x))


class CvtBlock(nn.Module):
    """Pre-norm transformer block with convolutional attention (the authors' ``Block``).

    Args:
        dim, num_heads, mlp_ratio, qkv_bias: sizes.
        drop, attn_drop, drop_path: dropout rates and stochastic depth.
        act_layer: the MLP activation (the authors' code uses QuickGELU, Hugging Face GELU).
        **attn_args: :class:`ConvAttention` geometry and ``with_cls_token``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, act_layer: type[nn.Module] = nn.GELU,
                 **attn_args) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ConvAttention(dim, num_heads, qkv_bias, attn_drop, drop, **attn_args)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor, sites: Sites) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), sites))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CvtStage(nn.Module):
    """A convolutional token embedding, an optional class token, then blocks.

    Args:
        in_chans, dim, depth, num_heads: sizes.
        patch_size, patch_stride, patch_padding: the embedding convolution.
        cls_token: add a class token (the last stage).
        drop_rate: dropout after the embedding and inside the blocks.
        drop_path: per-block stochastic depth rates (``depth`` values).
        **block_args: :class:`CvtBlock` arguments.
    """

    def __init__(self, in_chans: int, dim: int, depth: int, num_heads: int, patch_size: int, patch_stride: int,
                 patch_padding: int, cls_token: bool = False, drop_rate: float = 0.0,
                 drop_path: list[float] | None = None, **block_args) -> None:
        super().__init__()
        self.patch_embed = ConvEmbed(in_chans, dim, patch_size, patch_stride, patch_padding)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.pos_drop = nn.Dropout(drop_rate)
        drop_path = drop_path or [0.0] * depth
        self.blocks = nn.ModuleList([
            CvtBlock(dim, num_heads, drop=drop_rate, drop_path=drop_path[j], with_cls_token=cls_token, **block_args)
            for j in range(depth)
        ])

    def forward(self, x: torch.Tensor, sites: Sites) -> torch.Tensor:
        """Map ``x [B, C, H, W]`` (zero where masked) -> tokens ``[B, prefix + K, D]`` at ``sites.ids``."""
        x = self.pos_drop(self.patch_embed(x, sites.ids))
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x, sites)
        return x


def _conv_out(size: tuple[int, int], kernel: int, stride: int, padding: int) -> tuple[int, int]:
    return tuple((s + 2 * padding - kernel) // stride + 1 for s in size)


# --------------------------------------------------------------------------- encoder


class CvtEncoder(EncoderMixin, nn.Module):
    """CvT encoder: masked convolutions where windows cross units, visible-only token work (module docstring).

    Args:
        img_size: int or ``(H, W)``; multiples of the total stride (16 for the published strides).
        in_chans: input channels.
        embed_dims, depths, num_heads: per stage.
        patch_sizes, patch_strides, patch_paddings: the per-stage embedding convolutions.
        mlp_ratio, qkv_bias: block options (all stages).
        kernel_qkv, stride_kv, padding_kv, padding_q: the depthwise Q / K / V projections (all stages).
        cls_token: a class token in the last stage (CvT's classifier uses it).
        act_layer: MLP activation: ``gelu`` (Hugging Face's port) or ``quick_gelu`` (the authors' code).
        drop_rate, attn_drop_rate, drop_path_rate: regularisation (stochastic depth rises linearly
            over all blocks to ``drop_path_rate``).
        num_classes, global_pool: classification head (0 = none); ``token`` (class token) or ``avg``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        embed_dims: tuple[int, ...] | list[int] = (64, 192, 384),
        depths: tuple[int, ...] | list[int] = (1, 2, 10),
        num_heads: tuple[int, ...] | list[int] = (1, 3, 6),
        patch_sizes: tuple[int, ...] | list[int] = (7, 3, 3),
        patch_strides: tuple[int, ...] | list[int] = (4, 2, 2),
        patch_paddings: tuple[int, ...] | list[int] = (2, 1, 1),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        kernel_qkv: int = 3,
        stride_kv: int = 2,
        padding_kv: int = 1,
        padding_q: int = 1,
        cls_token: bool = True,
        act_layer: str = "gelu",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        num_classes: int = 0,
        global_pool: str = "token",
    ) -> None:
        super().__init__()
        lists = dict(embed_dims=embed_dims, depths=depths, num_heads=num_heads, patch_sizes=patch_sizes,
                     patch_strides=patch_strides, patch_paddings=patch_paddings)
        if len({len(v) for v in lists.values()}) != 1:
            raise ValueError(f"per-stage arguments must have one entry per stage, got {lists}")
        self.img_size = to_2tuple_size(img_size)
        self.in_chans = in_chans
        stride = math.prod(patch_strides)
        self.patch_size = self.mask_unit = stride  # one output token is stride x stride pixels
        h, w = self.img_size
        if h % stride or w % stride:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of CvT's total stride {stride}: use a multiple of {stride} "
                f"(e.g. {h // stride * stride}x{w // stride * stride})"
            )
        # every stage's map must be exactly img / stride so mask units tile it
        self.stage_sizes: list[tuple[int, int]] = []
        self.kv_sizes: list[tuple[int, int]] = []
        size, s = self.img_size, 1
        for k, st, p in zip(patch_sizes, patch_strides, patch_paddings):
            size, s = _conv_out(size, k, st, p), s * st
            if size != (h // s, w // s):
                raise ValueError(
                    f"an embedding convolution (kernel {k}, stride {st}, padding {p}) gives a {size} map, not "
                    f"{(h // s, w // s)} = image / stride: choose padding (kernel - stride + 1) // 2"
                )
            self.stage_sizes.append(size)
            self.kv_sizes.append(_conv_out(size, kernel_qkv, stride_kv, padding_kv))
        self.kv_geometry = (kernel_qkv, stride_kv, padding_kv)
        self.num_prefix_tokens = int(cls_token)
        self.num_features = self.embed_dim = embed_dims[-1]
        act = get_act_layer(act_layer)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # (also under a meta device)
        self.stages = nn.ModuleList()
        chans = in_chans
        for i, dim in enumerate(embed_dims):
            first = sum(depths[:i])
            self.stages.append(CvtStage(
                chans, dim, depths[i], num_heads[i], patch_sizes[i], patch_strides[i], patch_paddings[i],
                cls_token=cls_token and i == len(embed_dims) - 1, drop_rate=drop_rate,
                drop_path=rates[first:first + depths[i]], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                attn_drop=attn_drop_rate, act_layer=act, kernel_size=kernel_qkv, stride_kv=stride_kv,
                padding_kv=padding_kv, padding_q=padding_q,
            ))
            chans = dim
        self.norm = nn.LayerNorm(self.num_features)
        self.global_pool = global_pool
        self.num_classes = 0
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Identity()
        init_mae_weights(self)  # xavier Linear, unit LayerNorm (MAE); BatchNorm starts at identity
        for stage in self.stages:
            if stage.cls_token is not None:
                nn.init.normal_(stage.cls_token, std=0.02)
        self.reset_classifier(num_classes, global_pool)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Tokens along (H, W) at the last stage."""
        return self.stage_sizes[-1]

    # ----------------------------------------------------------------- forward

    def _sites(self, i: int, mask: Mask | None, batch_size: int) -> Sites:
        """Where stage ``i``'s tokens, queries and keys / values sit under ``mask``."""
        size, kv_size = self.stage_sizes[i], self.kv_sizes[i]
        if mask is None:
            return Sites(size)
        (uh, uw), keep = mask.unit_grid, mask.unit_ids_keep
        ids = unit_patch_ids(keep, mask.unit_grid, size[0] // uh)  # unit by unit: stage 3 = mask.ids_keep
        visible = visible_map(mask, size)
        if kv_size[0] % uh == 0 and kv_size[1] % uw == 0:  # each K/V position lies in one unit
            kv_ids = unit_patch_ids(keep, mask.unit_grid, kv_size[0] // uh)
            return Sites(size, ids, visible, kv_ids, visible_map(mask, kv_size))
        kv_visible = conv_visible(visible, *self.kv_geometry)  # [B, 1, hk, wk]: any visible input
        n = self.stages[i].cls_token is not None
        keep_kv = torch.cat([kv_visible.new_ones(batch_size, int(n)), kv_visible.flatten(1)], dim=1)
        return Sites(size, ids, visible, None, kv_visible, (keep_kv > 0)[:, None, None, :])  # bool: any dtype

    def _forward(self, x: torch.Tensor, mask: Mask | None) -> torch.Tensor:
        """All stages; tokens ``[B, prefix + K, D]`` of the last one, normalised."""
        self.check_input(x)
        b = x.shape[0]
        if mask is not None:
            x = x * visible_map(mask, x.shape[-2:])  # masked pixels -> 0 before the first convolution
        sites = None
        for i, stage in enumerate(self.stages):
            if sites is not None:  # the previous stage's tokens -> its map, zero where masked
                n = int(self.stages[i - 1].cls_token is not None)
                x = tokens_to_map(x[:, n:], sites.ids, sites.size)
            sites = self._sites(i, mask, b)
            x = stage(x, sites)
        return self.norm(x)

    def forward_masked(self, x: torch.Tensor, mask: Mask) -> torch.Tensor:
        """Encode the visible units: ``[B, C, H, W]`` -> ``[B, prefix + K, D]`` in ``mask.ids_keep`` order."""
        return self._forward(x, mask)

    def forward_mask_tokens(self, x: torch.Tensor, mask: Mask) -> torch.Tensor:
        """SimMIM-style reference (benchmarks): masked units zeroed, every position encoded densely."""
        out = self._forward(x * visible_map(mask, x.shape[-2:]), None)
        n = self.num_prefix_tokens
        return torch.cat([out[:, :n], gather_tokens(out[:, n:], mask.ids_keep)], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens ``[B, prefix + L, D]`` of the full image, normalised."""
        return self._forward(x, None)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool (class token or the mean of the patch tokens) and classify."""
        n = self.num_prefix_tokens
        x = x[:, 0] if self.global_pool == "token" else x[:, n:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ----------------------------------------------------------------- classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head; ``global_pool='token'`` (CvT's classifier) or ``'avg'``.

        The final ``norm`` is kept under both pools (CvT normalises every token, then pools).
        """
        pool = global_pool or self.global_pool
        if pool not in ("token", "avg"):
            raise ValueError(f"global_pool={pool!r}: use 'token' (class token) or 'avg'")
        if pool == "token" and not self.num_prefix_tokens:
            pool = "avg"  # built without a class token: average is the only pooling
        self.global_pool = pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=2e-5)  # near-zero head, as MAE fine-tuning
            nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        """The class token (besides biases and norms)."""
        return {f"stages.{i}.cls_token" for i, s in enumerate(self.stages) if s.cls_token is not None}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's grouping: stage-1 embedding, then blocks in order (each stage's embedding and class
        token with its first block), then the final norm."""
        return dict(
            stem=r"^stages\.0\.patch_embed",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.(?:patch_embed|cls_token)", (0,)),
                (r"^norm", (99999,)),
            ],
        )

    # ----------------------------------------------------------------- weights

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The authors' (``stage{i}.``) and Hugging Face's (``CvtForImageClassification`` /
        ``CvtModel``) CvT names -> this encoder's; other keys pass through."""
        out = {}
        for k, v in state_dict.items():
            for pattern, repl in _CHECKPOINT_RENAMES:
                k = re.sub(pattern, repl, k)
            out[k] = v
        return out


# Hugging Face -> authors' names (applied in order; the authors' keys only meet the first rule)
_CHECKPOINT_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^stage(\d+)\.", r"stages.\1."),  # the authors' code
    (r"^(?:cvt\.)?(?:encoder\.)?stages\.", "stages."),
    (r"\.embedding\.convolution_embeddings\.projection\.", ".patch_embed.proj."),
    (r"\.embedding\.convolution_embeddings\.normalization\.", ".patch_embed.norm."),
    (r"\.layers\.(\d+)\.", r".blocks.\1."),
    (r"\.attention\.attention\.convolution_projection_(query|key|value)\.convolution_projection\.convolution\.",
     r".attn.conv_proj_\1.conv."),
    (r"\.attention\.attention\.convolution_projection_(query|key|value)\.convolution_projection\.normalization\.",
     r".attn.conv_proj_\1.bn."),
    (r"\.attention\.attention\.projection_(query|key|value)\.", r".attn.proj_\1."),
    (r"(conv_proj|\.attn\.proj)_query\.", r"\1_q."),
    (r"(conv_proj|\.attn\.proj)_key\.", r"\1_k."),
    (r"(conv_proj|\.attn\.proj)_value\.", r"\1_v."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
)


# --------------------------------------------------------------------------- registrations

_SMOKE = dict(img_size=64, depths=[1, 1, 1])

# MAE settings that suit CvT: masked at its coarsest stride like a convolutional pyramid, so the
# ratio of FCMAE / SparK (0.6 at 32 px units) rather than ViT's 0.75; fine-tuning decays the lr over
# its three stages (FCMAE's grouping for hierarchical models; 0.9 as FCMAE's Tiny / Atto)
_PRETRAIN = dict(mask_ratio=0.6)
_FINETUNE = dict(layer_decay=0.9, layer_decay_by="stage")


@register_model(decoder=DECODER_SMALL, smoke=_SMOKE, pretrain=_PRETRAIN, finetune=_FINETUNE)
def mae_cvt_tiny(**kwargs) -> CvtEncoder:
    """CvT-13 at half width (32 / 96 / 192, ViT-Ti's 192 in the last stage; 5M)."""
    return build_encoder(CvtEncoder, kwargs, embed_dims=[32, 96, 192], depths=[1, 2, 10], num_heads=[1, 2, 3])


@register_model(decoder=DECODER_SMALL, smoke=_SMOKE, pretrain=_PRETRAIN, finetune=_FINETUNE)
def mae_cvt_13(**kwargs) -> CvtEncoder:
    """CvT-13 (20M): 81.6% on ImageNet-1K at 224 px (supervised, the paper)."""
    return build_encoder(CvtEncoder, kwargs, embed_dims=[64, 192, 384], depths=[1, 2, 10], num_heads=[1, 3, 6])


@register_model(decoder=DECODER_SMALL, smoke=_SMOKE, pretrain=_PRETRAIN, finetune=_FINETUNE)
def mae_cvt_21(**kwargs) -> CvtEncoder:
    """CvT-21 (32M): 82.5% on ImageNet-1K at 224 px (supervised, the paper)."""
    return build_encoder(CvtEncoder, kwargs, embed_dims=[64, 192, 384], depths=[1, 4, 16], num_heads=[1, 3, 6])
