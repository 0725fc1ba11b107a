"""Classifiers built from pretrained encoders: ``create_classifier``.

A classifier is a plain timm ``VisionTransformer`` (timm names, so its weights
round-trip through ``timm.create_model(..., num_classes=N)``). Pretrained
weights can come from any layout that ``maevit.train.checkpoint`` reads (maevit
runs / encoder files, the published MAE ``.pth`` files, Hugging Face ViTMAE,
timm ViT weights); they are converted to timm encoder names first.

Pooling (MAE fine-tuning, ``models_vit.py``): ``global_pool='avg'`` averages the
patch tokens and normalises them with a *fresh* ``fc_norm``; the final ``norm``
of the pretrained encoder is dropped. That is what the published fine-tuning
code does (its loader asserts that exactly ``head.*`` and ``fc_norm.*`` are
missing) and it is also timm's convention: with ``global_pool='avg'`` timm's
ViT has ``norm = Identity`` and a separate ``fc_norm``. We do not copy
``norm`` into ``fc_norm``: the pretrained ``norm`` was trained per token, not
on pooled tokens, and a fresh LayerNorm (unit scale, zero shift) is what the
published 83.6% used. ``global_pool='token'`` keeps ``norm`` and uses the
class token (the linear-probe setting).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from .patch import to_2tuple_size

# keys that a classifier may legitimately lack in a pretrained encoder file
HEAD_KEYS = ("head.weight", "head.bias")
FC_NORM_KEYS = ("fc_norm.weight", "fc_norm.bias")


def timm_name_for(name: str) -> str:
    """Map a maevit MAE name or a timm ViT/DeiT name to the timm architecture name.

    ``mae_vit_tiny_patch16`` -> ``vit_tiny_patch16_224``; ``mae_vit_huge_patch14`` ->
    ``vit_huge_patch14_224``; timm names (``vit_base_patch16_224``,
    ``deit_small_patch16_224``, ...) pass through.

    Raises:
        KeyError: the name is neither a maevit MAE name nor a timm ViT/DeiT model.
    """
    m = re.fullmatch(r"mae_(vit_\w+_patch\d+)", name)
    if m:
        name = f"{m.group(1)}_224"
    base = name.split(".")[0]  # allow timm 'arch.tag' names
    if not timm.is_model(base) or not re.match(r"(vit|deit)_", base):
        import difflib

        choices = timm.list_models("vit_*") + timm.list_models("deit_*")
        close = difflib.get_close_matches(base, choices, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(
            f"unknown classifier model {name!r}.{hint} Use a maevit MAE name "
            f"(e.g. mae_vit_base_patch16) or a timm ViT/DeiT name (e.g. vit_base_patch16_224)"
        )
    if "distilled" in base:
        raise KeyError(
            f"{name!r}: distilled DeiT models (two heads) are not supported as classifiers yet; "
            f"use the plain model, e.g. {base.replace('_distilled', '')!r}"
        )
    return base


def _compact(keys: Iterable[str]) -> str:
    """``blocks.0.x, blocks.1.x`` -> ``blocks.{0..1}.x``: readable key summaries."""
    groups: dict[str, list[int]] = {}
    for k in keys:
        m = re.match(r"(.*?\.)(\d+)(\..*)", k)
        if m:
            groups.setdefault(f"{m.group(1)}{{}}{m.group(3)}", []).append(int(m.group(2)))
        else:
            groups.setdefault(k, [])
    parts = []
    for pat, ids in groups.items():
        if ids:
            lo, hi = min(ids), max(ids)
            parts.append(pat.format(f"{lo}..{hi}" if hi > lo else lo))
        else:
            parts.append(pat)
    return ", ".join(sorted(parts))


@dataclass
class LoadReport:
    """What happened when pretrained weights were loaded into a classifier.

    Attributes:
        source: the path (or ``<state dict>``).
        format: the checkpoint layout that was detected.
        loaded: keys copied into the model.
        new: model keys initialised fresh on purpose (the new head, ``fc_norm``).
        missing: other model keys absent from the checkpoint (allowed ones only;
            anything else raises).
        unexpected: checkpoint keys the model has no place for (e.g. ``norm.*`` with
            average pooling, decoder weights).
        resized: keys that were resampled, with ``old -> new`` shapes.
    """

    source: str
    format: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.source} ({self.format})"]
        if self.new:
            lines.append(f"  initialised fresh: {_compact(self.new)}")
        for k, v in self.resized.items():
            lines.append(f"  resized {k}: {v}")
        if self.missing:
            lines.append(f"  missing (allowed): {_compact(self.missing)}")
        if self.unexpected:
            lines.append(f"  ignored from checkpoint: {_compact(self.unexpected)}")
        return "\n".join(lines)


def _grid_of(num_tokens: int, key: str) -> tuple[int, int]:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"{key}: cannot infer the grid of a {num_tokens}-patch position table (not square); "
            f"fine-tune at the pretraining resolution or resize the table yourself"
        )
    return side, side


def load_classifier_weights(
    model: nn.Module,
    src: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    allow_missing: Iterable[str] = (),
) -> LoadReport:
    """Load pretrained weights (any supported layout) into a timm ViT classifier.

    Position tables are resampled (bicubic, timm's ``resample_abs_pos_embed``)
    when the checkpoint was trained at another resolution. The head is kept
    when its shape matches (a fine-tuned classifier) and initialised fresh
    otherwise.

    Args:
        model: a timm ``VisionTransformer`` (from :func:`create_classifier`).
        src: path (``.safetensors`` / ``.pth`` / ``.bin`` / run dir) or state dict.
        strict: raise if model keys other than the head (and ``fc_norm`` under
            average pooling) are missing.
        allow_missing: key prefixes that may be missing even when ``strict``.

    Returns:
        A :class:`LoadReport` (print it for a readable summary).

    Raises:
        ValueError: a shape that cannot be adapted, or disallowed missing keys.
    """
    from maevit.train.checkpoint import detect_format, read_state_dict, to_timm_encoder_keys

    raw = read_state_dict(src)
    fmt = detect_format(raw)
    sd = to_timm_encoder_keys(raw)
    own = model.state_dict()
    report = LoadReport(source=str(src) if not isinstance(src, Mapping) else "<state dict>", format=fmt)

    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k not in own:
            report.unexpected.append(k)
            continue
        target = own[k]
        if k == "pos_embed" and v.shape != target.shape:
            npt = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
            new_grid = tuple(model.patch_embed.grid_size)
            old_grid = _grid_of(v.shape[1] - npt, k)
            v = resample_abs_pos_embed(v.float(), list(new_grid), list(old_grid), num_prefix_tokens=npt)
            report.resized[k] = f"{old_grid[0]}x{old_grid[1]} -> {new_grid[0]}x{new_grid[1]} patches"
        if k in HEAD_KEYS and v.shape != target.shape:
            report.unexpected.append(k)  # a head for other classes: start a new one
            continue
        if v.shape != target.shape:
            hint = ""
            if k == "patch_embed.proj.weight":
                hint = f" (patch size / channels differ: pass patch_size={v.shape[-1]}, in_chans={v.shape[1]})"
            raise ValueError(
                f"{k}: checkpoint shape {tuple(v.shape)} does not fit the model's {tuple(target.shape)}{hint}; "
                f"check the model name (size) against the checkpoint"
            )
        out[k] = v.to(target.dtype)

    fresh = set(HEAD_KEYS)
    if not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity):
        fresh |= set(FC_NORM_KEYS)
    allow = tuple(allow_missing)
    bad = []
    for k in own:
        if k in out:
            continue
        if k in fresh:
            report.new.append(k)
        elif not strict or k.startswith(allow):
            report.missing.append(k)
        else:
            bad.append(k)
    if bad:
        raise ValueError(
            f"checkpoint {report.source} ({fmt}) lacks {len(bad)} weights the classifier needs: {_compact(bad)}. "
            f"Check that the model name matches the checkpoint, or allow them with "
            f"allow_missing=({', '.join(repr(b.split('.')[0]) for b in sorted(set(bad))[:3])},) / strict=False"
        )
    model.load_state_dict(out, strict=False)
    report.loaded = sorted(out)
    return report


def create_classifier(
    name: str,
    num_classes: int,
    *,
    pretrained: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
    img_size: int | tuple[int, int] = 224,
    patch_size: int | None = None,
    in_chans: int | None = None,
    global_pool: str = "avg",
    drop_path_rate: float = 0.0,
    strict: bool = True,
    allow_missing: Iterable[str] = (),
    verbose: bool = False,
    **timm_kwargs,
) -> nn.Module:
    """Build a timm ViT classifier and optionally load pretrained encoder weights.

    Args:
        name: maevit MAE name (``mae_vit_base_patch16``) or timm ViT/DeiT name.
        num_classes: classes of the new head (0 = no head, features only).
        pretrained: weights in any supported layout (see module docstring), or None.
        img_size: fine-tuning resolution; position tables are resampled to it.
        patch_size: defaults to the checkpoint's patch size, else the name's.
        in_chans: defaults to the checkpoint's channels, else 3.
        global_pool: ``'avg'`` (MAE fine-tuning: mean of patch tokens + ``fc_norm``)
            or ``'token'`` (class token after ``norm``; linear probing).
        drop_path_rate: stochastic depth (MAE: 0.1 / 0.2 / 0.3 for B / L / H).
        strict, allow_missing: see :func:`load_classifier_weights`.
        verbose: print the load summary.
        **timm_kwargs: passed to ``timm.create_model``.

    Returns:
        A timm ``VisionTransformer``; ``model.load_report`` holds the
        :class:`LoadReport` (None without ``pretrained``).

    Example:
        >>> clf = create_classifier("mae_vit_tiny_patch16", 10, img_size=32, patch_size=4)
    """
    if global_pool not in ("avg", "token"):
        raise ValueError(f"global_pool={global_pool!r}: use 'avg' (MAE fine-tuning) or 'token' (class token)")
    arch = timm_name_for(name)
    sd = None
    if pretrained is not None:
        from maevit.train.checkpoint import read_state_dict

        # read once here to infer patch size / channels, then hand the dict on
        sd = read_state_dict(pretrained)
        from maevit.train.checkpoint import to_timm_encoder_keys

        w = to_timm_encoder_keys(sd).get("patch_embed.proj.weight")
        if w is not None:
            patch_size = patch_size or int(w.shape[-1])
            in_chans = in_chans or int(w.shape[1])
    kwargs = dict(timm_kwargs)
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    model = timm.create_model(
        arch,
        pretrained=False,
        num_classes=num_classes,
        img_size=to_2tuple_size(img_size),
        in_chans=in_chans or 3,
        global_pool=global_pool,
        fc_norm=global_pool == "avg",
        drop_path_rate=drop_path_rate,
        **kwargs,
    )
    if num_classes > 0:
        # MAE fine-tuning: head weights trunc-normal(std 2e-5), zero bias (a near-zero
        # head keeps early updates from wrecking the pretrained features)
        nn.init.trunc_normal_(model.head.weight, std=2e-5)
        nn.init.zeros_(model.head.bias)
    model.load_report = None
    if sd is not None:
        report = load_classifier_weights(model, sd, strict=strict, allow_missing=allow_missing)
        report.source = str(pretrained) if not isinstance(pretrained, Mapping) else report.source
        model.load_report = report
        if verbose:
            print(report)
    return model


def extract_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logit features ``[B, D]`` of a timm ViT (classifier or maevit encoder).

    With ``global_pool='token'`` this is the class token after the final norm, the
    feature the published linear probe uses.
    """
    tokens = model.forward_features(images)  # [B, prefix + L, D]
    return model.forward_head(tokens, pre_logits=True)  # [B, D]
