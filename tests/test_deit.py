"""DeiT encoders: two prefix tokens through MAE files, timm DeiT weights and timm export.

The registry-wide contract tests (tests/test_contract.py) cover the DeiT names too;
this file checks what is particular to the distillation token.
"""
import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from maevit.models import create_classifier, create_encoder, create_mae
from maevit.models.weights import header_of, save_weights
from maevit.train.knn import encoder_features

SMALL = dict(img_size=32, patch_size=8, depth=2)  # 4x4 patches: cheap, two blocks


def _timm_deit(**kw):
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, **kw).eval()


def test_mae_carries_the_distillation_token_like_the_class_token():
    mae = create_mae("mae_deit_tiny_patch16", decoder_depth=1, decoder_embed_dim=32, decoder_num_heads=2, **SMALL)
    assert mae.encoder.num_prefix_tokens == 2 and mae.decoder.num_prefix_tokens == 2
    out = mae(torch.randn(2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    assert out.latent.shape == (2, 2 + 4, 192)  # two prefix tokens + 25% of 16 patches
    out.loss.backward()
    assert mae.encoder.dist_token.grad.abs().sum() > 0  # MAE trains it (through attention)
    assert torch.equal(mae.encoder.pos_embed[0, :2], torch.zeros(2, 192))  # sin-cos: prefix rows are zero


def test_one_prefix_mae_checkpoint_into_deit_and_out_to_timm(tmp_path):
    # a plain-ViT MAE run (class token only) -> DeiT classifier -> timm's distilled DeiT, strictly
    vit = create_mae("mae_vit_tiny_patch16", decoder_depth=1, **SMALL)
    with torch.no_grad():
        vit.encoder.pos_embed[:, 0].normal_()  # a learned class slot, to see where it goes
    path = save_weights(vit.state_dict(), tmp_path / "mae.safetensors", header_of(vit, "mae"))
    clf = create_classifier("mae_deit_tiny_patch16", 10, pretrained=path, **SMALL).eval()
    report = clf.load_report
    assert "dist_token" in report.new and "pos_embed" in report.resized
    pe, src = clf.pos_embed.detach(), vit.encoder.pos_embed.detach()
    assert pe.shape == (1, 2 + 16, 192)
    assert torch.equal(pe[:, 0], src[:, 0])  # class slot kept
    assert torch.equal(pe[:, 1], torch.zeros(1, 192))  # distillation slot: zero (no position of its own)
    assert torch.equal(pe[:, 2:], src[:, 1:])  # patch rows unchanged (same grid)
    assert torch.equal(clf.cls_token, vit.encoder.cls_token)
    assert not torch.equal(clf.dist_token, torch.zeros_like(clf.dist_token))  # fresh, not zero
    # the classifier file loads into timm's deit_tiny_distilled_patch16_224 strictly, same logits
    file = save_weights(clf.state_dict(), tmp_path / "classifier.safetensors", header_of(clf, "classifier"))
    head = header_of(clf, "classifier")
    assert head["timm_model"] == "deit_tiny_distilled_patch16_224" and head["global_pool"] == "token"
    ref = timm.create_model(head["timm_model"], pretrained=False, **head["timm_kwargs"]).eval()
    ref.load_state_dict(load_file(str(file)), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), clf(x), atol=1e-5, rtol=1e-5)
    # and back: the file rebuilds the same DeiT classifier with no name and no arguments
    again = create_classifier(None, 10, pretrained=file, global_pool=None).eval()
    with torch.no_grad():
        assert torch.equal(again(x), clf(x))


def test_published_timm_deit_weights_load_and_match_timm():
    ref = _timm_deit(num_classes=10, **SMALL)
    clf = create_classifier("mae_deit_tiny_patch16", 10, pretrained=ref.state_dict(), **SMALL).eval()
    assert clf.load_report.new == [] and clf.load_report.resized == {}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), ref(x), atol=1e-5, rtol=1e-5)


