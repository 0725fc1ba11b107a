"""SReT (Sliced Recursive Transformer; Shen, Liu & Xing, ECCV 2022) with a visible-only MAE path.

No installed library has SReT (timm and transformers do not; the authors
publish one file, github.com/szq0214/SReT ``SReT.py``), so the blocks are
written here from the paper and that file, with timm's ``Attention``, ``Mlp``
and ``DropPath`` inside.

Architecture (the authors'):

- stem: three 3x3 stride-2 convolutions, each with BatchNorm and ReLU
  (``in -> C0/2 -> C0 -> C0``; stride 8); then a learnable absolute position
  table ``[1, C0, H/8, W/8]`` is added; no class token;
- three stages at strides 8 / 16 / 32. A stage of depth ``d`` holds ``r``
  *recursive units*: one transformer block applied ``d / r`` times (two in the
  published sizes), each application followed by its own *non-linear projection
  layer* (NLL: ``a * x + b * Mlp(LN(x))``), so the parameters of ``r`` blocks do
  ``d`` blocks' work;
- every residual sum has two learnable scalars (``a * x + b * branch(x)``, both
  initialised to 1): four per block, two per NLL;
- sliced group self-attention: the tokens (raster order) are cut into ``G``
  contiguous slices and attention runs within each slice. A unit's first
  application uses ``groups[s][0]`` slices of the tokens in order; later
  applications use ``groups[s][1]`` slices of a *permuted* sequence and undo
  the permutation after attention, so tokens of different slices meet
  (``((8, 2), (4, 1), (1, 1))`` in the published sizes);
- between stages a depthwise strided convolution (kernel 3, stride 2, channel
  multiplier ``C_{s+1} / C_s``) halves the grid;
- global average pooling, LayerNorm, linear head.

Masked pretraining (mask unit = the coarsest stride, 32 px). The reconstruction
target is one 32 px patch per unit (``patch_size = 32``): the final-stage tokens
are the only ones every parameter feeds, and the shared decoder takes one token
per patch. A finer target would need tokens the architecture does not have at
stride 32. Hiera's MAE gets 16 px targets by not pooling before its last stage
during pretraining; here that would be the last pooling conv run at stride 1 (4x
the last stage's pretraining cost, and a stride change between pretraining and
fine-tuning): not done. The cost of the simple choice: each decoder token
predicts 32 x 32 x 3 values, so reconstructions are coarse.

- stem: dense-with-masking. The image is multiplied by the visible map before
  conv1; each BatchNorm takes its statistics over visible positions only
  (:class:`~maevit.layers.masked_norm.MaskedBatchNorm2d`) and outputs zeros at
  masked positions, which stay zero through ReLU, so every convolution reads
  masked positions as zeros. A unit is 32 px at the input, 16 / 8 / 4 positions
  after each conv, so whole units are dropped or kept at every step. The stem
  is about a tenth of SReT-T's FLOPs; it runs on the whole image.
- after the stem the position table is added and only the visible tokens are
  gathered (whole units: 16 tokens each at stride 8, 4 at 16, 1 at 32).
  Everything from here on is **visible-only**.
- group attention over visible tokens: every stage keeps its visible tokens in
  raster order of the full-image grid (ascending token index). Slices are
  contiguous runs of that sequence, so they are the authors' horizontal bands
  restricted to what is visible; every sample keeps the same number of units,
  so slices have equal size (``N_vis / G``). The permutation of later loops is
  a permutation of the ``N_vis`` visible positions (one per call, shared over
  the batch, like the authors'); its inverse restores the raster order. With
  nothing masked both are exactly the dense model's.
- pooling between stages: the visible tokens are scattered into a zero grid,
  convolved and the next stage's visible tokens gathered. The kernel-3,
  stride-2 window reaches one row / column into the unit above / to the left,
  so a per-unit convolution (zero padding at every unit border) would differ
  from the dense model even with nothing masked; scattering keeps a visible
  neighbour's content and reads a masked one as zeros, and the depthwise conv
  over the whole grid costs about ``9 C H W / 4`` MACs, nothing beside the
  blocks.
- the final stage has one token per visible unit: these are returned in
  ``mask.ids_keep`` order, after the final LayerNorm.

:meth:`SReTEncoder.forward_mask_tokens` is the SimMIM-style reference: the same
masked stem, then masked positions are zero tokens plus their position and all
stages run densely.

Where this differs from the authors' code, and why:

- the permutation of later loops is a fresh random one in training (as theirs)
  but a fixed one (drawn once from a seeded generator per sequence length) in
  eval mode: theirs draws a new one at inference too, which makes predictions
  random;
- the authors' LayerNorm after pooling is ``fc_norm`` here (the pooled-norm of
  timm / MAE fine-tuning); the encoder itself ends with a per-token ``norm``,
  which MAE's decoder needs. :meth:`SReTEncoder.checkpoint_filter` maps their
  weights onto this layout;
- stochastic depth is a linear ramp over all unique blocks of the network (the
  authors index each stage's ramp by unique-block number, so later blocks of a
  stage never reach that stage's upper rates);
- initialisation: MAE's (xavier-uniform Linear layers) instead of PyTorch's
  defaults; the position table is trunc-normal(0.02) as theirs;
- more than two loops per unit are allowed (every loop after the first is
  permuted); theirs hard-codes two.
"""
from __future__ import annotations

