"""Hybrid ResNet + ViT: the masked stem, strict timm loading, errors.

The registry-wide contract tests (tests/test_contract.py) cover every registered hybrid at its
smoke size: leaks in train and eval mode, gradients, nothing-masked == full, export / rebuild.
"""
import pytest
import timm
import torch

from maevit.models import create_classifier, create_encoder, create_mae
from maevit.models.hybrid import masked_resnetv2


def _mae(layers, **kw):
    return create_mae("mae_vit_base_r50_s16", img_size=64, depth=1, embed_dim=64, num_heads=2, layers=layers,
                      decoder_depth=1, decoder_embed_dim=32, decoder_num_heads=2, **kw)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("layers", [[], [1, 1, 1]])
def test_masked_stem_equals_the_dense_stem_with_nothing_masked(layers, mode):
    mae = _mae(layers, patch_size=16).train(mode == "train")
    backbone = mae.encoder.patch_embed.backbone
    x = torch.randn(2, 3, 64, 64)
    nothing = mae.random_mask(2, mask_ratio=0.0)
    with torch.no_grad():
        torch.testing.assert_close(masked_resnetv2(backbone, x, nothing), backbone(x), atol=1e-5, rtol=1e-4)


def test_masked_stem_map_is_blind_to_masked_pixels_and_zero_there():
    mae = _mae([1, 1, 1])
    backbone = mae.encoder.patch_embed.backbone
    mask = mae.random_mask(2, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 64, 64)
    hidden = torch.nn.functional.interpolate(mask.unit_mask.reshape(2, 1, 4, 4), size=(64, 64)).bool()
    with torch.no_grad():
        a = masked_resnetv2(backbone, x, mask)  # [2, 1024, 4, 4]
        b = masked_resnetv2(backbone, torch.where(hidden, torch.randn_like(x) * 100, x), mask)
    assert torch.equal(a, b)
    assert torch.equal(a * mask.unit_mask.reshape(2, 1, 4, 4), torch.zeros_like(a))


@pytest.mark.parametrize("name,kw,pool", [
    ("mae_vit_tiny_r_s16", dict(img_size=64, depth=2), "avg"),
    ("mae_vit_tiny_r_s16", dict(img_size=64, depth=2), "token"),
    ("mae_vit_base_r50_s16", dict(img_size=64, depth=1, embed_dim=64, num_heads=2), "avg"),  # R50 stages in full
])
def test_classifier_loads_into_timm_strictly(name, kw, pool):
    clf = create_classifier(name, 7, global_pool=pool, **kw).eval()
    arch, kwargs = clf.timm_spec()
    assert arch in ("vit_tiny_r_s16_p8_224", "vit_base_r50_s16_224")
    ref = timm.create_model(arch, pretrained=False, **kwargs).eval()
    ref.load_state_dict(clf.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), clf.forward_head(clf.forward_features(x)), atol=1e-5, rtol=1e-5)


def test_cifar_sized_hybrid_has_a_stride_4_token_grid():
    enc = create_encoder("mae_vit_tiny_r_s16", img_size=32, patch_size=4, depth=1)
    assert enc.grid_size == (8, 8) and enc.mask_unit == 4 and enc.patch_embed.patch_size == (1, 1)
    assert enc.timm_spec()[1]["patch_size"] == 1


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="not a multiple of the ResNet's stride 16"):
        create_encoder("mae_vit_base_r50_s16", patch_size=8)
    with pytest.raises(ValueError, match="pos_encoding='rope' for a hybrid"):
        create_encoder("mae_vit_tiny_r_s16", pos_encoding="rope")
