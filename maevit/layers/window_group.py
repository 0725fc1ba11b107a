"""Group window attention: windowed self-attention over the *visible* tokens only.

Under MAE masking a windowed encoder (Swin) keeps a different, ragged set of
tokens in every window of every sample. GreenMIM's answer (Huang et al., 2022)
is to pack the visible tokens of several windows into *groups of equal size*
and let an attention mask keep every token inside its own window; the groups
are then one dense batch of small attentions. This file does the packing and
builds the per-group mask and relative-position index; the attention itself
stays in the family file (it uses the family's own qkv / proj / bias table).

Conventions (those of timm's Swin, so a grouped block equals timm's dense one
when every token is visible):

- tokens carry absolute coordinates ``coords [B, N, 2]`` (row, column) on a
  ``grid (H, W)`` of the current stage; the window partition is the cyclically
  shifted one of timm's ``SwinTransformerBlock``: a token at ``y`` sits at
  ``(y - shift) mod H`` of the rolled map, in window ``((y - shift) mod H) // wh``;
- with a shift, tokens of one window that came from different image regions
  (the wrap-around) get timm's ``-100`` logit offset, exactly as its dense
  ``attn_mask``; tokens of different windows get ``-inf`` (they never attend);
- relative positions index timm's table of ``(2*wh-1) * (2*ww-1)`` entries in
  timm's order (``get_relative_position_index``).

Packing is next-fit over the windows in raster order (a window is never split):
the group size is the largest visible count of any window (at most the window
area), so with nothing masked every group is exactly one window, in timm's
window order. timm has no grouped path (its windows are always full), hence
this file; GreenMIM's own code packs by a knapsack in Python over a mask shared
by the whole batch, which this does not assume (every sample has its own mask).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

NEG_REGION = -100.0  # timm's logit offset between shifted-window regions (not -inf: timm's exact value)


class WindowGroups(NamedTuple):
    """Visible tokens packed into equal-size groups of whole windows.

    Attributes:
        index: ``[B, nG * G]`` token index of each slot; padding slots hold ``N``
            (a zero row appended by :func:`group_tokens`).
        slot: ``[B, N]`` slot of each token: the inverse of ``index``.
        attn_mask: ``[B * nG, 1, G, G]`` additive logits: 0 within a window (and a
            shift region), ``-100`` across shift regions of one window, ``-inf``
            across windows; a padding slot attends to itself only.
        rel_index: ``[B * nG, G, G]`` index into the relative-position bias table
            (0 where the pair never attends).
        num_groups: ``nG`` groups per sample.
        group_size: ``G`` slots per group.
    """

    index: torch.Tensor
    slot: torch.Tensor
    attn_mask: torch.Tensor
    rel_index: torch.Tensor
    num_groups: int
    group_size: int


def relative_position_index(dy: torch.Tensor, dx: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Index of offsets ``(dy, dx)`` in timm's Swin table (``get_relative_position_index``'s formula)."""
    wh, ww = window
    return (dy + wh - 1) * (2 * ww - 1) + (dx + ww - 1)


