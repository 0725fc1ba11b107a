"""Registered models: ``register_model`` (used at the end of each family file),
``create_encoder``, ``create_mae``, ``list_models``, ``model_info``, ``family_defaults``.

A registered constructor builds an *encoder* (see :mod:`maevit.models.contract`)
from keyword overrides; the registration adds the MAE decoder size that suits
it, the pretraining and fine-tuning settings that suit it (``pretrain=``,
``finetune=``: only what differs from :data:`PRETRAIN_DEFAULTS` /
:data:`FINETUNE_DEFAULTS`) and the arguments of a tiny but structurally
identical version (for tests and smoke runs)::

    @register_model(decoder=DECODER_SMALL, smoke=dict(img_size=32, depth=1))
    def mae_vit_tiny_patch16(**kwargs) -> ViTEncoder:
        \"\"\"ViT-Tiny/16 (DeiT-Ti width).\"\"\"
        return build_encoder(ViTEncoder, kwargs, embed_dim=192, depth=12, num_heads=3, patch_size=16)

:func:`build_encoder` checks the overrides against the encoder class's own
signature and records the resolved arguments as ``encoder.build_args``, which
every file the toolkit writes carries, so the exact architecture can be rebuilt
from a file alone (``create_encoder(model_name, **build_args)``).
"""
from __future__ import annotations

import contextlib
import difflib
import fnmatch
import inspect
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .mae import MaskedAutoencoder


@dataclass(frozen=True)
class DecoderSize:
    """Width, depth and heads of the shared MAE decoder."""

    embed_dim: int = 512
    depth: int = 8
    num_heads: int = 16


# MAE's published decoder (Base and up); Tiny / Small use a 256-wide, 4-block one so the
# decoder does not cost more than the encoder (a 1-block decoder still works, per the paper)
DECODER_BASE = DecoderSize(512, 8, 16)
DECODER_SMALL = DecoderSize(256, 4, 8)

# arguments of create_mae that are not encoder arguments
MAE_ARGS = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads", "norm_pix_loss", "mask_ratio")

# What a model that states nothing gets (MAE's ViT recipe). A family states only what differs, in its
# own file, beside its registrations; `family_defaults` turns them into config keys, and a recipe or
# command-line value always wins over them.
PRETRAIN_DEFAULTS: dict[str, Any] = dict(
    mask_ratio=0.75,  # fraction of mask units removed (MAE 0.75; Hiera / FCMAE / SparK 0.6 at 32 px units)
    norm_pix_loss=True,  # per-patch normalised pixel targets
)
FINETUNE_DEFAULTS: dict[str, Any] = dict(
    layer_decay=0.65,  # lr factor per layer-decay group (MAE ViT-B 0.65)
    layer_decay_by="block",  # "block": one group per block (ViT); "stage": one per stage (FCMAE, hierarchical)
    layer_decay_exempt=(),  # fnmatch patterns of parameters that keep the full lr (e.g. a CNN stem)
    drop_path=0.1,  # stochastic depth
)
# where each setting lives in the pretraining / fine-tuning configs
_CONFIG_KEYS = {
    "pretrain": dict(mask_ratio="model.mask_ratio", norm_pix_loss="model.norm_pix_loss",
                     decoder_embed_dim="model.decoder_embed_dim", decoder_depth="model.decoder_depth",
                     decoder_num_heads="model.decoder_num_heads"),
    "finetune": dict(layer_decay="optim.layer_decay", layer_decay_by="optim.layer_decay_by",
                     layer_decay_exempt="optim.layer_decay_exempt", drop_path="model.drop_path"),
}


@dataclass(frozen=True)
class ModelEntry:
    """One registered model.

    Attributes:
        name: the registered name.
        fn: the constructor (overrides -> encoder).
        family: the family module (``vit``, ``deit``, ...).
        decoder: the MAE decoder size that suits it.
        smoke: arguments of a tiny, structurally identical version (tests, smoke runs).
        doc: the first line of the constructor's docstring.
        pretrain: MAE settings that suit it, on top of :data:`PRETRAIN_DEFAULTS` (and ``decoder``).
        finetune: fine-tuning settings that suit it, on top of :data:`FINETUNE_DEFAULTS`.
    """

    name: str
    fn: Callable[..., nn.Module]
    family: str
    decoder: DecoderSize
    smoke: dict[str, Any] = field(default_factory=dict)
    doc: str = ""
    pretrain: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)

    def defaults(self, stage: str) -> dict[str, Any]:
        """The resolved settings of ``stage`` (``"pretrain"`` / ``"finetune"``), by setting name."""
        if stage == "pretrain":
            d = self.decoder
            return {**PRETRAIN_DEFAULTS, "decoder_embed_dim": d.embed_dim, "decoder_depth": d.depth,
                    "decoder_num_heads": d.num_heads, **self.pretrain}
        if stage == "finetune":
            return {**FINETUNE_DEFAULTS, **self.finetune}
        raise ValueError(f"stage={stage!r}: use 'pretrain' or 'finetune'")


