"""DeiT encoders: a ViT with a distillation token and a second head (timm's
``VisionTransformerDistilled``), with the visible-only MAE path of :mod:`maevit.models.vit`.

The encoder is :class:`~maevit.models.vit.ViTEncoder` (the masked path, position
encodings, MAE initialisation, checkpoint filter and timm spec live there, once)
built on timm's ``VisionTransformerDistilled`` (``dist_token``, ``head_dist``,
``num_prefix_tokens = 2``, ``set_distilled_training``, ``forward_head``), so a
classifier's state dict loads into ``timm.create_model('deit_tiny_distilled_patch16_224', ...)``
strictly (:meth:`~maevit.models.vit.ViTEncoder.timm_spec` gives the exact call).

Masked pretraining, stage by stage (all visible-only, nothing dense):

- patch embedding: one linear map per patch (a stride = kernel convolution),
  then the patch's absolute position; masked patches are dropped right after,
  so their pixels cannot reach anything;
- prefix: the class and distillation tokens (each plus its own position row)
  go in front of the visible patch tokens, so MAE trains the distillation token
  exactly like the class token; the decoder carries both and predicts no pixels
  for them;
- blocks and final norm: over ``2 + K`` tokens.

Position table and prefix tokens (:func:`~maevit.models.vit.adapt_pos_embed`):
the table has a row per prefix token, as in timm (``[1, 2 + L, D]``). A file
with one prefix token (an MAE run of a plain ViT, a published MAE or timm ViT /
DeiT file) loads with the distillation token *fresh* (normal, std 0.02, reported
as missing from the file) and its position row *zero*: a prefix token's
position row only adds to its own learned vector, so a new token needs no
position of its own (zero is also what MAE's sin-cos table gives the class
token); the row is trainable at fine-tuning. Published two-prefix DeiT weights
load as they are (the patch rows resampled to the model's grid). Loaded into a
plain ViT, a DeiT file loses its distillation token and row.

Heads (timm's): the class token feeds ``head``, the distillation token
``head_dist``. In eval mode, and in training unless distilled training is on,
``forward_head`` returns their average; with ``set_distilled_training(True)``
it returns ``(cls_logits, dist_logits)`` in training mode (DeiT's distillation).
:meth:`DeiTEncoder.forward_heads` gives both in any mode (evaluation reports
each head's own accuracy). ``forward_head(..., pre_logits=True)`` (the feature
that probes, kNN and ``maevit embed`` read) follows ``global_pool``: ``'token'``
the mean of the two tokens, ``'avg'`` the mean of the patch tokens; the heads
read their tokens either way.
"""
from __future__ import annotations

import torch
from timm.models.deit import VisionTransformerDistilled
from torch import nn

from .contract import ExtraHeads
from .registry import DECODER_BASE, DECODER_SMALL, build_encoder, register_model
from .vit import VIT_SIZES, ViTEncoder

# --------------------------------------------------------------------------- encoder


