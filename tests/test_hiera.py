"""Hiera: maevit's masking and read-out against timm's own visible-only Hiera path."""
import pytest
import timm
import torch

from maevit.models import create_classifier, create_encoder, create_mae, load_encoder_weights, mask_from_noise

NAME = "mae_hiera_tiny_224"
SMALL = dict(img_size=128, embed_dim=16, stages=(1, 1, 2, 1))  # 16 mask units, 2 blocks in the global stage


def _timm_hiera(enc, **changes):
    arch, kwargs = enc.timm_spec()
    ref = timm.create_model(arch, pretrained=False, **{**kwargs, **changes}).eval()
    ref.load_state_dict(enc.state_dict(), strict=True)
    return ref


def _mask(enc, b, keep, seed=0):
    uh, uw = enc.mask_spatial_shape
    noise = torch.rand(b, uh * uw, generator=torch.Generator().manual_seed(seed))
    return mask_from_noise(noise, keep, (uh, uw))  # unit-level; forward_masked reads the unit fields


@pytest.mark.parametrize("mae_q_pool", [2, 3])
def test_visible_only_path_equals_timms_with_the_same_mask(mae_q_pool):
    enc = create_encoder(NAME, **SMALL, mae_q_pool=mae_q_pool).eval()
    assert enc.patch_size == 4 * 2**mae_q_pool and enc.mask_unit == 32
    ref = _timm_hiera(enc, q_pool=mae_q_pool)  # timm's Hiera pretrains with the pooling the read-out uses
    x = torch.randn(2, 3, 128, 128)
    mask = _mask(enc, 2, keep=5)
    keep = mask.unit_mask == 0  # timm: True = keep
    with torch.no_grad():
        ours = enc.forward_masked(x, mask)  # [B, K_u * s * s, C], ids_keep order, normed
        theirs = ref.forward_features(x, mask=keep)  # [B, s * s * K_u, C], timm's unrolled order
        theirs = ref.reroll(theirs, len(ref.blocks) - 1, mask=keep) if mae_q_pool < 3 else theirs.unsqueeze(-2)
        theirs = ref.head.norm(theirs.reshape(2, 5, -1, theirs.shape[-1]))  # [B, K_u (ascending), s*s, C]
    rank = torch.argsort(torch.argsort(mask.unit_ids_keep, 1), 1)  # ascending position of each kept unit
    theirs = torch.gather(theirs, 1, rank[..., None, None].expand_as(theirs)).flatten(1, 2)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_masked_pixels_are_zeroed_before_the_overlapping_stem():
    enc = create_encoder(NAME, **SMALL).eval()
    x = torch.randn(2, 3, 128, 128)
    mask = _mask(enc, 2, keep=4, seed=1)
    hidden = torch.nn.functional.interpolate(mask.unit_mask.reshape(2, 1, 4, 4), scale_factor=32).bool().expand_as(x)
    with torch.no_grad():
        out = enc.forward_masked(x, mask)
        assert torch.equal(enc.forward_masked(torch.where(hidden, x + 1e3, x), mask), out)


def test_nothing_masked_equals_the_dense_forward_when_pretraining_pools_like_fine_tuning():
    enc = create_encoder(NAME, **SMALL, mae_q_pool=3).eval()
    assert enc.masked_equals_full
    x = torch.randn(2, 3, 128, 128)
    mask = _mask(enc, 2, keep=16)
    with torch.no_grad():
        out = enc.forward_masked(x, mask)
        full = enc.tokens_of(enc.forward_features(x))
    restored = torch.gather(out, 1, mask.ids_restore.unsqueeze(-1).expand(-1, -1, out.shape[-1]))
    torch.testing.assert_close(restored, full, atol=1e-5, rtol=1e-5)
    assert not create_encoder(NAME, **SMALL).masked_equals_full  # the default read-out pools once less


def test_mae_reconstructs_16px_patches_and_the_classifier_loads_into_timm_strictly():
    mae = create_mae(NAME, **SMALL, decoder_depth=1, decoder_embed_dim=32, decoder_num_heads=2, mask_ratio=0.75)
    out = mae(torch.randn(2, 3, 128, 128))
    assert out.pred.shape == (2, 64, 16 * 16 * 3) and out.latent.shape == (2, 16, 128)
    clf = create_classifier(NAME, 10, pretrained=mae.state_dict(), **SMALL).eval()
    assert torch.equal(clf.head.norm.weight, mae.encoder.head.norm.weight)  # the MAE norm is the classifier's
    ref = _timm_hiera(clf)
    assert clf.timm_spec()[0] == "hiera_tiny_224" and ref.q_pool == 3
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), clf(x))


def test_original_names_and_another_image_size():
    src = create_encoder(NAME, **SMALL).state_dict()
    original = {("encoder_norm." + k[len("head.norm."):] if k.startswith("head.norm.") else k): v for k, v in src.items()}
    dst = create_encoder(NAME, **{**SMALL, "img_size": 192})
    report = load_encoder_weights(dst, original)
    assert "pos_embed" in report.resized and dst.pos_embed.shape == (1, 48 * 48, 16)
    assert torch.equal(dst.head.norm.weight, src["head.norm.weight"])


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of the Hiera mask unit 32"):
        create_encoder(NAME, **{**SMALL, "img_size": 100})
    with pytest.raises(ValueError, match="mask-unit attention"):
        create_encoder(NAME, **SMALL, mae_q_pool=0)
    with pytest.raises(ValueError, match="mae_q_pool=4"):
        create_encoder(NAME, **SMALL, mae_q_pool=4)


def test_mask_token_reference_path_hides_masked_pixels_and_reads_out_the_same_tokens():
    enc = create_encoder(NAME, **SMALL).eval()
    x = torch.randn(2, 3, 128, 128)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(3))
    mask = create_mae(NAME, **SMALL, decoder_depth=1, mask_ratio=0.75).random_mask(2, noise=noise)
    hidden = torch.nn.functional.interpolate(mask.unit_mask.reshape(2, 1, 4, 4), scale_factor=32).bool().expand_as(x)
    with torch.no_grad():
        ref = enc.forward_mask_tokens(x, mask)
        assert ref.shape == enc.forward_masked(x, mask).shape == (2, 16, 128)
        assert torch.equal(enc.forward_mask_tokens(torch.where(hidden, x + 1e3, x), mask), ref)
        nothing = create_mae(NAME, **SMALL, decoder_depth=1).random_mask(2, mask_ratio=0.0)
        torch.testing.assert_close(enc.forward_mask_tokens(x, nothing), enc.forward_masked(x, nothing),
                                   atol=1e-5, rtol=1e-5)