_REGISTRY: dict[str, ModelEntry] = {}


class ModelArgumentError(KeyError):
    """An unknown model name or constructor argument; the message names close matches."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def register_model(
    *,
    decoder: DecoderSize = DECODER_BASE,
    smoke: Mapping[str, Any] | None = None,
    pretrain: Mapping[str, Any] | None = None,
    finetune: Mapping[str, Any] | None = None,
):
    """Decorator registering an encoder constructor under its function name.

    Args:
        decoder: the MAE decoder size for this model.
        smoke: arguments that make a tiny version with the same structure.
        pretrain: MAE settings that differ from :data:`PRETRAIN_DEFAULTS` (e.g. ``mask_ratio=0.6``).
        finetune: fine-tuning settings that differ from :data:`FINETUNE_DEFAULTS`
            (e.g. ``layer_decay=0.8, layer_decay_by="stage"``).

    Raises:
        ValueError: a name registered twice, or a setting that is not a known one.
    """
    for stage, given in (("pretrain", pretrain), ("finetune", finetune)):
        unknown = set(given or {}) - set(_CONFIG_KEYS[stage])
        if unknown:
            raise ValueError(f"register_model({stage}=...): unknown settings {sorted(unknown)}; "
                             f"valid: {', '.join(_CONFIG_KEYS[stage])}")

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        family = fn.__module__.rsplit(".", 1)[-1]
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _REGISTRY[name] = ModelEntry(name, fn, family, decoder, dict(smoke or {}), doc, dict(pretrain or {}),
                                     dict(finetune or {}))
        return fn

    return wrap


def accepted_args(cls: type) -> list[str]:
    """Keyword arguments a class's constructor accepts, following ``**kwargs`` up the MRO."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(n for n in names if n not in ("device", "dtype")))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    json.dumps(value)  # raises for anything a file header cannot hold
    return value


def build_encoder(cls: type, overrides: Mapping[str, Any], /, **defaults: Any) -> nn.Module:
    """Instantiate ``cls(**defaults | overrides)`` and record the arguments as ``build_args``.

    Raises:
        ModelArgumentError: an override the constructor does not accept (close matches named).
    """
    valid = accepted_args(cls)
    for key in overrides:
        if key not in valid:
            raise ModelArgumentError(
                f"unknown argument {key!r} for {cls.__name__}.{_suggest(key, valid + list(MAE_ARGS))} "
                f"Valid: {', '.join(valid)}"
            )
    args = {**defaults, **overrides}
    encoder = cls(**args)
    # the class's own defaults too, so a file states its whole architecture (not only what differed)
    own = inspect.signature(cls.__init__).parameters.values()
    full = {p.name: p.default for p in own if p.default is not p.empty and p.kind is p.POSITIONAL_OR_KEYWORD}
    encoder.build_args = _jsonable({**full, **args})
    return encoder


def model_info(name: str) -> ModelEntry:
    """The registry entry of ``name``.

    Raises:
        ModelArgumentError: unknown name, with close matches.
    """
    if name not in _REGISTRY:
        raise ModelArgumentError(
            f"unknown model {name!r}.{_suggest(name, _REGISTRY)} See `maevit models` for the registered names."
        )
    return _REGISTRY[name]


