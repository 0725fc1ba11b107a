"""Weights interop: read / convert / load / export across maevit, timm, published MAE and HF layouts."""
import argparse
import os

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from maevit import create_mae
from maevit.export import main as main_export
from maevit.fileio import atomic_write
from maevit.models.hf_vitmae import hf_to_maevit, to_hf_vitmae_keys
from maevit.models.weights import (
    CheckpointError,
    detect_format,
    export_encoder,
    find_weights_file,
    load_mae_weights,
    read_header,
    read_state_dict,
    split_mae,
)

SMALL = dict(img_size=32, patch_size=8, depth=2, decoder_depth=1)


def _model(**kw):
    return create_mae("mae_vit_tiny_patch16", **{**SMALL, **kw})


def _perturbed(**kw):
    # MAE init zeroes biases and sets LayerNorm to (1, 0): a mapping that swaps two biases would
    # go unnoticed, so give every tensor (fixed tables included) distinct random values
    model = _model(**kw)
    with torch.no_grad():
        for p in model.state_dict().values():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _published_layout(sd):
    """Rename a maevit MAE state dict into the published MAE key layout (written out by hand)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("encoder."):
            out[k[len("encoder."):]] = v
        elif k == "decoder.mask_token":
            out["mask_token"] = v
        elif k == "decoder.pos_embed":
            out["decoder_pos_embed"] = v
        else:
            sub = k[len("decoder."):]
            head, rest = sub.split(".", 1)
            out[f"decoder_{head}.{rest}"] = v
    return out


def _save_published(path, model_sd):
    torch.save(
        {
            "model": model_sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "params": [0, 1]}]},
            "epoch": 799,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0},
            "args": argparse.Namespace(model="mae_vit_tiny_patch16", mask_ratio=0.75, norm_pix_loss=True, blr=1.5e-4),
        },
        path,
    )


def _save_sd(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_export_loads_into_timm_strictly_with_same_features(tmp_path):
    model = create_mae("mae_vit_tiny_patch16")  # registered size at 224 px: the exact timm name
    path = export_encoder(model, tmp_path / "enc.safetensors")
    meta = read_header(path)
    assert meta["timm_model"] == "vit_tiny_patch16_224" and meta["model_name"] == "mae_vit_tiny_patch16"
    assert (meta["build_args"]["img_size"], meta["build_args"]["patch_size"]) == (224, 16)
    vit = timm.create_model(meta["timm_model"], pretrained=False, **meta["timm_kwargs"])
    vit.load_state_dict(load_file(path), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(x), model.encoder.forward_features(x), atol=1e-6)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_export_read_back_loads_encoder_only(tmp_path):
    src = _perturbed()
    export_encoder(src, tmp_path / "enc.safetensors")
    sd = read_state_dict(tmp_path / "enc.safetensors")
    assert detect_format(sd) == "encoder"
    assert torch.equal(sd["blocks.1.attn.qkv.bias"], src.encoder.blocks[1].attn.qkv.bias)
    dst = _model()
    decoder_before = {k: v.clone() for k, v in dst.decoder.state_dict().items()}
    with pytest.warns(UserWarning, match="encoder-only"):
        report = load_mae_weights(dst, tmp_path / "enc.safetensors")
    assert report.format == "encoder" and not report.unexpected and not report.missing
    assert report.new and all(k.startswith("decoder.") for k in report.new)
    assert "initialised fresh: decoder.blocks.0" in str(report)
    _assert_same_state(dst.encoder, src.encoder)
    assert all(torch.equal(v, decoder_before[k]) for k, v in dst.decoder.state_dict().items())


def test_published_full_checkpoint_gives_identical_model(tmp_path):
    src = _perturbed()
    path = tmp_path / "checkpoint-799.pth"
    _save_published(path, _published_layout(src.state_dict()))
    sd = read_state_dict(path)
    assert detect_format(sd) == "mae_published" and "decoder_blocks.0.attn.qkv.weight" in sd
    loaded = create_mae("mae_vit_tiny_patch16", checkpoint=path, **SMALL)
    _assert_same_state(loaded, src)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        a, b = src(imgs, noise=noise), loaded(imgs, noise=noise)
    assert torch.equal(a.pred, b.pred) and torch.equal(a.loss, b.loss)


def test_published_encoder_only_file(tmp_path):
    src = _perturbed()
    enc = {k: v for k, v in _published_layout(src.state_dict()).items() if not k.startswith(("decoder", "mask_token"))}
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    _save_published(path, enc)
    with pytest.warns(UserWarning, match="decoder"):
        loaded = create_mae("mae_vit_tiny_patch16", checkpoint=path, **SMALL)
    _assert_same_state(loaded.encoder, src.encoder)
    # only a fully missing decoder is tolerated by strict loading, not a missing encoder tensor
    del enc["norm.weight"]
    _save_published(path, enc)
    with pytest.raises(CheckpointError, match="lacks 1 weights the model needs: norm.weight"):
        load_mae_weights(_model(), path)
    with pytest.warns(UserWarning, match="encoder-only"):
        assert load_mae_weights(_model(), path, strict=False).missing == ["norm.weight"]


def test_hf_vitmae_to_maevit_and_back(tmp_path):
    import transformers  # a test dependency: missing is an error (see conftest.py), not a skip
    cfg = transformers.ViTMAEConfig(
        hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768,
        decoder_hidden_size=256, decoder_num_hidden_layers=1, decoder_num_attention_heads=8,
        decoder_intermediate_size=1024, image_size=32, patch_size=8, layer_norm_eps=1e-6,
    )
    hf = transformers.ViTMAEForPreTraining(cfg)
    with torch.no_grad():
        for p in hf.state_dict().values():
            p.copy_(torch.randn_like(p))
    hf_sd = hf.state_dict()
    assert detect_format(hf_sd) == "hf_vitmae"
    model = create_mae("mae_vit_tiny_patch16", checkpoint=hf_sd, **SMALL)
    attn = hf.vit.layers[1].attention
    qkv = model.encoder.blocks[1].attn.qkv
    assert torch.equal(qkv.weight, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert torch.equal(qkv.bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
    assert torch.equal(model.decoder.blocks[0].mlp.fc2.weight, hf.decoder.decoder_layers[0].mlp.fc2.weight)
    assert torch.equal(model.encoder.pos_embed, hf.vit.embeddings.position_embeddings)
    # reverse: exactly the keys of the installed transformers, and the Hub layout round-trips
    back = to_hf_vitmae_keys(model.state_dict(), layout="transformers5")
    assert back.keys() == hf_sd.keys() and all(torch.equal(back[k], hf_sd[k]) for k in back)
    hub = to_hf_vitmae_keys(model.state_dict(), layout="hub")
    assert "vit.encoder.layer.1.attention.attention.query.weight" in hub
    assert "decoder.decoder_layers.0.intermediate.dense.bias" in hub
    assert hf_to_maevit(hub).keys() == model.state_dict().keys()
    # what transformers 5's save_pretrained writes (decoder layers as decoder.decoder_encoder.layer.N)
    hf.save_pretrained(tmp_path / "hf")
    from_dir = create_mae("mae_vit_tiny_patch16", checkpoint=tmp_path / "hf", **SMALL)
    _assert_same_state(from_dir, model)
    # ViTMAEModel (no 'vit.' prefix) is encoder-only
    enc = {k[len("vit."):]: v for k, v in hf_sd.items() if k.startswith("vit.")}
    assert torch.equal(split_mae(enc)[0]["blocks.0.mlp.fc1.bias"], hf.vit.layers[0].mlp.fc1.bias)


@pytest.mark.parametrize("suffix,payload", [
    (".safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"),
    (".pth", b"this is not a checkpoint"),
    (".bin", b""),
])
def test_corrupt_files_give_clear_errors(tmp_path, suffix, payload):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError, match=f"could not read .*bad{suffix}"):
        read_state_dict(path)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    _save_sd(_model(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated"):
        create_mae("mae_vit_tiny_patch16", checkpoint=path, **SMALL)


class _Payload:
    """Unpickling this runs os.mkdir: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