def shifted_windows(
    coords: torch.Tensor, grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window, position inside the window and shift region of tokens, as timm's Swin partitions them.

    Args:
        coords: ``[B, N, 2]`` long, (row, column) on the stage's grid.
        grid: ``(H, W)``, multiples of ``window``.
        window: ``(wh, ww)``.
        shift: ``(sh, sw)``; ``(0, 0)`` for regular windows.

    Returns:
        ``window_id [B, N]`` (raster order over ``H/wh x W/ww`` windows),
        ``inner [B, N, 2]`` (row, column inside the window) and
        ``region [B, N]`` (timm's 3 x 3 regions of the rolled map; 0 without a shift).
    """
    size = torch.tensor(grid, device=coords.device)
    win = torch.tensor(window, device=coords.device)
    rolled = (coords - torch.tensor(shift, device=coords.device)) % size  # [B, N, 2] on the rolled map
    wid = rolled // win  # [B, N, 2]
    window_id = wid[..., 0] * (grid[1] // window[1]) + wid[..., 1]
    inner = rolled % win
    # timm's regions: [0, H - wh) | [H - wh, H - sh) | [H - sh, H) along each axis (one region if no shift)
    region = torch.zeros_like(window_id)
    for axis in range(2):
        if shift[axis]:
            r = (rolled[..., axis] >= grid[axis] - window[axis]).long() + (rolled[..., axis] >= grid[axis] - shift[axis]).long()
            region = region * 3 + r
    return window_id, inner, region


def pack_windows(counts: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Next-fit packing of windows (in raster order) into groups of ``group_size`` slots.

    Args:
        counts: ``[B, W]`` visible tokens per window (each at most ``group_size``).
        group_size: slots per group.

    Returns:
        ``group [B, W]`` (group of each window), ``offset [B, W]`` (first slot of
        the window inside its group) and the number of groups per sample (the
        largest over the batch; samples with fewer get empty groups).
    """
    b, num_windows = counts.shape
    group = np.zeros((b, num_windows), dtype=np.int64)
    offset = np.zeros((b, num_windows), dtype=np.int64)
    fill = np.zeros(b, dtype=np.int64)
    g = np.zeros(b, dtype=np.int64)
    for w in range(num_windows):  # sequential by nature (a window never splits), vectorised over the batch
        c = counts[:, w]
        spill = (fill + c > group_size) & (fill > 0)
        g += spill
        fill[spill] = 0
        group[:, w], offset[:, w] = g, fill
        fill += c
    return group, offset, int(g.max()) + 1


def window_groups(
    coords: torch.Tensor,
    grid: tuple[int, int],
    window: tuple[int, int],
    shift: tuple[int, int] = (0, 0),
    group_size: int | None = None,
) -> WindowGroups:
    """Pack the tokens at ``coords`` into equal-size groups of whole (shifted) windows.

    Args:
        coords: ``[B, N, 2]`` long, (row, column) of each visible token on the stage grid.
        grid: ``(H, W)`` of the stage; multiples of ``window``.
        window: ``(wh, ww)`` window size.
        shift: cyclic shift of the windows (timm's ``shift_size``).
        group_size: slots per group; default the largest visible count of a window.

    Returns:
        :class:`WindowGroups`, shared by every block with this window and shift.
    """
    b, n, _ = coords.shape
    if grid[0] % window[0] or grid[1] % window[1]:
        raise ValueError(f"a {grid[0]}x{grid[1]} grid does not divide into {window[0]}x{window[1]} windows")
    device = coords.device
    num_windows = (grid[0] // window[0]) * (grid[1] // window[1])
    area = window[0] * window[1]
    window_id, inner, region = shifted_windows(coords, grid, window, shift)

    counts_t = torch.zeros(b, num_windows, dtype=torch.long, device=device)
    counts_t.scatter_add_(1, window_id, torch.ones_like(window_id))
    counts = counts_t.cpu().numpy()  # packing is sequential: one small host copy per (stage, shift)
    g_size = int(group_size or counts.max())
    if g_size < counts.max():
        raise ValueError(f"group_size {g_size} is smaller than the {counts.max()} visible tokens of one window")
    group, offset, num_groups = pack_windows(counts, g_size)
    group_t = torch.from_numpy(group).to(device)
    offset_t = torch.from_numpy(offset).to(device)

    # order tokens by (window, position inside the window): timm's order inside a window
    key = window_id * area + inner[..., 0] * window[1] + inner[..., 1]  # [B, N], unique per sample
    order = torch.argsort(key, dim=1)  # [B, N]
    win_sorted = torch.gather(window_id, 1, order)
    start = torch.cumsum(counts_t, 1) - counts_t  # [B, W] first sorted position of each window
    rank = torch.arange(n, device=device) - torch.gather(start, 1, win_sorted)  # rank inside the window
    slot_sorted = torch.gather(group_t, 1, win_sorted) * g_size + torch.gather(offset_t, 1, win_sorted) + rank
    slot = torch.empty_like(slot_sorted).scatter_(1, order, slot_sorted)  # [B, N]

    total = num_groups * g_size
    index = torch.full((b, total), n, dtype=torch.long, device=device)
    index.scatter_(1, slot, torch.arange(n, device=device).expand(b, n))

    def per_slot(values: torch.Tensor, pad: int) -> torch.Tensor:  # [B, N, ...] -> [B * nG, G, ...]
        out = values.new_full((b, total) + values.shape[2:], pad)
        idx = slot.view(b, n, *([1] * (values.dim() - 2))).expand_as(values)
        return out.scatter(1, idx, values).reshape(b * num_groups, g_size, *values.shape[2:])

    win_s = per_slot(window_id, -1)  # [BG, G], -1 = padding
    reg_s = per_slot(region, 0)
    inner_s = per_slot(inner, 0)  # [BG, G, 2]
    same = (win_s[:, :, None] == win_s[:, None, :]) & (win_s[:, :, None] >= 0)  # [BG, G, G]
    mask = torch.zeros(same.shape, device=device)
    mask.masked_fill_(reg_s[:, :, None] != reg_s[:, None, :], NEG_REGION)
    mask.masked_fill_(~same, float("-inf"))
    pad_diag = torch.diag_embed(win_s < 0)  # a padding slot attends to itself: no empty softmax row
    mask.masked_fill_(pad_diag, 0.0)
    d = inner_s[:, :, None, :] - inner_s[:, None, :, :]  # [BG, G, G, 2]
    rel = relative_position_index(d[..., 0], d[..., 1], window).masked_fill_(~same, 0)
    return WindowGroups(index, slot, mask.unsqueeze(1), rel, num_groups, g_size)


def group_tokens(x: torch.Tensor, groups: WindowGroups) -> torch.Tensor:
    """``x [B, N, C]`` -> ``[B * nG, G, C]`` (padding slots are zeros)."""
    b, n, c = x.shape
    padded = torch.cat([x, x.new_zeros(b, 1, c)], dim=1)  # row N: the padding token
    out = torch.gather(padded, 1, groups.index.unsqueeze(-1).expand(-1, -1, c))  # [B, nG*G, C]
    return out.reshape(b * groups.num_groups, groups.group_size, c)


def ungroup_tokens(x: torch.Tensor, groups: WindowGroups) -> torch.Tensor:
    """``[B * nG, G, C]`` -> ``[B, N, C]`` in the original token order (padding dropped)."""
    b = groups.slot.shape[0]
    c = x.shape[-1]
    flat = x.reshape(b, groups.num_groups * groups.group_size, c)
    return torch.gather(flat, 1, groups.slot.unsqueeze(-1).expand(-1, -1, c))