def family_defaults(name: str | None, stage: str) -> dict[str, Any]:
    """The settings registered with ``name`` for ``stage``, as dotted config keys.

    ``{"model.mask_ratio": 0.6, "model.decoder_embed_dim": 256, ...}`` for ``"pretrain"``;
    ``{"optim.layer_decay": 0.75, "optim.layer_decay_by": "stage", "model.drop_path": 0.1, ...}``
    for ``"finetune"``. A name that is not registered here (``None``, ``timm:...``) gets the
    toolkit-wide defaults. Fill only the config values left unset
    (:func:`maevit.config.fill_unset`): a recipe or command-line value always wins.

    Args:
        name: a registered model name, or None.
        stage: ``"pretrain"`` or ``"finetune"``.
    """
    if stage not in _CONFIG_KEYS:
        raise ValueError(f"stage={stage!r}: use 'pretrain' or 'finetune'")
    if name in _REGISTRY:
        values = _REGISTRY[name].defaults(stage)
    else:
        values = ModelEntry("", lambda: None, "", DECODER_BASE).defaults(stage)
    return {_CONFIG_KEYS[stage][k]: v for k, v in values.items()}


def list_models(pattern: str = "") -> list[str]:
    """Registered names containing ``pattern`` (or matching it, when it has ``*`` / ``?``)."""
    if any(c in pattern for c in "*?["):
        return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))
    return sorted(n for n in _REGISTRY if pattern in n)


def create_encoder(name: str, **overrides: Any) -> nn.Module:
    """Build the encoder of a registered model.

    Args:
        name: one of :func:`list_models`.
        **overrides: constructor arguments of the family (``img_size``, ``patch_size``,
            ``depth``, ``pos_encoding``, ...); unknown ones are errors naming close matches.
    """
    entry = model_info(name)
    with _argument_checks(name, overrides):
        encoder = entry.fn(**overrides)
    encoder.model_name = name
    return encoder


@contextlib.contextmanager
def _argument_checks(name: str, args: Mapping[str, Any]):
    """timm's blocks check their arguments with ``assert`` (``dim should be divisible by num_heads``):
    at construction such a failure is a size that does not fit, a usage error with the values, not a bug."""
    try:
        yield
    except AssertionError as e:
        given = " ".join(f"{k}={v!r}" for k, v in args.items()) or "its registered sizes"
        raise ModelArgumentError(
            f"cannot build {name} with {given}: {e or 'a size check failed'} (widths must be divisible by the "
            "number of heads, image sizes by the patch size and strides; `maevit models NAME` shows the sizes)"
        ) from None


def create_mae(
    name: str | None = None,
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
    **overrides: Any,
) -> MaskedAutoencoder:
    """Build a registered MAE model (encoder + shared decoder), optionally loading weights.

    Args:
        name: one of :func:`list_models`; None takes the name (and build
            arguments) recorded in ``checkpoint``'s header.
        checkpoint: a path or state dict in any supported layout (maevit runs and
            files, the published MAE files, Hugging Face ``ViTMAEForPreTraining``, timm).
        **overrides: encoder arguments, plus ``decoder_embed_dim``, ``decoder_depth``,
            ``decoder_num_heads``, ``norm_pix_loss`` and ``mask_ratio``.

    Example:
        >>> mae = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=4)
    """
    from . import weights

    header = weights.read_header(checkpoint) if checkpoint is not None and not isinstance(checkpoint, Mapping) else {}
    if name is None:
        name = header.get("model_name")
        if not name:
            raise ModelArgumentError(
                f"{checkpoint} does not say which model it holds: pass the model name (see `maevit models`)"
            )
    entry = model_info(name)
    args: dict[str, Any] = {}
    if header.get("model_name") == name:  # the file's own architecture, then the caller's changes
        args.update(header.get("build_args") or {})
        args.update({k: v for k, v in (header.get("mae") or {}).items() if k in MAE_ARGS})
    args.update(overrides)
    mae_args = {k: args.pop(k) for k in MAE_ARGS if k in args}
    try:
        encoder = create_encoder(name, **args)
    except ModelArgumentError as e:
        raise ModelArgumentError(f"{e} (create_mae also takes {', '.join(MAE_ARGS)})") from None
    d = entry.decoder
    with _argument_checks(name, {**args, **mae_args}):
        model = MaskedAutoencoder(
            encoder,
            decoder_embed_dim=mae_args.get("decoder_embed_dim", d.embed_dim),
            decoder_depth=mae_args.get("decoder_depth", d.depth),
            decoder_num_heads=mae_args.get("decoder_num_heads", d.num_heads),
            norm_pix_loss=mae_args.get("norm_pix_loss", entry.defaults("pretrain")["norm_pix_loss"]),
            mask_ratio=mae_args.get("mask_ratio", entry.defaults("pretrain")["mask_ratio"]),
        )
    if checkpoint is not None:
        weights.load_mae_weights(model, checkpoint)
    return model
