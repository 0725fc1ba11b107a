"""CvT: Hugging Face parity, the authors' names, the per-stage masked plan, errors.

The registry-wide contract tests (tests/test_contract.py) cover every registered CvT at its smoke
size: leaks in train and eval mode, gradients, nothing-masked == full, export / rebuild.
"""
import pytest
import torch
from transformers import CvtConfig, CvtForImageClassification, CvtModel

from maevit.models import create_classifier, create_encoder, create_mae, load_encoder_weights
from maevit.models.cvt import CvtEncoder

# a small HF CvT (HF indexes per-stage drop-path rates by the stage number, so each stage needs
# at least stage + 1 blocks to build)
SMALL = dict(embed_dims=[16, 32, 48], num_heads=[1, 2, 3], depths=[1, 2, 3])


def _hf_cvt(num_labels: int = 5) -> CvtForImageClassification:
    torch.manual_seed(0)
    cfg = CvtConfig(embed_dim=SMALL["embed_dims"], num_heads=SMALL["num_heads"], depth=SMALL["depths"],
                    num_labels=num_labels, drop_path_rate=[0.0, 0.0, 0.0])
    hf = CvtForImageClassification(cfg)
    with torch.no_grad():  # non-trivial norms, so a wrong mapping cannot hide behind 1 / 0 initialisations
        for m in hf.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
        hf.classifier.weight.normal_(0, 1)
    return hf


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_hf_cvt_classifier_parity(mode):
    hf = _hf_cvt()
    ours = create_classifier("mae_cvt_13", 5, pretrained=hf.state_dict(), img_size=64, global_pool="token", **SMALL)
    assert ours.load_report.missing == [] and ours.load_report.unexpected == []
    hf.train(mode == "train"), ours.train(mode == "train")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = hf(x, output_hidden_states=True)
        feats = ours.forward_features(x)
        logits = ours.forward_head(feats)
        hf_map = hf.cvt(x).last_hidden_state  # [B, C, h, w] before the final norm (HF normalises the class token only)
    torch.testing.assert_close(logits, want.logits, atol=1e-5, rtol=1e-5)
    assert logits.abs().max() > 0.1  # a real comparison, not two near-zero heads
    assert hf_map.shape[-2:] == ours.grid_size == (4, 4)


def test_hf_cvt_model_and_authors_names_load():
    hf = _hf_cvt()
    x = torch.randn(2, 3, 64, 64)
    ref = create_classifier("mae_cvt_13", 5, pretrained=hf.state_dict(), img_size=64, **SMALL).eval()
    # HF CvtModel (no 'cvt.' prefix; keys start with 'encoder.') + the authors' 'stage{i}.' names
    body = CvtModel(hf.config)
    body.load_state_dict({k[len("cvt."):]: v for k, v in hf.state_dict().items() if k.startswith("cvt.")})
    enc = create_encoder("mae_cvt_13", img_size=64, **SMALL).eval()
    report = load_encoder_weights(enc, body.state_dict(), strict=False)
    assert sorted(report.missing) == ["norm.bias", "norm.weight"]  # CvtModel has no final norm
    enc.norm.load_state_dict(ref.norm.state_dict())
    authors = {k.replace("stages.", "stage", 1) if k.startswith("stages.") else k: v
               for k, v in ref.state_dict().items()}
    enc2 = create_classifier("mae_cvt_13", 5, pretrained=authors, img_size=64, **SMALL).eval()
    with torch.no_grad():
        f = ref.forward_features(x)
        torch.testing.assert_close(enc.forward_features(x), f)
        torch.testing.assert_close(enc2(x), ref(x))


def test_masked_plan_per_stage():
    """At 224 px: stages 1-2 gather the visible units' keys / values; stage 3's K/V grid (stride 32) is
    coarser than a unit, so it is computed whole and masked in the attention."""
    mae = create_mae("mae_cvt_tiny", depths=[1, 1, 1], decoder_depth=1, mask_ratio=0.75)  # 49 of 196 units kept
    enc = mae.encoder
    mask = mae.random_mask(2, generator=torch.Generator().manual_seed(0))
    plans = [enc._sites(i, mask, 2) for i in range(3)]
    assert [p.ids.shape[1] for p in plans] == [49 * 16, 49 * 4, 49]  # 49 of 196 units, 4x4 / 2x2 / 1 positions
    assert [None if p.kv_ids is None else p.kv_ids.shape[1] for p in plans] == [49 * 4, 49, None]
    assert plans[2].kv_mask.shape == (2, 1, 1, 1 + 49)
    assert torch.equal(plans[2].ids, mask.ids_keep)  # last-stage tokens come out in ids_keep order
    kv_seen = plans[2].kv_mask[:, 0, 0, 1:].float().reshape(2, 1, 7, 7)
    assert torch.equal(kv_seen, plans[2].kv_visible)  # a K/V position is kept iff its window holds a visible unit


def test_mask_token_path_matches_shapes_and_ignores_masked_pixels():
    mae = create_mae("mae_cvt_tiny", img_size=64, depths=[1, 1, 1], decoder_depth=1).eval()
    mask = mae.random_mask(2, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 64, 64)
    hidden = torch.nn.functional.interpolate(mask.unit_mask.reshape(2, 1, 4, 4), size=(64, 64)).bool()
    with torch.no_grad():
        a = mae.encoder.forward_mask_tokens(x, mask)
        b = mae.encoder.forward_mask_tokens(torch.where(hidden, torch.randn_like(x) * 100, x), mask)
    assert a.shape == mae.encoder.forward_masked(x, mask).shape and torch.equal(a, b)


def test_quick_gelu_and_average_pool_options():
    enc = create_encoder("mae_cvt_tiny", img_size=64, depths=[1, 1, 1], act_layer="quick_gelu", cls_token=False)
    assert enc.num_prefix_tokens == 0
    enc.reset_classifier(3, "token")  # no class token: averages
    assert enc.global_pool == "avg" and enc(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_bad_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of CvT's total stride 16"):
        create_encoder("mae_cvt_tiny", img_size=40)
    with pytest.raises(ValueError, match="image / stride"):
        CvtEncoder(img_size=64, patch_paddings=[0, 1, 1])
    enc = create_encoder("mae_cvt_tiny", img_size=32, depths=[1, 1, 1])
    with pytest.raises(ValueError, match=r"expected \[B, 3, 32, 32\]"):
        enc.forward_features(torch.randn(1, 3, 64, 64))
