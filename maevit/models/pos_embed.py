"""Position tables: fixed 2-D sin-cos tables and resizing of learned tables."""
from __future__ import annotations

import torch


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos embedding ``[N, embed_dim]`` of float positions ``[N]``."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # [D/2]
    out = positions.double().reshape(-1)[:, None] * omega[None, :]  # [N, D/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(
    embed_dim: int, grid: tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Fixed 2-D sin-cos table ``[num_prefix_tokens + gh * gw, embed_dim]`` (float32).

    Matches the published MAE table (and so Hugging Face's ViTMAE) exactly on
    square grids: the first half of the channels encodes the column, the second
    half the row; prefix tokens (class token) get zeros.

    Args:
        embed_dim: channels, divisible by 4.
        grid: ``(gh, gw)`` patches along H and W; need not be square.
        num_prefix_tokens: zero rows prepended for class / register tokens.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    gh, gw = grid
    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )
    emb = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)
    if num_prefix_tokens:
        emb = torch.cat([torch.zeros(num_prefix_tokens, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
