"""Numerical parity with Hugging Face ``ViTMAEForPreTraining`` through the weight converters.

Same weights (converted either way) and the same ``noise`` must give the same
mask, predictions, loss and gradients, fp32, to 1e-5.
"""
import pytest
import torch
from torch import nn

from maevit import create_mae
from maevit.models import sincos_2d
from maevit.models.hf_vitmae import hf_to_maevit as to_maevit_mae_keys, hf_vitmae_config, to_hf_vitmae_keys
from maevit.models.weights import load_mae_weights

import transformers  # a test dependency: missing is an error (see conftest.py), not a skip
from transformers.models.vit_mae import modeling_vit_mae

# (maevit name, overrides, attention implementation used on the HF side)
CASES = {
    "tiny_d2": ("mae_vit_tiny_patch16", dict(img_size=32, patch_size=8, depth=2, decoder_embed_dim=128,
                                             decoder_depth=1, decoder_num_heads=4), "sdpa"),
    "small_d2_pix": ("mae_vit_small_patch16", dict(img_size=32, patch_size=4, depth=2, decoder_embed_dim=256,
                                                   decoder_depth=2, decoder_num_heads=8, norm_pix_loss=False,
                                                   mask_ratio=0.6), "eager"),
    "tiny_32x48_c4": ("mae_vit_tiny_patch16", dict(img_size=(32, 48), patch_size=8, in_chans=4, depth=2,
                                                   decoder_embed_dim=128, decoder_depth=1, decoder_num_heads=4), "sdpa"),
}


def _hf_model(model, attn: str):
    """An HF ViTMAEForPreTraining shaped like ``model``; returns (hf, forward kwargs).

    transformers 5.23 assumes square images in three places: the sin-cos tables
    are built for an ``int(sqrt(L))`` grid (a 32x48 config fails to construct:
    25 vs 17 positions), its ``interpolate_pos_encoding`` reshapes the table to a
    square, and ``ForPreTraining.patchify`` rejects H != W unless
    ``interpolate_pos_encoding=True``. For a non-square model we therefore build
    HF at a square size, then resize the patch grid attributes and both fixed
    tables to the real grid (their values come from the loaded weights), make
    the two interpolation hooks return the table unchanged (it already is for
    this grid, so "interpolating" is the identity) and pass
    ``interpolate_pos_encoding=True`` only to get past the square check. The
    transformer math HF runs is untouched.
    """
    hf = transformers.ViTMAEForPreTraining(hf_vitmae_config(model, attn)).eval()
    h, w = model.encoder.patch_embed.img_size
    if h == w:
        return hf, {}
    emb, dec = hf.vit.embeddings, hf.decoder
    num = model.num_patches
    emb.image_size = emb.patch_embeddings.image_size = (h, w)
    emb.patch_embeddings.num_patches = num
    emb.position_embeddings = nn.Parameter(torch.zeros(1, 1 + num, emb.position_embeddings.shape[-1]), requires_grad=False)
    dec.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + num, dec.decoder_pos_embed.shape[-1]), requires_grad=False)
    emb.interpolate_pos_encoding = lambda embeddings, height, width: emb.position_embeddings
    dec.interpolate_pos_encoding = lambda embeddings: dec.decoder_pos_embed
    return hf, {"interpolate_pos_encoding": True}


def _randomize(module: nn.Module) -> None:
    # distinct values everywhere (biases, norms, tables) so any mis-mapped tensor changes the output
    with torch.no_grad():
        for p in module.state_dict().values():
            p.add_(torch.randn_like(p) * 0.05)


def _hf_layout(hf) -> str:
    return "transformers5" if any(k.startswith("vit.layers.") for k in hf.state_dict()) else "hub"


def _compare(model, hf, hf_kwargs):
    c = model.encoder.in_chans
    h, w = model.encoder.patch_embed.img_size
    imgs = torch.randn(3, c, h, w)
    noise = torch.rand(3, model.num_patches)
    ours = model(imgs, noise=noise)
    theirs = hf(pixel_values=imgs, noise=noise, **hf_kwargs)
    assert torch.equal(ours.mask, theirs.mask)
    assert torch.equal(ours.ids_restore, theirs.ids_restore)
    torch.testing.assert_close(ours.pred, theirs.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-5)
    # the same gradients too: training with either is the same computation
    ours.loss.backward()
    theirs.loss.backward()
    hf_grads = to_maevit_mae_keys({n: p.grad for n, p in hf.named_parameters() if p.grad is not None})
    our_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    # transformers 5.23's from_pretrained turns the fixed sin-cos tables trainable (requires_grad=True,
    # unlike a freshly constructed model); maevit keeps them fixed, as published. Everything else must match.
    assert set(hf_grads) - set(our_grads) <= {"encoder.pos_embed", "decoder.pos_embed"}
    assert set(our_grads) <= set(hf_grads)
    for k in our_grads:
        torch.testing.assert_close(our_grads[k], hf_grads[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_weights_converted_both_ways(case):
    name, overrides, attn = CASES[case]
    model = create_mae(name, **overrides)
    hf, kwargs = _hf_model(model, attn)
    # maevit -> HF
    _randomize(model)
    hf.load_state_dict(to_hf_vitmae_keys(model.state_dict(), layout=_hf_layout(hf)), strict=True)
    _compare(model, hf, kwargs)
    # HF -> maevit, from fresh random HF weights
    _randomize(hf)
    model.zero_grad(set_to_none=True)
    hf.zero_grad(set_to_none=True)
    report = load_mae_weights(model, hf.state_dict())
    assert report.format == "hf_vitmae" and not report.missing and not report.unexpected
    _compare(model, hf, kwargs)


def test_hub_layout_file_loads_with_from_pretrained(tmp_path):
    # the "hub" layout must be what transformers reads from Hub files (it renames them on load)
    from safetensors.torch import save_file

    model = create_mae("mae_vit_tiny_patch16", **CASES["tiny_d2"][1])
    _randomize(model)
    config = hf_vitmae_config(model, "sdpa")
    config.save_pretrained(tmp_path)
    save_file(to_hf_vitmae_keys(model.state_dict(), layout="hub"), str(tmp_path / "model.safetensors"))
    hf, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _compare(model, hf.eval(), {})


@pytest.mark.parametrize("grid,dim", [((4, 4), 64), ((4, 6), 128), ((7, 3), 32)])
def test_sincos_tables_match_hf_convention(grid, dim):
    # the converters copy the fixed tables, so they must be the same function of the grid
    # (HF's builder plus its documented half rotation; HF itself only calls it for square grids)
    table = modeling_vit_mae.build_2d_sinusoidal_position_embedding(grid[0], grid[1], dim, cls_token=True)
    table = torch.cat([table[..., dim // 2:], table[..., : dim // 2]], dim=-1)
    torch.testing.assert_close(sincos_2d(dim, grid), table, rtol=0, atol=1e-6)
