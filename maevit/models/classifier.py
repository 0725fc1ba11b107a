"""Classifiers: the same encoder as in pretraining, plus a head (timm's ``reset_classifier``).

``create_classifier`` builds any registered encoder, gives it a head and loads
pretrained weights of any supported layout. The architecture comes from the
weights file's header when it has one (files and run directories written by
maevit), so a fine-tune recipe never repeats the pretraining's depth or patch
size; the model name is then optional.

Pooling (MAE fine-tuning): ``global_pool='avg'`` averages the patch tokens and
normalises them with a *fresh* ``fc_norm``; the pretrained final ``norm`` is
dropped, as the published fine-tuning does (and timm's ViT with average pooling
has exactly these modules). ``global_pool='token'`` keeps ``norm`` and uses the
class token (the linear-probe setting).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from .contract import EXTRA_HEAD_PARAMS
from .registry import ModelArgumentError, create_encoder
from .weights import load_encoder_weights, read_header

# may be new in a classifier built from an encoder: the head and fc_norm (and the parameters of a
# family's extra heads, maevit.models.contract.ExtraHeads.fresh)
HEAD_PREFIXES = ("head.", "fc_norm.")
# an encoder's final norm, which a classifier with average pooling replaces by a fresh fc_norm (as published)
REPLACED_PREFIXES = ("norm.",)
TIMM_PREFIX = "timm:"  # create_classifier("timm:resnet18", ...): any timm classifier, e.g. a CNN teacher


def resolve_architecture(
    name: str | None, pretrained: str | os.PathLike | Mapping[str, torch.Tensor] | None
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(model_name, build_args, header)`` of a classifier to build.

    The file's header decides the architecture when it names a model and the
    caller's ``name`` is None or the same; a foreign file (no header) needs ``name``.
    """
    header = read_header(pretrained) if pretrained is not None and not isinstance(pretrained, Mapping) else {}
    file_name = header.get("model_name")
    if name is None:
        if not file_name:
            where = f"{pretrained} does not say which model it holds" if pretrained is not None else "no weights"
            raise ModelArgumentError(f"{where}: pass the model name (model.name=..., see `maevit models`)")
        name = file_name
    build = dict(header.get("build_args") or {}) if file_name == name else {}
    return name, build, header


def create_classifier(
    name: str | None,
    num_classes: int,
    *,
    pretrained: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
    global_pool: str | None = "avg",
    strict: bool = True,
    verbose: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Build a classifier from a registered encoder and optionally load pretrained weights.

    Args:
        name: a registered name (``maevit models``), or ``timm:<arch>`` for any timm
            classifier trained from scratch or from a weights file (a CNN teacher for
            distillation; no MAE path, no downloads); None: the one in ``pretrained``'s header.
        num_classes: classes of the new head (0 = no head, pooled features only).
        pretrained: weights in any supported layout (maevit run / file, published
            MAE, Hugging Face ViTMAE, timm), or None for random initialisation.
        global_pool: ``'avg'`` (MAE fine-tuning) or ``'token'`` (class token; linear
            probing); families without a class token pool by averaging. None keeps
            the file's (a fine-tuned classifier).
        strict: raise if weights other than the head / ``fc_norm`` are missing.
        verbose: print the load summary.
        **overrides: encoder arguments on top of the file's: ``img_size`` (position
            tables are resampled), ``drop_path_rate``, ...

    Returns:
        The encoder with a head; ``model.load_report`` holds the
        :class:`~maevit.models.weights.LoadReport` (None without ``pretrained``).

    Example:
        >>> clf = create_classifier("mae_vit_tiny_patch16", 10, img_size=32, patch_size=4)
    """
    name, build, header = resolve_architecture(name, pretrained)
    if name.startswith(TIMM_PREFIX):
        return _timm_classifier(name[len(TIMM_PREFIX):], num_classes, pretrained, global_pool=global_pool,
                                strict=strict, verbose=verbose, **{**build, **overrides})
    model = create_encoder(name, **{**build, **overrides})
    pool = global_pool or header.get("global_pool")
    model.reset_classifier(num_classes, pool)
    model.load_report = None
    if pretrained is not None:
        fresh = HEAD_PREFIXES + tuple(sorted(EXTRA_HEAD_PARAMS))  # any family's: a file may have them
        model.load_report = load_encoder_weights(model, pretrained, strict=strict, fresh=fresh,
                                                 ignore=REPLACED_PREFIXES)
        if verbose:
            print(model.load_report)
    return model


def _timm_classifier(
    arch: str,
    num_classes: int,
    pretrained: str | os.PathLike | Mapping[str, torch.Tensor] | None,
    *,
    global_pool: str | None,
    strict: bool,
    verbose: bool,
    **kwargs: Any,
) -> nn.Module:
    """A timm classifier (e.g. a ResNet or RegNet teacher) with the members that fine-tuning,
    file headers and weight loading use: ``model_name`` (``timm:<arch>``), ``build_args``,
    ``timm_spec()`` and ``checkpoint_filter()``. It keeps timm's own pooling and names, so its
    classifier file is a plain timm state dict (``timm.create_model(arch, ...)`` loads it).

    Set on the instance rather than by subclassing, because the class is whatever timm builds
    for ``arch``.
    """
    import timm

    from .registry import _jsonable, _suggest

    if not timm.is_model(arch):
        raise ModelArgumentError(
            f"unknown timm model {arch!r}.{_suggest(arch, timm.list_models())} Name any architecture of "
            "`timm.list_models()` after 'timm:' (e.g. timm:resnet18); it is built without downloading weights"
        )
    if global_pool not in (None, "avg"):
        raise ValueError(f"global_pool={global_pool!r} does not apply to timm:{arch}: timm models keep their own "
                         "pooling; leave model.global_pool at its default")
    img_size = kwargs.pop("img_size", None)
    sized = {} if img_size is None else {"img_size": img_size}
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs, **sized)
    except TypeError:
        if not sized:
            raise
        # a convolutional network takes any input size and has no img_size argument
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
        sized = {}
    model.model_name = TIMM_PREFIX + arch
    model.build_args = _jsonable({**kwargs, **({} if img_size is None else {"img_size": img_size})})
    if img_size is not None:  # the size it is trained and evaluated at (CNNs take any)
        model.img_size = tuple(img_size) if isinstance(img_size, (list, tuple)) else (img_size, img_size)
    spec = (arch, {**_jsonable(kwargs), **_jsonable(sized), "num_classes": num_classes})
    model.timm_spec = lambda: spec
    model.checkpoint_filter = dict  # its own names: nothing to map
    model.load_report = None
    if pretrained is not None:
        fresh = tuple(f"{c}." for c in _as_tuple(model.pretrained_cfg.get("classifier")))
        model.load_report = load_encoder_weights(model, pretrained, strict=strict, fresh=fresh)
        if verbose:
            print(model.load_report)
    return model


def _as_tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (list, tuple)) else ((x,) if x else ())


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logit features ``[B, D]`` of an encoder or classifier."""
    return model.forward_head(model.forward_features(images), pre_logits=True)
