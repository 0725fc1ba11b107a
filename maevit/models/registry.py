"""Registered model names: ``create_mae``, ``create_encoder``, ``list_models``."""
from __future__ import annotations

import difflib
import os
from typing import Any, Mapping

import torch

from .mae import MaskedAutoencoder
from .vit import VIT_SIZES, ViTEncoder

# Decoder sizes: MAE's published 512-wide, 8-block decoder for Base and up. For
# Tiny / Small that decoder would cost more than the encoder, so they use a
# 256-wide, 4-block one (a 1-block decoder still works well, per the paper).
_MAE_MODELS: dict[str, dict[str, Any]] = {
    "mae_vit_tiny_patch16": dict(size="tiny", patch_size=16, decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
    "mae_vit_small_patch16": dict(size="small", patch_size=16, decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
    "mae_vit_base_patch16": dict(size="base", patch_size=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "mae_vit_large_patch16": dict(size="large", patch_size=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "mae_vit_huge_patch14": dict(size="huge", patch_size=14, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
}

# Names the published MAE constructor uses, plus mask_ratio. Anything else is an error.
MAE_OVERRIDES = (
    "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
    "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "norm_pix_loss", "mask_ratio",
)
_ENCODER_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def list_models(pattern: str = "") -> list[str]:
    """Registered MAE model names containing ``pattern``."""
    return sorted(n for n in _MAE_MODELS if pattern in n)


def mae_model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The full constructor arguments of a registered model after overrides.

    Raises:
        KeyError: unknown model name or unknown override, with close matches.
    """
    if name not in _MAE_MODELS:
        raise KeyError(f"unknown model {name!r}.{_suggest(name, _MAE_MODELS)} Registered: {', '.join(list_models())}")
    for key in overrides:
        if key not in MAE_OVERRIDES:
            raise KeyError(
                f"unknown argument {key!r} for {name}.{_suggest(key, MAE_OVERRIDES)} "
                f"Valid: {', '.join(MAE_OVERRIDES)}"
            )
    spec = dict(_MAE_MODELS[name])
    cfg: dict[str, Any] = dict(
        img_size=224, in_chans=3, mlp_ratio=4.0, norm_pix_loss=True, mask_ratio=0.75,
        **VIT_SIZES[spec.pop("size")], **spec,
    )
    cfg.update(overrides)
    return cfg


def create_mae(
    name: str,
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
    **overrides: Any,
) -> MaskedAutoencoder:
    """Build a registered MAE model, optionally loading weights.

    Args:
        name: one of :func:`list_models`.
        checkpoint: a path or state dict in any supported layout (maevit, the
            published MAE files, Hugging Face ``ViTMAEForPreTraining``).
        **overrides: published-MAE constructor arguments (see ``MAE_OVERRIDES``).

    Example:
        >>> mae = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=4)
    """
    cfg = mae_model_config(name, **overrides)
    encoder = ViTEncoder(**{k: cfg[k] for k in _ENCODER_KEYS})
    model = MaskedAutoencoder(
        encoder,
        decoder_embed_dim=cfg["decoder_embed_dim"],
        decoder_depth=cfg["decoder_depth"],
        decoder_num_heads=cfg["decoder_num_heads"],
        mlp_ratio=cfg["mlp_ratio"],
        norm_pix_loss=cfg["norm_pix_loss"],
        mask_ratio=cfg["mask_ratio"],
    )
    model.model_name = name
    if checkpoint is not None:
        from maevit.train.checkpoint import load_mae_weights

        load_mae_weights(model, checkpoint)
    return model