class _Plain:
    def __init__(self):
        self.weights = torch.zeros(2)


@pytest.mark.parametrize("make", [lambda m: _Payload(m), lambda m: _Plain()], ids=["reduce", "custom_class"])
def test_arbitrary_pickles_are_refused_not_executed(tmp_path, make):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pth"
    torch.save({"model": {"cls_token": torch.zeros(1)}, "extra": make(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        read_state_dict(path)
    assert not os.path.exists(marker)


def test_unknown_layout_and_non_tensor_entries():
    with pytest.raises(CheckpointError, match=r"lacks .* weights the model needs: .*patch_embed.proj.weight"):
        load_mae_weights(_model(), {"foo.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"'epoch' \(int\)"):
        read_state_dict({"epoch": 3, "optimizer": {}})


def test_shape_mismatch_names_key_shapes_and_fix():
    sd = _model().state_dict()
    # another resolution: the encoder's table is resampled, the decoder's fixed one rebuilt
    bigger = create_mae("mae_vit_tiny_patch16", **{**SMALL, "img_size": 48})
    report = load_mae_weights(bigger, sd)
    assert report.resized == {"pos_embed": "(1, 17, 192) -> (1, 37, 192)",
                              "decoder.pos_embed": "(1, 17, 256) -> (1, 37, 256)"}
    with pytest.raises(CheckpointError, match=r"patch_embed.proj.weight: checkpoint shape \(192, 3, 8, 8\).*"
                                              r"\(192, 3, 4, 4\).*patch_size"):
        load_mae_weights(_model(patch_size=4), sd)
    with pytest.raises(CheckpointError, match="The checkpoint has 2 blocks, the model 1"):
        load_mae_weights(_model(depth=1), sd)


def test_wrappers_and_prefixes_are_removed():
    src = _perturbed()
    wrapped = {"state_dict": {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}, "epoch": 1}
    dst = _model()
    report = load_mae_weights(dst, wrapped)
    assert len(report.loaded) == len(src.state_dict()) and not report.missing
    _assert_same_state(dst, src)


def test_run_directory_resolution(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="no model weights found"):
        (run / "checkpoints").mkdir(parents=True)
        find_weights_file(run)
    models = {step: _perturbed() for step in (100, 200)}
    export_encoder(models[200], run / "encoder.safetensors")
    assert find_weights_file(run).name == "encoder.safetensors"
    for step, m in models.items():
        d = run / "checkpoints" / f"step-{step:06d}"
        d.mkdir()
        _save_sd(m, d / "model.safetensors")
        (d / "optimizer.bin").write_bytes(b"state")  # training state next to the weights, as runs.py writes
        save_file({"mask": torch.zeros(2)}, str(d / "generators_0.safetensors"))
    (run / "checkpoints" / ".tmp-step-000300").mkdir()  # a checkpoint being written is never read
    assert find_weights_file(run) == run / "checkpoints" / "step-000200" / "model.safetensors"
    (run / "checkpoints" / "step-000200" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model weights found"):
        find_weights_file(run)
    _save_sd(models[200], run / "checkpoints" / "step-000200" / "model.safetensors")
    (run / "checkpoints" / "latest").write_text("step-000100\n")
    loaded = create_mae("mae_vit_tiny_patch16", checkpoint=run, **SMALL)
    _assert_same_state(loaded, models[100])


def test_cli_export_from_published_file(tmp_path, capsys):
    src = _perturbed()
    pth = tmp_path / "checkpoint.pth"
    _save_published(pth, _published_layout(src.state_dict()))
    out = tmp_path / "enc.safetensors"
    geometry = ["img_size=32", "patch_size=8", "depth=2"]
    assert main_export([str(pth), str(out), "--model", "mae_vit_tiny_patch16", *geometry]) == 0
    meta = read_header(out)
    assert meta["model_name"] == "mae_vit_tiny_patch16" and meta["build_args"]["img_size"] == 32
    assert "timm.create_model('vit_tiny_patch16_224'" in capsys.readouterr().out
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, pretrained=False, img_size=32, patch_size=8, depth=2)
    vit.load_state_dict(load_file(out), strict=True)
    # the export reads its own architecture back: no --model, no geometry
    assert main_export([str(out), str(tmp_path / "again.safetensors")]) == 0
    assert main_export([str(pth), str(tmp_path / "b.safetensors"), "--model", "mae_vit_base_patch16", *geometry]) == 2
    err = capsys.readouterr().err
    assert "width 192" in err and "width 768" in err and "Traceback" not in err
    assert not (tmp_path / "b.safetensors").exists()


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "w.safetensors"
    atomic_write(path, lambda tmp: tmp.write_bytes(b"old"))

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