class DeiTEncoder(ViTEncoder, VisionTransformerDistilled):
    """DeiT encoder: class + distillation tokens, visible-only MAE path, two heads.

    Args:
        pos_encoding: ``sincos`` (MAE's fixed table; trainable once a classifier)
            or ``learn``; the relative / rotary / convolutional options of a plain
            ViT have no table, and timm's DeiT always has one.
        **kwargs: as :class:`~maevit.models.vit.ViTEncoder` (``img_size``,
            ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``attention``, ...).

    Pooling: both heads read their own token, so a DeiT classifier always pools
    by token (timm's ``global_pool`` stays ``'token'`` and the pretrained final
    norm is kept). ``global_pool='avg'`` (the plain-ViT default) sets only the
    *feature* (``forward_head(..., pre_logits=True)``, :attr:`feature_pool`) to
    the mean of the patch tokens: what MAE's loss trains directly, and what a
    linear probe reads best after a short MAE (BENCHMARKS.md, "Five times the
    budget": the plain ViT's class token -1.3 points against random init, its
    patch mean +6.6).
    """

    # the contract's optional extra heads (maevit.models.contract.ExtraHeads): what the rest of the
    # toolkit knows of the distillation head, without naming it
    extra_heads = ExtraHeads(names=("cls", "dist"), fresh=("head_dist.", "dist_token"), distill_tokens=("dist_token",))

    def __init__(self, pos_encoding: str = "sincos", **kwargs) -> None:
        if pos_encoding not in ("sincos", "learn"):
            raise ValueError(
                f"pos_encoding={pos_encoding!r} is not available for DeiT: its class and distillation tokens take "
                "their positions from an absolute table (timm's layout); use pos_encoding='sincos' or 'learn'"
            )
        self.feature_pool = _feature_pool(kwargs.get("global_pool", "token"))
        kwargs["global_pool"] = "token"  # see the class docstring: DeiT's heads read tokens
        super().__init__(pos_encoding=pos_encoding, **kwargs)

    def _init_mae(self, sincos: bool) -> None:
        super()._init_mae(sincos)
        nn.init.normal_(self.dist_token, std=0.02)  # as MAE initialises the class token

    def _prefix_tokens(self) -> torch.Tensor:
        return torch.cat([self.cls_token, self.dist_token], dim=1)  # [1, 2, D]

    def no_weight_decay(self) -> set[str]:
        """Class and distillation tokens and the position table (besides biases and norms)."""
        return super().no_weight_decay() | {"dist_token"}

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New ``head`` and ``head_dist`` (MAE's near-zero init for both); pooling is always by token."""
        if global_pool:
            self.feature_pool = _feature_pool(global_pool)
        super().reset_classifier(num_classes, "token")
        if num_classes > 0:
            nn.init.trunc_normal_(self.head_dist.weight, std=2e-5)
            nn.init.zeros_(self.head_dist.bias)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """timm's heads; the pre-logit feature is the mean of the two tokens, or of the patch tokens
        under ``feature_pool='avg'``."""
        if pre_logits and self.feature_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)  # [B, D], after the final norm
        return super().forward_head(x, pre_logits=pre_logits)

    def forward_heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward_features`` output ``[B, 2 + L, D]`` -> ``(cls_logits, dist_logits)``, in any mode."""
        return self.head(self.head_drop(features[:, 0])), self.head_dist(self.head_drop(features[:, 1]))

    def _timm_archs(self, size: str) -> tuple[str, ...]:
        return (f"deit_{size}_distilled_patch16_224",)


def _feature_pool(global_pool: str | None) -> str:
    if global_pool not in (None, "", "token", "avg"):
        raise ValueError(f"global_pool={global_pool!r}: use 'token' (DeiT's two tokens) or 'avg' (the patch tokens' "
                         "mean, as the feature probes and kNN read; the heads read their tokens either way)")
    return global_pool or "token"


# --------------------------------------------------------------------------- registrations


def _deit(kwargs: dict, size: str) -> DeiTEncoder:
    return build_encoder(DeiTEncoder, kwargs, patch_size=16, **VIT_SIZES[size])


_SMOKE = dict(img_size=64, depth=1)
# MAE settings: the plain ViT's (the registry's defaults; Tiny / Small fine-tune at layer decay 0.75)
_FT_SMALL = dict(layer_decay=0.75)


@register_model(decoder=DECODER_SMALL, smoke=_SMOKE, finetune=_FT_SMALL)
def mae_deit_tiny_patch16(**kwargs) -> DeiTEncoder:
    """DeiT-Ti/16 with a distillation token (5.9M parameters; timm's deit_tiny_distilled_patch16_224)."""
    return _deit(kwargs, "tiny")


@register_model(decoder=DECODER_SMALL, smoke=_SMOKE, finetune=_FT_SMALL)
def mae_deit_small_patch16(**kwargs) -> DeiTEncoder:
    """DeiT-S/16 with a distillation token (22M; timm's deit_small_distilled_patch16_224)."""
    return _deit(kwargs, "small")


@register_model(decoder=DECODER_BASE, smoke=_SMOKE)
def mae_deit_base_patch16(**kwargs) -> DeiTEncoder:
    """DeiT-B/16 with a distillation token (87M; 83.4% on ImageNet-1K distilled from a RegNetY-16GF)."""
    return _deit(kwargs, "base")
