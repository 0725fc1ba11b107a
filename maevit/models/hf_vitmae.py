"""Hugging Face ``ViTMAEForPreTraining`` / ``ViTMAEModel`` interop for plain-ViT MAE models.

Reads the three spellings found in the wild: the Hub files / transformers 4
module names (``vit.encoder.layer.{i}.attention.attention.query``),
transformers 5 module names (``layers.{i}.attention.q_proj``, ``mlp.fc1``) and
what transformers 5's ``save_pretrained`` writes (decoder layers as
``decoder.decoder_encoder.layer.{j}``); writes the Hub / transformers 5 names
(parity tests, side-by-side benchmarks). Same model, keys renamed, q / k / v
split where timm fuses them into ``qkv``.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from .errors import CheckpointError

_HF_PATCH = re.compile(r"^(vit\.)?embeddings\.patch_embeddings\.")


def is_hf_vitmae(sd: Mapping[str, Any]) -> bool:
    """True for a state dict in one of Hugging Face ViTMAE's layouts."""
    return any(k.startswith("decoder.decoder_") or _HF_PATCH.match(k) for k in sd)


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


def hf_to_maevit(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ViTMAE names -> maevit MAE names (``encoder.*`` in timm names, ``decoder.*``)."""
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
        sd: maevit MAE names (``encoder.*`` / ``decoder.*``), or Hugging Face names (returned re-spelt).
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
    for k, v in _as_maevit(sd).items():
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


def _as_maevit(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return hf_to_maevit(sd) if is_hf_vitmae(sd) else dict(sd)