from functools import lru_cache, partial
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.layers.attention import Attention
from torch import nn

from maevit.layers.masked_norm import MaskedBatchNorm2d

from .contract import EncoderMixin
from .mae import init_mae_weights
from .masking import Mask, gather_tokens, scatter_tokens, visible_map
from .patch import to_2tuple_size
from .registry import DECODER_SMALL, build_encoder, register_model

# --------------------------------------------------------------------------- blocks


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``x[:, perm][:, inv] == x``, for a permutation ``perm [N]``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


@lru_cache(maxsize=64)
def _fixed_permutation(n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(n))


def slice_permutation(n: int, training: bool, device: torch.device | None = None) -> torch.Tensor:
    """The token permutation of a recursive loop: random in training, fixed per ``n`` in eval.

    Args:
        n: sequence length.
        training: draw a fresh one (global RNG, like the authors' ``torch.randperm``).
        device: where the permutation lives.
    """
    if training:
        return torch.randperm(n, device=device)
    return _fixed_permutation(n).to(device)


def group_attention(x: torch.Tensor, attn: nn.Module, num_groups: int,
                    perm: torch.Tensor | None = None) -> torch.Tensor:
    """Sliced group self-attention: ``attn`` within ``num_groups`` contiguous slices of ``x``.

    Args:
        x: ``[B, N, C]`` tokens.
        attn: a token-wise attention module (timm's ``Attention``): ``[B', n, C] -> [B', n, C]``.
        num_groups: slices; must divide ``N``. 1 is plain attention.
        perm: optional ``[N]`` permutation applied before slicing and undone after.
    """
    b, n, c = x.shape
    if n % num_groups:
        raise ValueError(
            f"group attention cannot cut {n} tokens into {num_groups} equal slices: pick group counts that divide "
            "the tokens of every stage (and, for masked pretraining, the tokens of one mask unit at that stage), "
            "or an image size that makes them divide"
        )
    if perm is not None:
        x = x[:, perm]
    # qkv and proj are per token, so attention over [B * G, N / G, C] is attention within each slice
    x = attn(x.reshape(b * num_groups, n // num_groups, c)).reshape(b, n, c)
    if perm is not None:
        x = x[:, inverse_permutation(perm)]
    return x


class NonLinearProjection(nn.Module):
    """SReT's non-linear projection layer (NLL) after each recursive loop: ``a * x + b * Mlp(LN(x))``.

    Args:
        dim: token width.
        mlp_ratio: hidden width of the MLP (1 for SReT-T, 2 for SReT-S).
        drop: dropout in the MLP.
        act_layer, norm_layer: activation and norm.
    """

    def __init__(self, dim: int, mlp_ratio: float = 1.0, drop: float = 0.0, act_layer: type = nn.GELU,
                 norm_layer: type = nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.skip_scale = nn.Parameter(torch.ones(1))
        self.branch_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip_scale * x + self.branch_scale * self.mlp(self.norm(x))  # [B, N, C]


class SReTBlock(nn.Module):
    """Pre-norm transformer block with sliced group attention and learnable residual coefficients.

    ``x = a1 * x + b1 * attn(LN(x)); x = a2 * x + b2 * mlp(LN(x))`` (the scalars start at 1).

    Args:
        dim, num_heads, mlp_ratio: block size.
        qkv_bias: bias in the qkv projection (the authors': True).
        drop, attn_drop, drop_path: dropout, attention dropout, stochastic depth.
        act_layer, norm_layer: activation and norm.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, act_layer: type = nn.GELU,
                 norm_layer: type = nn.LayerNorm) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.skip_scale1 = nn.Parameter(torch.ones(1))
        self.branch_scale1 = nn.Parameter(torch.ones(1))
        self.skip_scale2 = nn.Parameter(torch.ones(1))
        self.branch_scale2 = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, num_groups: int = 1, perm: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, N, C]`` -> ``[B, N, C]``; attention within ``num_groups`` slices of ``x[:, perm]``."""
        y = group_attention(self.norm1(x), self.attn, num_groups, perm)
        x = self.skip_scale1 * x + self.branch_scale1 * self.drop_path1(y)
        return self.skip_scale2 * x + self.branch_scale2 * self.drop_path2(self.mlp(self.norm2(x)))


class RecursiveUnit(nn.Module):
    """One block applied ``loops`` times, each application followed by its own NLL.

    The first application slices the tokens in order into ``groups[0]`` groups;
    later ones slice a permuted sequence into ``groups[1]`` groups (no
    permutation when that is 1 group: attention is then global anyway).

    Args:
        dim, num_heads, mlp_ratio: block size.
        loops: applications of the block (2 in the published sizes).
        groups: ``(first loop, later loops)`` slice counts.
        nll_mlp_ratio: hidden width of the NLLs' MLPs.
        drop, attn_drop, drop_path: dropout rates (stochastic depth on the block only, as the authors').
        norm_layer: norm of the block and NLLs.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, loops: int, groups: Sequence[int],
                 nll_mlp_ratio: float = 1.0, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: type = nn.LayerNorm) -> None:
        super().__init__()
        self.groups = (int(groups[0]), int(groups[1]))
        self.block = SReTBlock(dim, num_heads, mlp_ratio, drop=drop, attn_drop=attn_drop, drop_path=drop_path,
                               norm_layer=norm_layer)
        self.nlls = nn.ModuleList(
            [NonLinearProjection(dim, nll_mlp_ratio, drop=drop, norm_layer=norm_layer) for _ in range(loops)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, nll in enumerate(self.nlls):
            groups = self.groups[0] if i == 0 else self.groups[1]
            perm = None
            if i > 0 and groups > 1:
                perm = slice_permutation(x.shape[1], self.training, x.device)
            x = nll(self.block(x, groups, perm))
        return x


class StagePooling(nn.Module):
    """Depthwise strided convolution between stages (kernel ``stride + 1``), on token sequences.

    With ``ids`` the tokens are the visible ones of the input grid: they are
    scattered into a zero grid, convolved, and the tokens at ``ids_out`` of the
    output grid are gathered (module docstring: why not per unit).

    Args:
        in_dim, out_dim: widths (``out_dim`` a multiple of ``in_dim``: depthwise with a channel multiplier).
        stride: grid reduction.
    """

    def __init__(self, in_dim: int, out_dim: int, stride: int = 2) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=stride + 1, stride=stride, padding=stride // 2,
                              groups=in_dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], ids: torch.Tensor | None = None,
                ids_out: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, N, C]`` on ``grid`` (all of it, or at ``ids [B, N]``) -> ``[B, N', C']``."""
        h, w = grid
        b, _, c = x.shape
        if ids is not None:
            x = scatter_tokens(x, ids, h * w)  # [B, h*w, C], zeros where masked
        x = self.conv(x.transpose(1, 2).reshape(b, c, h, w))  # [B, C', h/2, w/2]
        x = x.flatten(2).transpose(1, 2)  # [B, h*w/4, C']
        return x if ids_out is None else gather_tokens(x, ids_out)


class SReTStage(nn.Module):
    """Optional pooling from the previous stage, then ``depth / recursions`` recursive units.

    Args:
        in_dim: width of the previous stage (None: the first stage, no pooling).
        dim, depth, recursions, num_heads, groups, mlp_ratio, nll_mlp_ratio: stage size; ``depth``
            block applications by ``recursions`` unique blocks.
        drop, attn_drop: dropout rates.
        drop_paths: stochastic depth of each unique block.
        norm_layer: norm of the blocks.
    """

    def __init__(self, in_dim: int | None, dim: int, depth: int, recursions: int, num_heads: int,
                 groups: Sequence[int], mlp_ratio: float, nll_mlp_ratio: float, drop: float, attn_drop: float,
                 drop_paths: Sequence[float], norm_layer: type) -> None:
        super().__init__()
        self.downsample = StagePooling(in_dim, dim) if in_dim is not None else None
        loops = depth // recursions
        self.units = nn.ModuleList([
            RecursiveUnit(dim, num_heads, mlp_ratio, loops, groups, nll_mlp_ratio, drop, attn_drop, drop_paths[j],
                          norm_layer) for j in range(recursions)
        ])

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None, ids: torch.Tensor | None = None,
                ids_out: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, N, C_in]`` (on the previous stage's ``grid``, at ``ids`` when masked) -> ``[B, N', C]``
        (at ``ids_out`` of this stage's grid when masked)."""
        if self.downsample is not None:
            x = self.downsample(x, grid, ids, ids_out)
        for unit in self.units:
            x = unit(x)
        return x


class ConvStem(nn.Module):
    """Three 3x3 convolutions with BatchNorm and ReLU (strides 2, 2, 2 as published: stride 8), maskable.

    ``forward(x, mask)`` zeroes masked units before conv1 and takes BatchNorm
    statistics over visible positions only (masked positions come out as 0).

    Args:
        in_chans: input channels.
        dim: output width (the first conv has ``dim // 2``).
        strides: of the three convolutions (1 or 2 each; a stride-1 conv keeps the same weights'
            shapes, so a small-image variant has the published stem's parameters).
    """

    def __init__(self, in_chans: int, dim: int, strides: Sequence[int] = (2, 2, 2)) -> None:
        super().__init__()
        mid = dim // 2
        s1, s2, s3 = strides
        self.conv1 = nn.Conv2d(in_chans, mid, 3, stride=s1, padding=1)
        self.bn1 = MaskedBatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, dim, 3, stride=s2, padding=1)
        self.bn2 = MaskedBatchNorm2d(dim)
        self.conv3 = nn.Conv2d(dim, dim, 3, stride=s3, padding=1)
        self.bn3 = MaskedBatchNorm2d(dim)

    def forward(self, x: torch.Tensor, mask: Mask | None = None) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, dim, H/s, W/s]`` (``s``: the product of the strides)."""
        if mask is not None:
            x = x * visible_map(mask, tuple(x.shape[-2:]))
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = conv(x)
            # masked BN outputs 0 where masked and ReLU keeps 0, so the next conv reads masked units as zeros
            x = F.relu(bn(x, None if mask is None else visible_map(mask, tuple(x.shape[-2:]))))
        return x


# --------------------------------------------------------------------------- encoder


class SReTEncoder(EncoderMixin, nn.Module):
    """Sliced Recursive Transformer encoder with a visible-only MAE path.

    Args:
        img_size: int or ``(H, W)``, multiples of the coarsest stride (32 with three stages and the
            published stem).
        in_chans: input channels.
        embed_dims: width per stage (a multiple of the previous one: depthwise pooling).
        depths: block applications per stage.
        recursions: unique blocks per stage (each applied ``depth / recursions`` times).
        num_heads: attention heads per stage.
        groups: ``(first loop, later loops)`` slice counts per stage.
        mlp_ratio: MLP width of the blocks.
        nll_mlp_ratio: MLP width of the non-linear projection layers.
        drop_rate, attn_drop_rate, drop_path_rate: dropout, attention dropout, stochastic depth.
        num_classes: classes of the head (0: none; the encoder for MAE).
        global_pool: ``'avg'`` (fine-tuning: average, then a fresh ``fc_norm``) or
            ``'token'`` (SReT has no class token: the pretrained per-token ``norm`` is kept and the
            tokens are averaged; the linear-probe setting and the encoder's own layout).
        stem_strides: strides of the stem's three convolutions (published: 2, 2, 2, stride 8;
            small images: e.g. 2, 2, 1 for a stride-4 stem, see :func:`mae_sret_tiny_s4`).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 256),
        depths: Sequence[int] = (4, 10, 6),
        recursions: Sequence[int] = (2, 5, 3),
        num_heads: Sequence[int] = (2, 4, 8),
        groups: Sequence[Sequence[int]] = ((8, 2), (4, 1), (1, 1)),
        mlp_ratio: float = 3.6,
        nll_mlp_ratio: float = 1.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        num_classes: int = 0,
        global_pool: str = "token",
        stem_strides: Sequence[int] = (2, 2, 2),
    ) -> None:
        super().__init__()
        img_size = to_2tuple_size(img_size)
        n = len(embed_dims)
        sizes = dict(depths=depths, recursions=recursions, num_heads=num_heads, groups=groups)
        bad = {k: len(v) for k, v in sizes.items() if len(v) != n}
        if bad:
            raise ValueError(f"SReT: embed_dims has {n} stages but {bad}; give one entry per stage")
        for s in range(n):
            if depths[s] % recursions[s]:
                raise ValueError(f"SReT stage {s}: depth {depths[s]} is not a multiple of recursions {recursions[s]} "
                                 "(each unique block runs depth / recursions times)")
            if len(groups[s]) != 2:
                raise ValueError(f"SReT stage {s}: groups {groups[s]} must be (first loop, later loops)")
            if s and embed_dims[s] % embed_dims[s - 1]:
                raise ValueError(f"SReT: embed_dims {list(embed_dims)}: each width must be a multiple of the "
                                 "previous one (the pooling between stages is depthwise)")
        if len(stem_strides) != 3 or any(s not in (1, 2) for s in stem_strides):
            raise ValueError(f"SReT: stem_strides {list(stem_strides)} must be three strides of 1 or 2")
        stem = stem_strides[0] * stem_strides[1] * stem_strides[2]
        stride = stem * 2 ** (n - 1)
        if img_size[0] % stride or img_size[1] % stride:
            raise ValueError(f"SReT with {n} stages needs image sizes that are multiples of {stride} (its coarsest "
                             f"stride and mask unit), got {img_size[0]}x{img_size[1]}")
        self.in_chans = in_chans
        self.img_size = img_size
        self.patch_size = stride  # one decoder token per mask unit (the final stride)
        self.mask_unit = stride
        self.strides = tuple(stem * 2**s for s in range(n))
        self.embed_dims = tuple(embed_dims)
        self.num_prefix_tokens = 0
        self.num_features = self.embed_dim = embed_dims[-1]
        self.num_classes = num_classes
        self.global_pool = global_pool
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.patch_embed = ConvStem(in_chans, embed_dims[0], tuple(stem_strides))
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dims[0], img_size[0] // stem, img_size[1] // stem))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(recursions), device="cpu").tolist()  # (also under a meta device)
        self.stages = nn.ModuleList()
        for s in range(n):
            first = sum(recursions[:s])
            self.stages.append(SReTStage(
                embed_dims[s - 1] if s else None, embed_dims[s], depths[s], recursions[s], num_heads[s], groups[s],
                mlp_ratio, nll_mlp_ratio, drop_rate, attn_drop_rate, dpr[first:first + recursions[s]], norm_layer,
            ))
        self.norm = norm_layer(self.num_features)  # per token: the MAE decoder's input
        self.fc_norm = nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Identity()
        init_mae_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.reset_classifier(num_classes, global_pool)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches (= mask units) along (H, W)."""
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    def _grid(self, stage: int) -> tuple[int, int]:
        r = self.strides[stage]
        return self.img_size[0] // r, self.img_size[1] // r

    # ----------------------------------------------------------------- forward

    def _visible_ids(self, mask: Mask) -> list[torch.Tensor]:
        """Per stage, the visible tokens' indices ``[B, N_s]`` in the stage grid, ascending (raster order)."""
        ids = []
        for s in range(len(self.stages)):
            h, w = self._grid(s)
            vis = visible_map(mask, (h, w)).flatten(1)  # [B, h*w], 1 = visible
            n_vis = mask.unit_ids_keep.shape[1] * (self.mask_unit // self.strides[s]) ** 2  # same for every sample
            ids.append(torch.argsort(1.0 - vis, dim=1, stable=True)[:, :n_vis])  # visible first, in index order
        return ids

    def _stages(self, x: torch.Tensor, ids: list[torch.Tensor] | None) -> torch.Tensor:
        """Stages over tokens ``x [B, N_0, C_0]`` (all, or the visible ones at ``ids[0]``) -> ``[B, N, D]``."""
        for s, stage in enumerate(self.stages):
            if s == 0:
                x = stage(x)
            else:
                x = stage(x, self._grid(s - 1), None if ids is None else ids[s - 1], None if ids is None else ids[s])
        return self.norm(x)

    def _embed(self, x: torch.Tensor, mask: Mask | None = None) -> torch.Tensor:
        """Stem + position table: ``[B, C, H, W]`` -> tokens ``[B, H/s * W/s, C_0]`` in raster order."""
        x = self.patch_embed(x, mask) + self.pos_embed  # [B, C0, H/s, W/s]
        return self.pos_drop(x.flatten(2).transpose(1, 2))

    def forward_masked(self, x: torch.Tensor, mask: Mask) -> torch.Tensor:
        """Encode only the visible units: ``[B, C, H, W]`` -> ``[B, K, D]`` in ``mask.ids_keep`` order."""
        self.check_input(x)
        ids = self._visible_ids(mask)
        tokens = gather_tokens(self._embed(x, mask), ids[0])  # [B, 16 K, C0]: whole visible units
        out = self._stages(tokens, ids)  # [B, K, D], raster order of the visible units
        # the raster order is the sorted ids_keep; rank of each ids_keep entry = its row in `out`
        rank = torch.argsort(torch.argsort(mask.ids_keep, dim=1), dim=1)
        return gather_tokens(out, rank)

    def forward_mask_tokens(self, x: torch.Tensor, mask: Mask) -> torch.Tensor:
        """SimMIM-style reference (benchmarks): the masked stem, then masked positions as zero tokens
        (+ their position) through dense stages; the visible units' tokens in ``mask.ids_keep`` order."""
        self.check_input(x)
        out = self._stages(self._embed(x, mask), None)  # [B, L, D]
        return gather_tokens(out, mask.ids_keep)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final-stage tokens ``[B, L, D]`` of the full image, raster order, per-token ``norm`` applied."""
        return self._stages(self._embed(x), None)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average the tokens ``[B, L, D]``, ``fc_norm``, head."""
        x = self.head_drop(self.fc_norm(x.mean(dim=1)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ----------------------------------------------------------------- classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head; ``global_pool='avg'`` (fine-tuning) or ``'token'`` (probe; see the class docstring).

        As for maevit's ViT: switching to ``'avg'`` drops the pretrained per-token
        ``norm`` and adds a fresh ``fc_norm`` after pooling (the authors'
        pool -> LayerNorm -> head), switching to ``'token'`` does the reverse.
        """
        if global_pool is not None and global_pool not in ("avg", "token"):
            raise ValueError(f"global_pool={global_pool!r}: use 'avg' (fine-tuning: fresh fc_norm after pooling) or "
                             "'token' (keep the pretrained norm; SReT has no class token, tokens are averaged)")
        pool = global_pool or self.global_pool
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        if pool == "avg" and isinstance(self.fc_norm, nn.Identity):
            self.norm, self.fc_norm = nn.Identity(), norm_layer(self.num_features)
        elif pool == "token" and isinstance(self.norm, nn.Identity):
            self.norm, self.fc_norm = norm_layer(self.num_features), nn.Identity()
        self.global_pool = pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            # MAE fine-tuning: a near-zero head keeps early updates from wrecking the pretrained features
            nn.init.trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)

    def get_classifier(self) -> nn.Module:
        return self.head

    def no_weight_decay(self) -> set[str]:
        """The position table (biases, norms and the residual scalars are 1-D: no decay anyway)."""
        return {"pos_embed"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping: stem, then one layer per recursive unit (its block and NLLs), the
        pooling in front of a stage with that stage's first unit, the final norm last."""
        return dict(
            stem=r"^pos_embed|^patch_embed",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.units\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    # ----------------------------------------------------------------- weights

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The authors' SReT weights -> this layout; the position table resized to this grid.

        Their ``transformers.{s}.blocks.{i}`` interleave block applications and
        NLLs (a shared block appears under each of its applications); their
        post-pooling ``norm`` becomes ``fc_norm`` in an average-pooling
        classifier and the per-token ``norm`` otherwise.
        """
        out = dict(state_dict)
        if any(k.startswith("transformers.") for k in out):
            out = self._from_authors(out)
        pe = out.get("pos_embed")
        if pe is not None and pe.shape != self.pos_embed.shape and pe.ndim == 4:
            # bicubic, as timm resamples position tables
            out["pos_embed"] = F.interpolate(pe.float(), size=self.pos_embed.shape[-2:], mode="bicubic",
                                             align_corners=False).to(pe.dtype)
        return out

    def _from_authors(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        block_names = {f"coefficient{i}.bias": n for i, n in
                       enumerate(("skip_scale1", "branch_scale1", "skip_scale2", "branch_scale2"), 1)}
        nll_names = {"coefficient1.bias": "skip_scale", "coefficient2.bias": "branch_scale"}
        out: dict[str, torch.Tensor] = {}
        for k, v in sd.items():
            parts = k.split(".")
            if parts[0] == "transformers" and parts[2] == "blocks":
                s, i, rest = int(parts[1]), int(parts[3]), ".".join(parts[4:])
                loops = len(self.stages[s].units[0].nlls) if s < len(self.stages) else 2
                step, is_nll = divmod(i, 2)  # step-th application; odd entries are NLLs
                unit, loop = divmod(step, loops)
                if is_nll:
                    rest = nll_names.get(rest, rest.replace("norm1.", "norm.", 1))
                    out[f"stages.{s}.units.{unit}.nlls.{loop}.{rest}"] = v
                elif loop == 0:  # later applications repeat the same tensors
                    out[f"stages.{s}.units.{unit}.block.{block_names.get(rest, rest)}"] = v
            elif parts[0] == "pools":
                out[f"stages.{int(parts[1]) + 1}.downsample.{'.'.join(parts[2:])}"] = v
            elif parts[0] == "norm":
                out[("fc_norm." if isinstance(self.norm, nn.Identity) else "norm.") + parts[1]] = v
            else:  # patch_embed.{conv,bn}{1,2,3}.*, pos_embed, head.*: the same names
                out[k] = v
        return out


# --------------------------------------------------------------------------- registrations

SRET_SIZES: dict[str, dict] = {
    # the authors' SReT_T / SReT_S (head width 32 / 42; 4.8M / 20.9M parameters with a 1000-class head)
    "tiny": dict(embed_dims=(64, 128, 256), num_heads=(2, 4, 8), mlp_ratio=3.6, nll_mlp_ratio=1.0),
    "small": dict(embed_dims=(126, 252, 504), num_heads=(3, 6, 12), mlp_ratio=3.0, nll_mlp_ratio=2.0),
}
_SRET_COMMON = dict(depths=(4, 10, 6), recursions=(2, 5, 3), groups=((8, 2), (4, 1), (1, 1)))

# smoke: every stage, one unique block applied twice (so the permuted loop runs), 2x2 mask units
_SMOKE = dict(img_size=64, embed_dims=[16, 32, 64], num_heads=[1, 2, 4], depths=[2, 2, 2], recursions=[1, 1, 1])

# MAE settings that suit SReT: a convolutional stem and a pyramid masked at the coarsest stride, so
# FCMAE / SparK's 0.6; fine-tuning decays the lr over its stages (stem, stages, head)
_PRETRAIN = dict(mask_ratio=0.6)
_FINETUNE = dict(layer_decay=0.9, layer_decay_by="stage")


def _sret(kwargs: dict, size: str) -> SReTEncoder:
    return build_encoder(SReTEncoder, kwargs, **SRET_SIZES[size], **_SRET_COMMON)


# Small images (32-64 px, e.g. CIFAR upsampled to 64): the published stem (stride 8) and three stages mask at
# 32 px, so a 64 px image has 4 units and keeps 1 or 2: nothing to learn from. A stride-4 stem (the same three
# convolutions, the last at stride 1) and SReT-T's first two stages mask at 8 px: 64 units at 64 px. Ratio
# 0.75 (16 visible units): the sliced attention needs the visible tokens of a stage to split into its slice
# counts (16 units x 4 tokens / 8 slices; 16 / 4), which 0.6 (25 units) does not give.
_SMALL_IMAGE = dict(stem_strides=(2, 2, 1), depths=(4, 10), recursions=(2, 5), groups=((8, 2), (4, 1)))
_SMOKE_SMALL = dict(img_size=32, embed_dims=[16, 32], num_heads=[1, 2], depths=[2, 2], recursions=[1, 1])


@register_model(decoder=DECODER_SMALL, smoke=_SMOKE, pretrain=_PRETRAIN, finetune=_FINETUNE)
def mae_sret_tiny(**kwargs) -> SReTEncoder:
    """SReT-T (4.5M encoder parameters, 4.8M with an ImageNet head as published); masked at 32 px."""
    return _sret(kwargs, "tiny")


@register_model(decoder=DECODER_SMALL, smoke=_SMOKE, pretrain=_PRETRAIN, finetune=_FINETUNE)
def mae_sret_small(**kwargs) -> SReTEncoder:
    """SReT-S (20.4M encoder parameters, 20.9M with an ImageNet head as published); masked at 32 px."""
    return _sret(kwargs, "small")


@register_model(decoder=DECODER_SMALL, smoke=_SMOKE_SMALL, pretrain=dict(mask_ratio=0.75), finetune=_FINETUNE)
def mae_sret_tiny_s4(**kwargs) -> SReTEncoder:
    """SReT-T's first two stages behind a stride-4 stem (1.5M): masked at 8 px, for 32-64 px images."""
    tiny = {k: v[:2] if k in ("embed_dims", "num_heads") else v for k, v in SRET_SIZES["tiny"].items()}
    return build_encoder(SReTEncoder, kwargs, **tiny, **_SMALL_IMAGE)
