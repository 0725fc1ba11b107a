"""Weights interop: read any supported checkpoint, convert key layouts, load, export.

Supported layouts (:func:`detect_format` names them):

- ``maevit_mae``: this package's ``MaskedAutoencoder`` (``encoder.*`` in timm
  names, ``decoder.{embed,mask_token,pos_embed,blocks,norm,pred}.*``). A dict
  with ``encoder.*`` only is the encoder-only variant.
- ``timm_vit``: a timm ``VisionTransformer`` / maevit encoder export (``cls_token``,
  ``pos_embed``, ``patch_embed.proj.*``, ``blocks.{i}.*``, ``norm.*``). The
  published encoder-only MAE files (``mae_pretrain_vit_*.pth``) have exactly
  these keys, so they are detected as ``timm_vit``; both are encoder-only.
- ``mae_published``: the full published MAE checkpoints (timm encoder names plus
  ``mask_token``, ``decoder_pos_embed``, ``decoder_embed.*``, ``decoder_blocks.*``,
  ``decoder_norm.*``, ``decoder_pred.*``).
- ``hf_vitmae``: Hugging Face ``ViTMAEForPreTraining`` (``vit.*`` + ``decoder.*``)
  or ``ViTMAEModel`` (no ``vit.`` prefix, encoder-only), in any of the three
  spellings found in the wild: the Hub files / transformers 4 module names
  (``encoder.layer.{i}.attention.attention.query``), transformers 5 module names
  (``layers.{i}.attention.q_proj``, ``mlp.fc1``), and what transformers 5's
  ``save_pretrained`` writes (decoder layers as ``decoder.decoder_encoder.layer.{j}``).

Everything is read with ``weights_only=True`` (or safetensors): no checkpoint can
run code here.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

FORMATS = ("maevit_mae", "timm_vit", "mae_published", "hf_vitmae")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
EXPORT_FORMAT = "maevit-encoder"
EXPORT_FORMAT_VERSION = "1"
# files in a checkpoint directory that hold training state, not model weights (Accelerate's
# names and maevit.train.runs' generators_<rank>.safetensors)
_STATE_FILE_PREFIXES = (
    "optimizer", "scheduler", "scaler", "random_states", "sampler", "custom_checkpoint", "generators",
)


class CheckpointError(ValueError):
    """A checkpoint could not be read, recognised or loaded; the message says why and what to do."""


# --------------------------------------------------------------------------- writing


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], Any]) -> Path:
    """Write ``path`` so that readers see either the old file or the complete new one.

    ``write_fn(tmp)`` writes ``path.tmp-<pid>`` (a file, or a directory for
    multi-file checkpoints); we fsync it, ``os.replace`` it onto ``path`` and
    fsync the parent directory, so a crash mid-write never leaves a truncated
    checkpoint under the real name. A directory can only replace a missing or
    empty directory (POSIX ``rename``).

    Args:
        path: final location.
        write_fn: called with the temporary path; must create it.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write_fn(tmp)
        if not tmp.exists():
            raise FileNotFoundError(f"atomic_write: write_fn did not create {tmp}")
        for f in [tmp] if tmp.is_file() else sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    # makes the rename itself durable; not possible on every OS / filesystem (e.g. Windows)
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_file_atomic(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` through :func:`atomic_write`.

    Args:
        tensors: name -> tensor; copied to contiguous CPU tensors first (safetensors
            refuses views and shared storage).
        path: destination ``.safetensors`` file.
        metadata: string -> string, stored in the file header.
    """
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=meta))


# --------------------------------------------------------------------------- reading


def find_weights_file(path: str | os.PathLike) -> Path:
    """Resolve a file, a checkpoint directory or a run directory to one weights file.

    Search order in a directory (first hit wins):

    1. ``checkpoints/latest`` (a directory, a symlink to one, or a text file
       naming one) inside a run directory;
    2. the ``checkpoints/`` entry with the largest number in its name
       (``step-000200`` beats ``step-000100``);
    3. model files in the directory itself: ``model.safetensors``, other
       ``*.safetensors`` (sorted) except ``encoder.safetensors``, then
       ``pytorch_model.bin`` / ``model.pth`` / ``model.pt`` / other ``.pth`` ``.pt``
       ``.bin`` (training-state files such as ``optimizer.bin`` are skipped);
    4. ``encoder.safetensors`` (encoder-only: the decoder stays as initialised).

    Args:
        path: a weights file or a directory.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt_root = path / "checkpoints"
    if ckpt_root.is_dir():
        latest = ckpt_root / "latest"
        if latest.is_file() and latest.suffix not in WEIGHT_SUFFIXES:
            target = ckpt_root / latest.read_text().strip()  # a pointer file naming the latest
            if not target.exists():
                raise CheckpointError(f"{latest} names {target.name!r}, which does not exist in {ckpt_root}")
            latest = target
        if latest.exists():
            return find_weights_file(latest)
        # skip half-written entries (atomic_write's '.tmp-<pid>') and hidden files
        numbered = [p for p in ckpt_root.iterdir()
                    if re.search(r"\d+", p.name) and ".tmp" not in p.name and not p.name.startswith(".")]
        numbered = [p for p in numbered if p.is_dir() or p.suffix in WEIGHT_SUFFIXES]
        if numbered:
            best = max(numbered, key=lambda p: (int(re.findall(r"\d+", p.name)[-1]), p.stat().st_mtime))
            return find_weights_file(best)
    files = [p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
    files = [p for p in files if not p.name.startswith(_STATE_FILE_PREFIXES) and ".tmp-" not in p.name]

    def rank(p: Path) -> tuple:
        if p.name == "model.safetensors":
            return (0, p.name)
        if p.name == "encoder.safetensors":
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


def _torch_load(path: Path) -> Any:
    # The published MAE checkpoints store the training arguments as an
    # argparse.Namespace under 'args'. weights_only=True refuses every class that
    # is not allow-listed; Namespace is a plain attribute bag whose unpickling runs
    # no user code, so allowing exactly that one class keeps loading safe.
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
            f"could not read {path} as a PyTorch checkpoint ({type(e).__name__}: {msg.splitlines()[0] if msg else ''}); "
            "the file may be truncated or not a checkpoint"
        ) from e


def _read_file(path: Path) -> Any:
    if path.suffix == ".safetensors":
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


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a ``.safetensors`` header (empty for other files)."""
    path = find_weights_file(path)
    if path.suffix != ".safetensors":
        return {}
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


# --------------------------------------------------------------------------- layouts

_HF_PATCH = re.compile(r"^(vit\.)?embeddings\.patch_embeddings\.")
_PUBLISHED_DECODER = ("mask_token", "decoder_pos_embed")


def detect_format(sd: Mapping[str, Any]) -> str:
    """Name the key layout of a state dict: one of :data:`FORMATS`.

    Args:
        sd: a state dict as returned by :func:`read_state_dict`.
    """
    keys = list(sd)
    if any(k.startswith("decoder.decoder_") or _HF_PATCH.match(k) for k in keys):
        return "hf_vitmae"
    if "encoder.patch_embed.proj.weight" in sd:
        return "maevit_mae"
    if "patch_embed.proj.weight" in sd:
        if any(k in sd for k in _PUBLISHED_DECODER) or any(k.startswith("decoder_") for k in keys):
            return "mae_published"
        return "timm_vit"
    raise CheckpointError(
        f"unrecognised checkpoint layout ({len(keys)} tensors; first keys: {keys[:8]}). Supported: "
        "maevit MAE (encoder.* / decoder.*), timm ViT / maevit encoder export (patch_embed.proj.weight, "
        "blocks.N.*), published MAE (timm names + decoder_*), Hugging Face ViTMAE (vit.embeddings.*, "
        "decoder.decoder_*)"
    )


def is_encoder_only(sd: Mapping[str, Any]) -> bool:
    """True when a state dict in any supported layout carries no decoder weights."""
    return not any(k.startswith("decoder.") for k in to_maevit_mae_keys(sd))


def _published_to_maevit(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renames = (
        ("mask_token", "decoder.mask_token"),
        ("decoder_pos_embed", "decoder.pos_embed"),
        ("decoder_embed.", "decoder.embed."),
        ("decoder_blocks.", "decoder.blocks."),
        ("decoder_norm.", "decoder.norm."),
        ("decoder_pred.", "decoder.pred."),
    )
    out = {}
    for k, v in sd.items():
        for old, new in renames:
            if k == old or (old.endswith(".") and k.startswith(old)):
                out[new + k[len(old):]] = v
                break
        else:
            out["encoder." + k] = v
    return out


# HF per-layer module path -> timm Block module path; q / k / v are fused below
_HF_LAYER = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",  # transformers 4 / Hub files
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "attention.o_proj": "attn.proj",  # transformers 5
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_QKV = {
    "attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2,
    "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2,
}
_HF_FLAT = (
    (re.compile(r"^(?:vit\.)?embeddings\.cls_token$"), "encoder.cls_token"),
    (re.compile(r"^(?:vit\.)?embeddings\.position_embeddings$"), "encoder.pos_embed"),
    (re.compile(r"^(?:vit\.)?embeddings\.patch_embeddings\.projection\.(weight|bias)$"), r"encoder.patch_embed.proj.\1"),
    (re.compile(r"^(?:vit\.)?layernorm\.(weight|bias)$"), r"encoder.norm.\1"),
    (re.compile(r"^decoder\.mask_token$"), "decoder.mask_token"),
    (re.compile(r"^decoder\.decoder_pos_embed$"), "decoder.pos_embed"),
    (re.compile(r"^decoder\.decoder_embed\.(weight|bias)$"), r"decoder.embed.\1"),
    (re.compile(r"^decoder\.decoder_norm\.(weight|bias)$"), r"decoder.norm.\1"),
    (re.compile(r"^decoder\.decoder_pred\.(weight|bias)$"), r"decoder.pred.\1"),
)
# encoder layers: (vit.)encoder.layer.i / (vit.)layers.i ; decoder layers: decoder_layers.j, or
# decoder_encoder.layer.j as written by transformers 5's save_pretrained (its reversed rename)
_HF_BLOCK = re.compile(
    r"^(?:(?:vit\.)?(?:encoder\.layer|layers)\.(?P<e>\d+)|decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(?P<d>\d+))"
    r"\.(?P<mod>.+)\.(?P<param>weight|bias)$"
)


def _hf_to_maevit(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, list] = {}
    unknown = []
    for k, v in sd.items():
        for pattern, repl in _HF_FLAT:
            if pattern.match(k):
                out[pattern.sub(repl, k)] = v
                break
        else:
            m = _HF_BLOCK.match(k)
            mod = m and m["mod"]
            if m is None or (mod not in _HF_LAYER and mod not in _HF_QKV):
                unknown.append(k)
                continue
            block = f"encoder.blocks.{m['e']}" if m["e"] is not None else f"decoder.blocks.{m['d']}"
            if mod in _HF_LAYER:
                out[f"{block}.{_HF_LAYER[mod]}.{m['param']}"] = v
            else:
                qkv.setdefault(f"{block}.attn.qkv.{m['param']}", [None, None, None])[_HF_QKV[mod]] = v
    if unknown:
        raise CheckpointError(f"Hugging Face ViTMAE checkpoint has keys maevit cannot map: {unknown[:8]}")
    for name, parts in qkv.items():
        if any(p is None for p in parts):
            missing = [n for n, p in zip("qkv", parts) if p is None]
            raise CheckpointError(f"Hugging Face checkpoint lacks the {'/'.join(missing)} projection for {name}")
        out[name] = torch.cat(parts, dim=0)  # timm's fused qkv: rows [q; k; v]
    return out


def to_maevit_mae_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert any supported layout to maevit's MAE layout (``encoder.*``, ``decoder.*``).

    Encoder-only sources give ``encoder.*`` keys only. Tensors are not copied
    except Hugging Face q / k / v, which are concatenated into ``qkv``.

    Args:
        sd: a state dict in any of :data:`FORMATS`.
    """
    fmt = detect_format(sd)
    if fmt == "maevit_mae":
        return dict(sd)
    if fmt == "timm_vit":
        return {"encoder." + k: v for k, v in sd.items()}
    if fmt == "mae_published":
        return _published_to_maevit(sd)
    return _hf_to_maevit(sd)


def to_timm_encoder_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder of any supported layout, in timm ``VisionTransformer`` names.

    Args:
        sd: a state dict in any of :data:`FORMATS` (decoder keys are dropped).
    """
    return {k[len("encoder."):]: v for k, v in to_maevit_mae_keys(sd).items() if k.startswith("encoder.")}


def hf_vitmae_config(model: Any, attn_implementation: str = "sdpa") -> Any:
    """A ``transformers.ViTMAEConfig`` describing the same architecture as a maevit MAE.

    With :func:`to_hf_vitmae_keys` this builds a Hugging Face twin of a model (parity
    tests, side-by-side benchmarks). ``layer_norm_eps`` is set to MAE's 1e-6 (HF's
    default is 1e-12). HF builds its position tables for a square grid only.
    """
    from transformers import ViTMAEConfig

    enc, dec = model.encoder, model.decoder
    h, _ = enc.patch_embed.img_size
    return ViTMAEConfig(
        hidden_size=enc.embed_dim, num_hidden_layers=len(enc.blocks), num_attention_heads=enc.blocks[0].attn.num_heads,
        intermediate_size=enc.blocks[0].mlp.fc1.out_features, decoder_hidden_size=dec.embed.out_features,
        decoder_num_hidden_layers=len(dec.blocks), decoder_num_attention_heads=dec.blocks[0].attn.num_heads,
        decoder_intermediate_size=dec.blocks[0].mlp.fc1.out_features, image_size=h, patch_size=enc.patch_size,
        num_channels=enc.in_chans, mask_ratio=model.mask_ratio, norm_pix_loss=model.norm_pix_loss,
        layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True, attn_implementation=attn_implementation,
    )


def to_hf_vitmae_keys(sd: Mapping[str, torch.Tensor], layout: str = "hub") -> dict[str, torch.Tensor]:
    """Convert a state dict to Hugging Face ``ViTMAEForPreTraining`` names.

    Args:
        sd: any supported layout (converted through :func:`to_maevit_mae_keys`).
        layout: ``"hub"``: the names of the files on the Hugging Face Hub and of
            transformers 4 (``vit.encoder.layer.{i}.attention.attention.query``);
            transformers 5 renames them itself in ``from_pretrained``.
            ``"transformers5"``: transformers 5 module names
            (``vit.layers.{i}.attention.q_proj``), for ``model.load_state_dict``.
    """
    if layout not in ("hub", "transformers5"):
        raise ValueError(f"layout must be 'hub' or 'transformers5', got {layout!r}")
    hub = layout == "hub"
    names = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.output.dense" if hub else "attention.o_proj",
        "mlp.fc1": "intermediate.dense" if hub else "mlp.fc1",
        "mlp.fc2": "output.dense" if hub else "mlp.fc2",
    }
    qkv_names = (
        ("attention.attention.query", "attention.attention.key", "attention.attention.value")
        if hub
        else ("attention.q_proj", "attention.k_proj", "attention.v_proj")
    )
    flat = {
        "encoder.cls_token": "vit.embeddings.cls_token",
        "encoder.pos_embed": "vit.embeddings.position_embeddings",
        "encoder.patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
        "encoder.patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
        "encoder.norm.weight": "vit.layernorm.weight",
        "encoder.norm.bias": "vit.layernorm.bias",
        "decoder.mask_token": "decoder.mask_token",
        "decoder.pos_embed": "decoder.decoder_pos_embed",
    }
    block = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.(.+)\.(weight|bias)$")
    out: dict[str, torch.Tensor] = {}
    for k, v in to_maevit_mae_keys(sd).items():
        if k in flat:
            out[flat[k]] = v
            continue
        m = re.match(r"^decoder\.(embed|norm|pred)\.(weight|bias)$", k)
        if m:
            out[f"decoder.decoder_{m[1]}.{m[2]}"] = v
            continue
        m = block.match(k)
        if m is None or (m[3] not in names and m[3] != "attn.qkv"):
            raise CheckpointError(f"no Hugging Face ViTMAE equivalent for {k!r}")
        prefix = (f"vit.encoder.layer.{m[2]}" if hub else f"vit.layers.{m[2]}") if m[1] == "encoder" else f"decoder.decoder_layers.{m[2]}"
        if m[3] == "attn.qkv":
            for name, part in zip(qkv_names, v.chunk(3, dim=0)):
                out[f"{prefix}.{name}.{m[4]}"] = part
        else:
            out[f"{prefix}.{names[m[3]]}.{m[4]}"] = v
    return out


# --------------------------------------------------------------------------- loading


def _summarize_keys(keys: Iterable[str], limit: int = 8) -> str:
    # group 'decoder.blocks.3.attn.qkv.weight' -> 'decoder.blocks.*' so a missing decoder is one line
    groups: dict[str, list[str]] = {}
    for k in keys:
        parts = k.split(".")
        groups.setdefault(".".join(parts[:2]) if len(parts) > 2 else k, []).append(k)
    items = [ks[0] if len(ks) == 1 else f"{g}.* ({len(ks)})" for g, ks in groups.items()]
    more = f", ... {len(items) - limit} more groups" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


@dataclass
class LoadReport:
    """What :func:`load_mae_weights` did. ``str(report)`` is a readable summary.

    Attributes:
        source: where the weights came from.
        source_format: one of :data:`FORMATS`.
        loaded: number of tensors copied into the model.
        missing: model keys the checkpoint did not provide (left as initialised).
        unexpected: checkpoint keys the model has no place for (ignored).
        encoder_only: the checkpoint had no decoder weights.
    """

    source: str
    source_format: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    encoder_only: bool = False

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors from {self.source} ({self.source_format}"
                 f"{', encoder-only' if self.encoder_only else ''})"]
        if self.missing:
            lines.append(f"missing (left as initialised): {_summarize_keys(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected (ignored): {_summarize_keys(self.unexpected)}")
        return "\n".join(lines)


def _shape_hint(key: str, ckpt: tuple, model: tuple) -> str:
    if key.endswith("pos_embed"):
        n = ckpt[1] - 1
        side = int(round(n**0.5))
        grid = f"a {side}x{side} patch grid" if side * side == n else f"{n} patches"
        return (f"the checkpoint's position table is for {grid}, the model's for {model[1] - 1} patches: build the "
                "model with the checkpoint's img_size and patch_size (e.g. create_mae(name, img_size=..., patch_size=...))")
    if key.endswith("patch_embed.proj.weight"):
        return (f"the checkpoint uses {ckpt[2]}x{ckpt[3]} patches over {ckpt[1]} channels and width {ckpt[0]}; "
                f"the model {model[2]}x{model[3]} over {model[1]} channels, width {model[0]}: pass matching "
                "patch_size / in_chans or pick the matching model size")
    if key.startswith("decoder.pred"):
        return "the decoder predicts patch_size**2 * in_chans values per patch: pass the checkpoint's patch_size / in_chans"
    return "the checkpoint is a different model size (embed_dim / mlp_ratio / decoder width): pick the matching registered name or overrides"


def load_mae_weights(
    model: nn.Module, src: str | os.PathLike | Mapping[str, Any], strict: bool = True
) -> LoadReport:
    """Load weights of any supported layout into a ``MaskedAutoencoder`` (or a bare encoder).

    Args:
        model: a ``MaskedAutoencoder`` (has ``encoder`` and ``decoder``) or a
            timm-named encoder such as ``ViTEncoder``.
        src: anything :func:`read_state_dict` accepts.
        strict: fail on unexpected keys and on missing keys. One exception: an
            encoder-only source (published ``mae_pretrain_*.pth``, a timm ViT, an
            encoder export, an HF ``ViTMAEModel``) may leave the *whole* decoder
            as initialised; that is reported (a ``UserWarning`` and the report),
            not an error. With ``strict=False`` whatever matches is loaded.

    Returns:
        a :class:`LoadReport`.

    Raises:
        CheckpointError: unreadable / unknown source, a shape mismatch (naming the
            key, both shapes and the likely fix), or strict-mode key mismatches.
    """
    sd = read_state_dict(src)
    fmt = detect_format(sd)
    is_mae = hasattr(model, "encoder") and hasattr(model, "decoder")
    sd = to_maevit_mae_keys(sd) if is_mae else to_timm_encoder_keys(sd)
    encoder_only = not any(k.startswith("decoder.") for k in sd) if is_mae else False
    target = model.state_dict()
    for k, v in sd.items():
        if k in target and tuple(v.shape) != tuple(target[k].shape):
            raise CheckpointError(
                f"shape mismatch for {k}: checkpoint {tuple(v.shape)}, model {tuple(target[k].shape)}; "
                f"{_shape_hint(k, tuple(v.shape), tuple(target[k].shape))}"
            )
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    source = src if not isinstance(src, Mapping) else "<state dict>"
    report = LoadReport(str(source), fmt, len(sd) - len(unexpected), missing, unexpected, encoder_only)
    decoder_only_missing = encoder_only and all(k.startswith("decoder.") for k in missing)
    if strict and (unexpected or (missing and not decoder_only_missing)):
        depth = lambda keys, part: len({k.split(".")[2] for k in keys if k.startswith(f"{part}.blocks.")})  # noqa: E731
        hint = ""
        if is_mae and depth(sd, "encoder") != depth(target, "encoder"):
            hint = (f" The checkpoint has {depth(sd, 'encoder')} encoder blocks, the model {depth(target, 'encoder')}: "
                    "pick the matching model or depth=.")
        raise CheckpointError(f"strict load of {source} failed.\n{report}{hint}\n"
                              "Use strict=False to load the matching tensors only.")
    model.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=False)
    if encoder_only and missing:
        warnings.warn(f"{source}: encoder-only weights; the decoder ({len(missing)} tensors) keeps its "
                      "initialisation", UserWarning, stacklevel=2)
    return report


# --------------------------------------------------------------------------- export


def _encoder_facts(enc: Mapping[str, torch.Tensor], img_size: tuple[int, int] | None) -> dict[str, Any]:
    w = enc["patch_embed.proj.weight"]  # [D, C, p, p]
    n = enc["pos_embed"].shape[1] - 1
    p = int(w.shape[-1])
    if img_size is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise CheckpointError(f"position table of {n} patches is not a square grid: pass img_size=(H, W)")
        img_size = (side * p, side * p)
    depth = len({k.split(".")[1] for k in enc if k.startswith("blocks.")})
    return dict(img_size=list(img_size), patch_size=p, in_chans=int(w.shape[1]), embed_dim=int(w.shape[0]), depth=depth)


def export_encoder(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
    path: str | os.PathLike,
    *,
    model_name: str | None = None,
    img_size: int | tuple[int, int] | None = None,
) -> Path:
    """Write the encoder as timm-named safetensors (atomic).

    The file loads with ``timm.create_model('vit_base_patch16_224', num_classes=0,
    pretrained=False).load_state_dict(load_file(path), strict=True)`` (for other
    image sizes pass ``img_size=`` to timm). The header metadata records
    ``format``, ``format_version``, ``model_name``, ``timm_model``, ``img_size``
    (JSON ``[H, W]``), ``patch_size``, ``in_chans``, ``embed_dim``, ``depth``.

    Args:
        model_or_state_dict: a ``MaskedAutoencoder``, an encoder, a state dict or a
            path in any supported layout.
        path: output ``.safetensors`` file.
        model_name: registered name to record; defaults to ``model.model_name``
            or a guess from the width.
        img_size: training image size; defaults to the model's, or the square
            grid implied by the position table.
    """
    from maevit.models.patch import to_2tuple_size
    from maevit.models.vit import VIT_SIZES, timm_vit_name

    size = None if img_size is None else to_2tuple_size(img_size)
    if isinstance(model_or_state_dict, nn.Module):
        module = model_or_state_dict
        model_name = model_name or getattr(module, "model_name", None)
        enc_module = getattr(module, "encoder", module)
        if size is None and hasattr(enc_module, "patch_embed"):
            size = tuple(int(s) for s in enc_module.patch_embed.img_size)
        enc = enc_module.state_dict()
    else:
        enc = to_timm_encoder_keys(read_state_dict(model_or_state_dict))
    # a classifier head is not part of the encoder; timm's num_classes=0 model has none
    enc = {k: v for k, v in enc.items() if not k.startswith("head.")}
    facts = _encoder_facts(enc, size)
    width_names = {v["embed_dim"]: k for k, v in VIT_SIZES.items()}
    vit_size = width_names.get(facts["embed_dim"])
    if model_name is None and vit_size:
        model_name = f"mae_vit_{vit_size}_patch{facts['patch_size']}"
    meta = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "model_name": model_name or "unknown",
        "timm_model": timm_vit_name(vit_size, facts["patch_size"], tuple(facts["img_size"])) if vit_size else "unknown",
        **{k: json.dumps(v) for k, v in facts.items()},
    }
    return save_file_atomic(enc, path, meta)


def main_export(argv: list[str] | None = None) -> int:
    """``maevit export SRC OUT.safetensors [--model NAME] [--img-size H[xW]]``."""
    parser = argparse.ArgumentParser(
        prog="maevit export",
        description="Export the encoder of any supported checkpoint (maevit run dir / file, published MAE "
        ".pth, Hugging Face ViTMAE, timm) as timm-named safetensors.",
    )
    parser.add_argument("src", help="checkpoint file or run directory")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument("--model", default=None, help="registered MAE name to record and check the width against")
    parser.add_argument("--img-size", default=None, help="training image size, H or HxW (default: from the weights)")
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        parser.error(f"output must end in .safetensors, got {args.out!r}")
    try:
        sd = read_state_dict(args.src)
        enc = to_timm_encoder_keys(sd)
        img_size = None
        if args.img_size:
            img_size = tuple(int(s) for s in args.img_size.lower().split("x"))
            img_size = img_size * 2 if len(img_size) == 1 else img_size
        elif (meta := read_metadata(args.src)).get("img_size"):
            img_size = tuple(json.loads(meta["img_size"]))
        if args.model:
            from maevit.models.registry import mae_model_config

            cfg = mae_model_config(args.model)
            width = enc["patch_embed.proj.weight"].shape[0]
            if cfg["embed_dim"] != width:
                raise CheckpointError(f"{args.src} has width {width} but {args.model} is {cfg['embed_dim']} wide; "
                                      "pick the matching --model or leave it out")
        out = export_encoder(enc, args.out, model_name=args.model, img_size=img_size)
    except (CheckpointError, FileNotFoundError, KeyError) as e:
        print(f"maevit export: error: {e}")
        return 2
    print(f"wrote {out} ({len(enc)} tensors; metadata: {read_metadata(out)})")
    return 0
