"""The encoder contract: what every encoder family implements, and a checker.

Every registered encoder (plain ViT, DeiT, hybrid, CvT, SReT, Swin, Hiera, ...)
is an ``nn.Module`` with these members. The MAE model, the fine-tuning,
probing, evaluation, visualization and export code use nothing else, so a new
family is one file in ``maevit/models/`` plus its registrations.

Attributes
    ``in_chans`` (int)
        input channels.
    ``img_size`` ((int, int))
        the input size it was built for.
    ``patch_size`` (int)
        pixel side of one reconstruction target (one decoder token).
    ``mask_unit`` (int)
        pixel side at which the encoder must be masked: the patch for a plain
        ViT; the coarsest stride for pyramid / convolutional designs, so every
        window of every stage is fully visible or fully masked. A multiple of
        ``patch_size``.
    ``grid_size`` ((int, int))
        patches along H and W (``img_size / patch_size``).
    ``num_prefix_tokens`` (int)
        class / distillation tokens in front of the patch tokens of
        :meth:`forward_masked` (0 for encoders without them).
    ``num_features`` (int)
        width of the tokens :meth:`forward_masked` returns and of the pooled
        feature :meth:`forward_head` gives with ``pre_logits=True``.
    ``visible_only`` (bool)
        True: the encoder computes only on visible units. False: a declared
        mask-token fallback (SimMIM-style), slower but still leak-free.
    ``build_args`` (dict)
        JSON-serialisable constructor arguments; with ``model_name`` they
        rebuild the exact architecture (``create_encoder(model_name, **build_args)``).
        Set by :func:`maevit.models.registry.build_encoder`.
    ``model_name`` (str)
        the registered name it was built from.
    ``num_classes`` (int), ``global_pool`` (str)
        the classification head (0 = none).

Methods
    ``forward_masked(x, mask) -> [B, num_prefix_tokens + K, num_features]``
        encode only what ``mask`` (:class:`~maevit.models.masking.Mask`) leaves
        visible. The ``K`` patch tokens follow ``mask.ids_keep``; the final norm
        is applied. Pixels of masked patches must not influence the output, in
        train and in eval mode.
    ``forward_mask_tokens(x, mask)`` (optional; benchmarks)
        the same output computed SimMIM-style: every position is encoded, masked
        ones replaced by a mask token at the input. The cost a visible-only path
        saves is measured against this.
    ``forward_features(x)``, ``forward_head(x, pre_logits=False)``, ``reset_classifier(num_classes, global_pool=None)``
        the full image, for fine-tuning, with timm's meaning.
    ``no_weight_decay() -> set[str]``, ``group_matcher(coarse=False) -> dict``
        parameter names without weight decay; timm's layer grouping (layer decay).
    ``tokens_of(features) -> [B, num_prefix_tokens + L, num_features]``
        the output of ``forward_features`` as tokens in :meth:`forward_masked`'s
        layout, patch tokens in row-major image order (identity for token
        encoders; maps are flattened). With nothing masked, ``forward_masked``
        equals this up to the token order (where the family allows it).
    ``checkpoint_filter(state_dict) -> state_dict``
        map foreign weights (timm, published, Hugging Face layouts of this
        family) to this encoder's names and resize position tables to its grid.
    ``timm_spec() -> (arch, kwargs) | None``
        a timm architecture whose ``create_model(arch, **kwargs)`` loads this
        encoder's (or classifier's) state dict strictly, where timm has one.

Optional parts
    ``extra_heads`` (:class:`ExtraHeads`)
        heads besides ``head`` (DeiT's distillation head): their names in
        evaluation, the parameters that are new when a classifier is built from
        an encoder file, how they train (``set_distilled_training``) and how
        they are evaluated (``forward_heads``). Code outside the family's own
        file reaches them only through :func:`extra_heads`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn

from .masking import random_masking

ATTRIBUTES = ("in_chans", "img_size", "patch_size", "mask_unit", "grid_size", "num_prefix_tokens", "num_features",
              "visible_only", "build_args", "model_name", "num_classes")
METHODS = ("forward_masked", "forward_features", "forward_head", "reset_classifier", "no_weight_decay",
           "group_matcher", "tokens_of", "checkpoint_filter", "timm_spec")


@dataclass(frozen=True)
class ExtraHeads:
    """Optional contract part: a classifier's heads besides ``head`` (DeiT: the distillation head).

    The model also implements ``forward_heads(features) -> tuple`` (each head's own logits, in
    ``names`` order, in any mode) and ``set_distilled_training(on)`` (training then returns that
    tuple, for a loss per head; otherwise ``forward_head`` averages the heads).

    Attributes:
        names: the heads in evaluation (``("cls", "dist")``).
        fresh: parameter-name prefixes that may be new in a classifier built from an encoder file.
        distill_tokens: prefix tokens that exist for these heads (a plain ViT loading such a file drops them).
    """

    names: tuple[str, ...]
    fresh: tuple[str, ...] = ()
    distill_tokens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # known to the weight loading of families without them (a DeiT file into a plain ViT)
        EXTRA_HEAD_TOKENS.update(self.distill_tokens)
        EXTRA_HEAD_PARAMS.update(self.fresh)

    def set_training(self, model: nn.Module, on: bool) -> None:
        """Training returns each head's logits (``on``), or their average (timm's default)."""
        model.set_distilled_training(on)

    def logits(self, model: nn.Module, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: logits}`` of every head from ``forward_features`` output."""
        return dict(zip(self.names, model.forward_heads(features)))


