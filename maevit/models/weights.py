"""Weights: safe reading of every supported layout, loading with one report, and
writing files that say which architecture they hold.

Reading never runs code: safetensors, or ``torch.load(weights_only=True)``
(the published MAE files' argparse ``Namespace`` is the one class allowed).

Layouts (:func:`detect_format`):

- ``maevit_mae``: this package's ``MaskedAutoencoder`` (``encoder.*`` / ``decoder.*``);
- ``encoder``: an encoder alone in its family's names (a maevit export, timm
  weights, the published encoder-only ``mae_pretrain_vit_*.pth``, a classifier);
- ``mae_published``: the full published MAE checkpoints (timm encoder names plus
  ``mask_token``, ``decoder_pos_embed``, ``decoder_embed.*``, ``decoder_blocks.*``, ...);
- ``hf_vitmae``: Hugging Face ``ViTMAEForPreTraining`` / ``ViTMAEModel``
  (:mod:`maevit.models.hf_vitmae`).

Family-specific names (a timm DeiT's distillation token, Hugging Face CvT, ...) are
mapped by each family's ``checkpoint_filter``, which also resizes position
tables to the model's grid.

Every file the toolkit writes carries a header (safetensors metadata,
``trainer_state.json["model"]`` beside a training checkpoint, or the ``maevit``
key of ``config.json`` in a model folder written by ``maevit export``): ``kind``
(encoder / mae / classifier), ``model_name`` and ``build_args`` (enough to
rebuild the exact architecture), and for classifiers the classes, pooling and
input normalisation.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maevit.fileio import save_safetensors_atomic
from maevit.runlayout import (
    CHECKPOINTS_DIR, EMA_PREFIX, ENCODER_FILE, LATEST_FILE, STATE_FILE, STATE_FILE_PREFIXES,
)

from .errors import CheckpointError

FORMAT = "maevit"
FORMAT_VERSION = "2"
FORMATS = ("maevit_mae", "encoder", "mae_published", "hf_vitmae")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
FOLDER_CONFIG = "config.json"  # a model folder's configuration (timm's and Hugging Face's name)
FOLDER_HEADER_KEY = "maevit"  # the key of config.json that holds the maevit header


# --------------------------------------------------------------------------- locating


def find_weights_file(path: str | os.PathLike) -> Path:
    """Resolve a file, a checkpoint directory or a run directory to one weights file.

    Search order in a directory (first hit wins):

    1. ``checkpoints/latest`` (a directory, a symlink to one, or a text file
       naming one) inside a run directory;
    2. the ``checkpoints/`` entry with the largest number in its name;
    3. model files in the directory itself: ``model.safetensors``, other
       ``*.safetensors`` (sorted) except ``encoder.safetensors``, then
       ``pytorch_model.bin`` / ``model.pth`` / ``model.pt`` / other ``.pth`` ``.pt``
       ``.bin`` (training-state files such as ``optimizer.bin`` are skipped): this is
       also how model folders (timm's / Hugging Face's ``model.safetensors`` beside
       ``config.json``) are read;
    4. ``encoder.safetensors`` (encoder-only: an MAE's decoder stays as initialised).

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: a directory without weights.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt_root = path / CHECKPOINTS_DIR
    if ckpt_root.is_dir():
        latest = ckpt_root / LATEST_FILE
        if latest.is_file() and latest.suffix not in WEIGHT_SUFFIXES:
            target = ckpt_root / latest.read_text().strip()  # a pointer file naming the latest
            if not target.exists():
                raise CheckpointError(f"{latest} names {target.name!r}, which does not exist in {ckpt_root}")
            latest = target
        if latest.exists():
            return find_weights_file(latest)
        # skip half-written entries ('.tmp-...') and hidden files
        numbered = [p for p in ckpt_root.iterdir() if re.search(r"\d+", p.name) and ".tmp" not in p.name
                    and not p.name.startswith((".", EMA_PREFIX))]
        numbered = [p for p in numbered if p.is_dir() or p.suffix in WEIGHT_SUFFIXES]
        if numbered:
            best = max(numbered, key=lambda p: (int(re.findall(r"\d+", p.name)[-1]), p.stat().st_mtime))
            return find_weights_file(best)
    files = [p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
    files = [p for p in files if not p.name.startswith(STATE_FILE_PREFIXES) and ".tmp-" not in p.name]

    def rank(p: Path) -> tuple:
        if p.name == "model.safetensors":
            return (0, p.name)
        if p.name == ENCODER_FILE:
            return (4, p.name)
        if p.suffix == ".safetensors":
            return (1 if p.name.startswith("model") else 2, p.name)
        return (3, 0 if p.stem in ("pytorch_model", "model") else 1, p.name)

    if files:
        return min(files, key=rank)
    seen = sorted(p.name for p in path.iterdir())[:12]
    raise CheckpointError(
        f"no model weights found in directory {path}: expected checkpoints/latest, checkpoints/<step>/, "
        f"model.safetensors, *.safetensors, pytorch_model.bin or encoder.safetensors; found {seen or 'nothing'}"
    )


# --------------------------------------------------------------------------- reading


def _torch_load(path: Path) -> Any:
    # The published MAE checkpoints store the training arguments as an argparse.Namespace
    # under 'args'. weights_only=True refuses every class that is not allow-listed; Namespace
    # is a plain attribute bag whose unpickling runs no user code, so allowing exactly that
    # one class keeps loading safe.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError / RuntimeError / EOFError / ...
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg:
            found = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", msg)
            raise CheckpointError(
                f"refused to unpickle {path}: it contains Python objects other than tensors and plain "
                f"containers ({', '.join(sorted(set(found))) or 'see below'}). maevit never executes code "
                "from checkpoints; re-save the weights with safetensors or torch.save(model.state_dict()) "
                f"from a trusted environment. torch said: {msg.splitlines()[0]}"
            ) from e
        raise CheckpointError(
            f"could not read {path} as a PyTorch checkpoint ({type(e).__name__}: "
            f"{msg.splitlines()[0] if msg else ''}); the file may be truncated or not a checkpoint"
        ) from e


def _read_file(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # SafetensorError, OSError
            raise CheckpointError(
                f"could not read {path} as safetensors ({type(e).__name__}: {e}); the file may be truncated "
                "or not a safetensors file"
            ) from e
    if path.suffix in (".pth", ".pt", ".bin"):
        return _torch_load(path)
    raise CheckpointError(
        f"unsupported checkpoint file {path.name!r}: expected one of {', '.join(WEIGHT_SUFFIXES)} or a run directory"
    )


def _strip_prefixes(sd: Mapping[str, Any]) -> dict[str, Any]:
    # DDP wraps modules as 'module.' and torch.compile as '_orig_mod.' (also on submodules)
    out = {}
    for k, v in sd.items():
        while k.startswith("module."):
            k = k[len("module."):]
        out[k.replace("_orig_mod.", "")] = v
    return out


def _unwrap(obj: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a dict of tensors")
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    bad = {k: type(v).__name__ for k, v in obj.items() if not isinstance(v, torch.Tensor)}
    if bad:
        shown = ", ".join(f"{k!r} ({t})" for k, t in list(bad.items())[:6])
        raise CheckpointError(
            f"{where} is not a state dict: entries {shown} are not tensors; top-level keys: "
            f"{sorted(map(str, obj))[:10]}. Expected the weights at the top level or under 'model' / 'state_dict'"
        )
    return _strip_prefixes(obj)


def read_state_dict(src: str | os.PathLike | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Read weights from a file, a run / checkpoint directory or a mapping.

    Args:
        src: ``.safetensors``; ``.pth`` / ``.pt`` / ``.bin`` (read with
            ``weights_only=True``); a directory (see :func:`find_weights_file`);
            or an in-memory mapping. Weights under ``model`` / ``state_dict`` are
            unwrapped and ``module.`` / ``_orig_mod.`` prefixes removed.

    Returns:
        name -> tensor, keys in the source's own layout (see :func:`detect_format`).
    """
    if isinstance(src, Mapping):
        return _unwrap(src, "the given mapping")
    path = find_weights_file(src)
    return _unwrap(_read_file(path), str(path))


def _parse(meta: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, json.JSONDecodeError):
            out[k] = v
    return out


def _v1_header(meta: dict[str, Any]) -> dict[str, Any]:
    """Headers written before build arguments were recorded (format 1): plain-ViT facts only."""
    build = {k: meta[k] for k in ("img_size", "patch_size", "in_chans", "depth") if k in meta}
    build.update(meta.get("timm_kwargs") or {})
    name = meta.get("model_name")
    m = re.match(r"vit_(tiny|small|base|large|huge)_patch\d+", str(meta.get("arch", "")))
    if (not name or name == "unknown") and m:
        name = f"mae_vit_{m.group(1)}_patch{16 if m.group(1) != 'huge' else 14}"
    out = {"kind": "classifier" if "num_classes" in meta else "encoder", "model_name": name, "build_args": build}
    out.update({k: meta[k] for k in ("num_classes", "global_pool", "class_names", "mean", "std") if k in meta})
    return out


def _check_torch_file(path: Path) -> None:
    """Raise unless ``path`` can be a weights file: a torch zip archive or a (legacy) pickle."""
    if path.suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"unsupported checkpoint file {path.name!r}: expected one of "
                              f"{', '.join(WEIGHT_SUFFIXES)} or a run directory")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):
        raise CheckpointError(f"could not read {path} as a PyTorch checkpoint: it is neither a zip archive nor a "
                              f"pickle (it starts with {head!r}); the file may be truncated or not a checkpoint")


def read_header(src: str | os.PathLike | Mapping[str, Any] | None) -> dict[str, Any]:
    """What a file says about itself (empty for foreign files and in-memory dicts).

    Returns:
        ``{"kind", "model_name", "build_args", ...}``: ``kind`` is ``encoder``,
        ``mae`` or ``classifier``; ``mae`` holds the decoder arguments of MAE
        files; classifiers add ``num_classes``, ``global_pool``, ``class_names``,
        ``mean``, ``std``.
    """
    if src is None or isinstance(src, Mapping):
        return {}
    path = find_weights_file(src)
    state = path.parent / STATE_FILE  # a training checkpoint: the header is beside the weights
    if state.is_file():
        try:
            model = json.loads(state.read_text()).get("model")
        except (OSError, json.JSONDecodeError):
            model = None
        if isinstance(model, dict):
            return model
    folder = _folder_header(path)
    if path.suffix != ".safetensors":
        _check_torch_file(path)  # a text file or a truncated download: say so before asking for a model name
        return folder
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = _parse(f.metadata() or {})
    except Exception as e:  # SafetensorError, OSError
        raise CheckpointError(f"could not read {path} as safetensors ({type(e).__name__}: {e}); the file may be "
                              "truncated or not a safetensors file") from e
    if meta.get("format") == FORMAT:
        return {k: v for k, v in meta.items() if k not in ("format", "format_version")}
    if meta.get("format") == "maevit-encoder" or "arch" in meta:
        return _v1_header(meta)
    return folder


def _folder_header(weights: Path) -> dict[str, Any]:
    """The header kept in ``config.json`` beside ``weights`` (key :data:`FOLDER_HEADER_KEY`), or empty.

    Model folders (``maevit export --format timm|hf``) hold weights whose file the
    writing library owns (``save_pretrained`` writes its own safetensors metadata), so the
    header travels in the folder's ``config.json``, which timm and transformers both
    read without minding an extra key.
    """
    config = weights.parent / FOLDER_CONFIG
    if not config.is_file():
        return {}
    try:
        found = json.loads(config.read_text()).get(FOLDER_HEADER_KEY)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return {}
    return dict(found) if isinstance(found, dict) else {}


# --------------------------------------------------------------------------- layouts

_PUBLISHED_DECODER = ("mask_token", "decoder_pos_embed")
_PUBLISHED_RENAMES = (
    ("mask_token", "mask_token"), ("decoder_pos_embed", "pos_embed"), ("decoder_embed.", "embed."),
    ("decoder_blocks.", "blocks."), ("decoder_norm.", "norm."), ("decoder_pred.", "pred."),
)


def detect_format(sd: Mapping[str, Any]) -> str:
    """Name the layout of a state dict: one of :data:`FORMATS`."""
    from .hf_vitmae import is_hf_vitmae

    if is_hf_vitmae(sd):
        return "hf_vitmae"
    keys = list(sd)
    if any(k.startswith("encoder.") for k in keys) and any(k.startswith("decoder.") for k in keys):
        return "maevit_mae"
    if keys and all(k.startswith("encoder.") for k in keys):
        return "maevit_mae"  # an MAE state dict without its decoder
    if any(k in sd for k in _PUBLISHED_DECODER) or any(k.startswith("decoder_") for k in keys):
        return "mae_published"
    return "encoder"


def split_mae(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(encoder, decoder)`` state dicts of any layout; the decoder in ``MAEDecoder``
    names (empty for encoder-only sources)."""
    fmt = detect_format(sd)
    if fmt == "hf_vitmae":
        from .hf_vitmae import hf_to_maevit

        sd, fmt = hf_to_maevit(sd), "maevit_mae"
    if fmt == "maevit_mae":
        enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
        dec = {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}
        return enc, dec
    if fmt == "mae_published":
        enc, dec = {}, {}
        for k, v in sd.items():
            for old, new in _PUBLISHED_RENAMES:
                if k == old or (old.endswith(".") and k.startswith(old)):
                    dec[new + k[len(old):]] = v
                    break
            else:
                enc[k] = v
        return enc, dec
    return dict(sd), {}


def encoder_state_dict(src: str | os.PathLike | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The encoder part of any supported source, in its family's names (no filter applied)."""
    return split_mae(read_state_dict(src))[0]


# --------------------------------------------------------------------------- loading


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
    """What happened when weights were loaded. ``str(report)`` is a readable summary.

    Attributes:
        source: the path (or ``<state dict>``).
        format: the detected layout (:data:`FORMATS`).
        loaded: keys copied into the model.
        new: model keys initialised fresh on purpose (a new head, ``fc_norm``, an
            MAE decoder when the source is encoder-only).
        missing: other model keys absent from the source (only when not strict).
        unexpected: source keys the model has no place for (ignored).
        resized: keys resampled to the model's grid, ``key -> "old -> new"``.
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
            lines.append(f"  missing (left as initialised): {_compact(self.missing)}")
        if self.unexpected:
            lines.append(f"  ignored from checkpoint: {_compact(self.unexpected)}")
        return "\n".join(lines)


def _blocks(keys: Iterable[str]) -> int:
    return len({m.group(1) for k in keys if (m := re.match(r"(?:stages\.\d+\.)?blocks\.(\d+)\.", k))})


def _mismatch_advice(key: str, got: tuple, want: tuple, header: Mapping[str, Any]) -> str:
    named = f" (the file holds {header['model_name']}" + (
        f" with {header.get('build_args')})" if header.get("build_args") else ")") if header.get("model_name") else ""
    if key.endswith("patch_embed.proj.weight") and len(got) == 4 and len(want) == 4:
        return (f"the checkpoint embeds {got[2]}x{got[3]} patches of {got[1]} channels at width {got[0]}, the model "
                f"{want[2]}x{want[3]} of {want[1]} at width {want[0]}{named}: build the model with the checkpoint's "
                "patch_size / in_chans / size, or leave the model name out to take it from the file")
    return (f"the checkpoint is a different architecture{named}: leave the model name and size overrides out "
            "to rebuild it from the file, or pick the registered model it was trained as")


def load_encoder_weights(
    encoder: nn.Module,
    src: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = True,
    fresh: Iterable[str] = (),
    ignore: Iterable[str] = (),
) -> LoadReport:
    """Load the encoder part of any supported source into ``encoder`` (a bare encoder or a classifier).

    The family's ``checkpoint_filter`` maps foreign names and resizes position
    tables. Keys in ``fresh`` (prefixes; e.g. a new ``head.``) may be missing
    or of another shape: they keep their initialisation and are reported as new.
    Source keys under ``ignore`` prefixes (e.g. the final ``norm.`` a classifier
    with average pooling replaces) may have no place in the model.

    Raises:
        CheckpointError: a shape that cannot be adapted, or (``strict``) model
            weights the source lacks or source weights the model has no place
            for; the message names them and the likely fix.
    """
    raw = read_state_dict(src)
    fmt = detect_format(raw)
    header = read_header(src)
    sd = split_mae(raw)[0]
    filtered = encoder.checkpoint_filter(sd)
    own = encoder.state_dict()
    source = str(src) if not isinstance(src, Mapping) else "<state dict>"
    report = LoadReport(source, fmt)
    fresh = tuple(fresh)
    out: dict[str, torch.Tensor] = {}
    wrong: list[str] = []
    for k, v in filtered.items():
        if k not in own:
            report.unexpected.append(k)
            continue
        if k in sd and sd[k].shape != v.shape:
            report.resized[k] = f"{tuple(sd[k].shape)} -> {tuple(v.shape)}"
        if v.shape != own[k].shape:
            if k.startswith(fresh):
                report.unexpected.append(k)  # e.g. a head for other classes: a new one is used
            else:
                wrong.append(k)
            continue
        out[k] = v.to(own[k].dtype)
    if wrong:  # name the most telling mismatch: the patch embedding says patch size, channels and width
        k = next((w for w in wrong if "patch_embed" in w), wrong[0])
        got, want = tuple(filtered[k].shape), tuple(own[k].shape)
        raise CheckpointError(f"{k}: checkpoint shape {got} does not fit the model's {want}; "
                              f"{_mismatch_advice(k, got, want, header)}")
    lacking = []
    for k in own:
        if k in out:
            continue
        if k.startswith(fresh):
            report.new.append(k)
        elif strict:
            lacking.append(k)
        else:
            report.missing.append(k)
    extra = [k for k in report.unexpected if strict and not k.startswith(tuple(ignore) + fresh)]
    if lacking or extra:
        n_file, n_model = _blocks(sd), _blocks(own)
        depth = (f" The checkpoint has {n_file} blocks, the model {n_model}." if n_file != n_model else "")
        what = (f"lacks {len(lacking)} weights the model needs: {_compact(lacking)}" if lacking else
                f"has {len(extra)} weights the model has no place for: {_compact(extra)}")
        advice = _mismatch_advice("", (), (), header)
        raise CheckpointError(f"{source} ({fmt}) {what}.{depth} {advice[0].upper()}{advice[1:]}")
    encoder.load_state_dict(out, strict=False)
    report.loaded = sorted(out)
    return report


def load_mae_weights(
    model: nn.Module, src: str | os.PathLike | Mapping[str, Any], strict: bool = True
) -> LoadReport:
    """Load weights of any supported layout into a ``MaskedAutoencoder``.

    An encoder-only source (a published ``mae_pretrain_*.pth``, timm weights, an
    encoder export, an HF ``ViTMAEModel``) leaves the whole decoder as
    initialised: reported (a ``UserWarning`` and ``report.new``), not an error.

    Raises:
        CheckpointError: unreadable / unknown source, a shape mismatch (naming the
            key, both shapes and the likely fix), or (``strict``) missing or
            unexpected keys.
    """
    raw = read_state_dict(src)
    _, dec = split_mae(raw)
    report = load_encoder_weights(model.encoder, raw, strict=strict)
    report.source = str(src) if not isinstance(src, Mapping) else "<state dict>"
    own = model.decoder.state_dict()
    if "pos_embed" in dec and dec["pos_embed"].shape != own["pos_embed"].shape:
        # the decoder's table is fixed sin-cos: the model's own is the right one for its grid
        report.resized["decoder.pos_embed"] = f"{tuple(dec['pos_embed'].shape)} -> {tuple(own['pos_embed'].shape)}"
        dec = {**dec, "pos_embed": own["pos_embed"]}
    if not dec:
        report.new += [f"decoder.{k}" for k in own]
        warnings.warn(f"{report.source}: encoder-only weights; the decoder ({len(own)} tensors) keeps its "
                      "initialisation", UserWarning, stacklevel=2)
        return report
    for k, v in dec.items():
        if k in own and v.shape != own[k].shape:
            raise CheckpointError(
                f"decoder.{k}: checkpoint shape {tuple(v.shape)} does not fit the model's {tuple(own[k].shape)}; "
                "the decoder differs (decoder_embed_dim / decoder_depth, or the patch size / channels it predicts): "
                "leave the model arguments out to rebuild it from the file, or pass the checkpoint's"
            )
    missing = [k for k in own if k not in dec]
    unexpected = [k for k in dec if k not in own]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"strict load of {report.source} failed: decoder keys missing {_compact(missing) or 'none'}, "
            f"unexpected {_compact(unexpected) or 'none'}; the decoder depth differs: pass the checkpoint's "
            "decoder_depth (or leave the model arguments out to rebuild it from the file)"
        )
    model.decoder.load_state_dict({k: v for k, v in dec.items() if k in own}, strict=False)
    report.loaded += [f"decoder.{k}" for k in dec if k in own]
    report.missing += [f"decoder.{k}" for k in missing]
    report.unexpected += [f"decoder.{k}" for k in unexpected]
    return report


# --------------------------------------------------------------------------- writing


def header_of(module: nn.Module, kind: str, **extra: Any) -> dict[str, Any]:
    """The header of a file holding ``module`` (an encoder, a classifier or an MAE).

    Args:
        module: encoder / classifier (contract members) or ``MaskedAutoencoder``.
        kind: ``encoder`` | ``mae`` | ``classifier``.
        **extra: more JSON-serialisable facts (``class_names``, ``mean``, ``std``...).
    """
    encoder = getattr(module, "encoder", module)
    head: dict[str, Any] = {"kind": kind, "model_name": encoder.model_name, "build_args": dict(encoder.build_args)}
    if kind == "mae":
        head["mae"] = dict(module.mae_args)
    if kind == "classifier":
        pool = encoder.global_pool  # a string, or a timm CNN's pooling module
        head.update(num_classes=encoder.num_classes,
                    global_pool=pool if isinstance(pool, str) else getattr(pool, "pool_type", None))
    spec = encoder.timm_spec() if kind != "mae" else None
    if spec is not None:
        head["timm_model"], head["timm_kwargs"] = spec
    head.update(extra)
    return head


def save_weights(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, header: Mapping[str, Any]) -> Path:
    """Write ``state_dict`` as safetensors with ``header`` (atomic)."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **{k: json.dumps(v) for k, v in header.items()}}
    return save_safetensors_atomic(state_dict, path, meta)


def timm_load_line(header: Mapping[str, Any], path: str | os.PathLike) -> str | None:
    """The Python line that loads a written file into timm strictly, or None."""
    if not header.get("timm_model"):
        return None
    kwargs = ", ".join(f"{k}={v!r}" for k, v in (header.get("timm_kwargs") or {}).items())
    return (f"timm.create_model({header['timm_model']!r}, pretrained=False, {kwargs})"
            f".load_state_dict(safetensors.torch.load_file({str(path)!r}))")


def classifier_keys(encoder: nn.Module) -> set[str]:
    """Names of the classification layer's parameters (timm's ``get_classifier()``), which encoder files leave out.

    Only the classifier goes: parts of a head that timm keeps at ``num_classes=0``
    (Hiera's ``head.norm``, the MAE encoder norm) stay, so the file loads into
    timm's headless model strictly.
    """
    get = getattr(encoder, "get_classifier", None)
    if get is None:
        return {k for k in encoder.state_dict() if k.startswith("head.")}
    layers = get()
    layers = layers if isinstance(layers, (tuple, list)) else (layers,)
    ids = {id(p) for m in layers if isinstance(m, nn.Module) for p in m.parameters()}
    return {n for n, p in encoder.named_parameters() if id(p) in ids}


def export_encoder(model: nn.Module, path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor] | None = None,
                   **extra: Any) -> Path:
    """Write the encoder of ``model`` (an MAE, an encoder or a classifier) as safetensors.

    The head is not part of the encoder. Plain ViT exports load strictly into
    the timm model named in the header (:func:`timm_load_line`).

    Args:
        model: the module whose architecture the header describes.
        path: output ``.safetensors`` file.
        state_dict: the weights to write (default ``model``'s; pass a gathered
            state dict under FSDP).
    """
    sd, header = encoder_export(model, state_dict, **extra)
    return save_weights(sd, path, header)


def encoder_export(model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None,
                   **extra: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(weights, header)`` of the encoder of ``model`` without its classification layer: what
    :func:`export_encoder` writes, and what model folders (:mod:`maevit.export_folder`) hold."""
    encoder = getattr(model, "encoder", model)
    if state_dict is None:
        state_dict = encoder.state_dict()
    else:
        enc, _ = split_mae(state_dict)
        state_dict = enc
    head = classifier_keys(encoder)
    sd = {k: v for k, v in state_dict.items() if k not in head}
    header = header_of(encoder, "encoder", **extra)
    if header.get("timm_kwargs"):
        header["timm_kwargs"] = {**header["timm_kwargs"], "num_classes": 0}
    return sd, header