def test_timm_deit_weights_at_224_resample_to_the_model_grid():
    # a 14x14-grid DeiT file (ImageNet layout, 1000 classes) into a 4x4-grid classifier for 10 classes
    sd = _timm_deit(depth=2).state_dict()
    clf = create_classifier("mae_deit_tiny_patch16", 10, pretrained=sd, img_size=64, depth=2)
    assert sd["pos_embed"].shape == (1, 2 + 196, 192) and clf.pos_embed.shape == (1, 2 + 16, 192)
    expect = resample_abs_pos_embed(sd["pos_embed"], [4, 4], [14, 14], num_prefix_tokens=2)
    torch.testing.assert_close(clf.pos_embed.detach(), expect)
    assert torch.equal(clf.pos_embed[:, :2].detach(), sd["pos_embed"][:, :2])  # both prefix slots kept
    assert torch.equal(clf.dist_token, sd["dist_token"])
    assert {"head.weight", "head_dist.weight"} <= set(clf.load_report.new)  # 1000 classes -> 10: new heads


def test_deit_file_into_a_plain_vit_drops_the_distillation_token():
    sd = _timm_deit(num_classes=10, **SMALL).state_dict()
    vit = create_classifier("mae_vit_tiny_patch16", 10, pretrained=sd, global_pool="token", **SMALL)
    assert "dist_token" not in vit.load_report.loaded and vit.pos_embed.shape == (1, 1 + 16, 192)
    assert torch.equal(vit.pos_embed[:, 0].detach(), sd["pos_embed"][:, 0])
    assert torch.equal(vit.pos_embed[:, 1:].detach(), sd["pos_embed"][:, 2:])


def test_heads_average_in_eval_and_split_in_distilled_training():
    clf = create_classifier("mae_deit_tiny_patch16", 10, **SMALL)
    for p in (clf.head, clf.head_dist):  # MAE's near-zero head init; give the heads something to say
        torch.nn.init.normal_(p.weight)
    x = torch.randn(2, 3, 32, 32)
    clf.eval()
    with torch.no_grad():
        cls_logits, dist_logits = clf.forward_heads(clf.forward_features(x))
        torch.testing.assert_close(clf(x), (cls_logits + dist_logits) / 2)
        assert not torch.allclose(cls_logits, dist_logits)
    clf.train()
    assert clf(x).shape == (2, 10)  # without distillation: the average, also in training
    clf.set_distilled_training(True)
    out = clf(x)
    assert isinstance(out, tuple) and [o.shape for o in out] == [(2, 10), (2, 10)]


def test_avg_pool_keeps_token_heads_and_bad_options_are_clear_errors():
    clf = create_classifier("mae_deit_tiny_patch16", 3, global_pool="avg", **SMALL)
    assert clf.global_pool == "token" and not isinstance(clf.norm, torch.nn.Identity)
    with pytest.raises(ValueError, match="sincos.*learn"):
        create_encoder("mae_deit_tiny_patch16", pos_encoding="rope", **SMALL)
    with pytest.raises(ValueError, match="global_pool='map'.*'token'.*'avg'"):
        clf.reset_classifier(3, "map")


def test_the_feature_probes_read_follows_global_pool_while_the_heads_read_their_tokens():
    """A probe / kNN / embed of a DeiT asked for 'avg' reads the patch tokens' mean (what MAE trains),
    'token' the two tokens' mean; the logits are the same either way."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    by_token = create_classifier("mae_deit_tiny_patch16", 3, global_pool="token", **SMALL).eval()
    by_avg = create_classifier("mae_deit_tiny_patch16", 3, global_pool="avg", **SMALL).eval()
    by_avg.load_state_dict(by_token.state_dict())  # same modules, same names
    with torch.no_grad():
        feats = by_token.forward_features(x)  # [B, 2 + L, D]
        torch.testing.assert_close(by_token.forward_head(feats, pre_logits=True), feats[:, :2].mean(1))
        torch.testing.assert_close(by_avg.forward_head(feats, pre_logits=True), feats[:, 2:].mean(1))
        torch.testing.assert_close(by_avg(x), by_token(x))
    assert encoder_features(by_avg, x).shape == (2, by_avg.num_features)
    by_avg.reset_classifier(0, "token")
    with torch.no_grad():
        torch.testing.assert_close(by_avg.forward_head(feats, pre_logits=True), feats[:, :2].mean(1))