EXTRA_HEAD_TOKENS: set[str] = set()  # prefix tokens of every family's extra heads (filled as families load)
EXTRA_HEAD_PARAMS: set[str] = set()  # their parameter-name prefixes


def extra_heads(model: nn.Module) -> ExtraHeads | None:
    """The model's :class:`ExtraHeads`, or None for a classifier with one head."""
    return getattr(model, "extra_heads", None)


class ContractError(AssertionError):
    """An encoder does not meet the contract; the message names what is wrong."""


def check_encoder(encoder: nn.Module, *, batch_size: int = 2, mask_ratio: float = 0.75) -> None:
    """Check the static contract and the shapes of one masked and one full forward.

    Raises:
        ContractError: naming the first broken rule.
    """
    name = type(encoder).__name__
    for attr in ATTRIBUTES:
        if not hasattr(encoder, attr):
            raise ContractError(f"{name} has no attribute {attr!r}")
    for meth in METHODS:
        if not callable(getattr(encoder, meth, None)):
            raise ContractError(f"{name} has no method {meth}()")
    p, u = encoder.patch_size, encoder.mask_unit
    h, w = encoder.img_size
    if u % p:
        raise ContractError(f"{name}: mask_unit {u} is not a multiple of patch_size {p}")
    if h % u or w % u:
        raise ContractError(f"{name}: img_size {h}x{w} is not a multiple of mask_unit {u}")
    if tuple(encoder.grid_size) != (h // p, w // p):
        raise ContractError(f"{name}: grid_size {encoder.grid_size} != img_size / patch_size {(h // p, w // p)}")
    try:
        json.dumps(encoder.build_args)
    except TypeError as e:
        raise ContractError(f"{name}.build_args is not JSON-serialisable: {e}") from e
    if not isinstance(encoder.no_weight_decay(), (set, frozenset)):
        raise ContractError(f"{name}.no_weight_decay() must return a set of parameter names")
    names = {n for n, _ in encoder.named_parameters()}
    unknown = {n for n in encoder.no_weight_decay() if n not in names and not any(m.startswith(n) for m in names)}
    if unknown:
        raise ContractError(f"{name}.no_weight_decay() names parameters it does not have: {sorted(unknown)}")

    x = torch.randn(batch_size, encoder.in_chans, h, w)
    mask = random_masking(batch_size, encoder.grid_size, mask_ratio, patches_per_unit=u // p)
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        latent = encoder.forward_masked(x, mask)
        expect = (batch_size, encoder.num_prefix_tokens + mask.ids_keep.shape[1], encoder.num_features)
        if tuple(latent.shape) != expect:
            raise ContractError(f"{name}.forward_masked returned {tuple(latent.shape)}, expected {expect}")
        pooled = encoder.forward_head(encoder.forward_features(x), pre_logits=True)
        if tuple(pooled.shape) != (batch_size, encoder.num_features):
            raise ContractError(f"{name}.forward_head(pre_logits=True) returned {tuple(pooled.shape)}, "
                                f"expected {(batch_size, encoder.num_features)}")
        if not (torch.isfinite(latent).all() and torch.isfinite(pooled).all()):
            raise ContractError(f"{name}: non-finite outputs")
    encoder.train(was_training)



class EncoderMixin:
    """Defaults and helpers shared by encoder families (mixed into an ``nn.Module``)."""

    visible_only: bool = True
    # False where forward_masked with nothing masked legitimately differs from forward_features
    # (the family file says why); the registry-wide tests then skip that comparison
    masked_equals_full: bool = True
    model_name: str = ""
    build_args: dict = {}

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error for images of the wrong size or channel count."""
        h, w = self.img_size
        if tuple(x.shape[-2:]) != (h, w) or x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not match the model: expected [B, {self.in_chans}, {h}, {w}]; "
                f"build the model with img_size={tuple(x.shape[-2:])} / in_chans={x.shape[1]} or resize the images"
            )

    @property
    def patches_per_unit(self) -> int:
        """Mask units are ``s x s`` patches."""
        return self.mask_unit // self.patch_size

    def forward_mask_tokens(self, x: torch.Tensor, mask) -> torch.Tensor:
        """SimMIM-style reference path (benchmarks); families implement it where they can."""
        raise NotImplementedError(f"{type(self).__name__} has no mask-token path")

    def tokens_of(self, features: torch.Tensor) -> torch.Tensor:
        """``forward_features`` output -> ``[B, prefix + L, D]`` tokens (identity for token encoders)."""
        return features

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Foreign weights -> this encoder's names (identity unless a family maps layouts)."""
        return dict(state_dict)

    def timm_spec(self) -> tuple[str, dict] | None:
        """A timm architecture that loads this module's state dict strictly, or None."""
        return None
