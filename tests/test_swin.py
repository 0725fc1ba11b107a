"""Swin: group window attention (maevit.layers.window_group) and the visible-only encoder against timm's Swin."""
import pytest
import timm
import torch
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention

from maevit.layers.window_group import NEG_REGION, group_tokens, ungroup_tokens, window_groups
from maevit.models import (
    create_classifier, create_encoder, create_mae, load_encoder_weights, mask_from_noise, random_masking,
)
from maevit.models.swin import grouped_window_attention, unit_token_coords, visible_block

NAME = "mae_swin_tiny_patch4_window7_224"
SMALL = dict(img_size=128, window_size=4, embed_dim=16, depths=(2, 2, 1, 1), num_heads=(1, 2, 4, 8))
# the published geometry (224 px, window 7: windows straddle the 32 px units at stages 1-3), narrow and shallow
PUBLISHED = dict(img_size=224, embed_dim=16, depths=(2, 2, 2, 1), num_heads=(1, 2, 2, 4))


def _grid_coords(b, h, w):
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([yy, xx], -1).reshape(1, h * w, 2).expand(b, -1, -1)


def _visible_coords(b, grid, unit_tokens, keep, seed=0):
    """Coordinates of the tokens of ``keep`` random units per sample (a unit = unit_tokens^2 tokens)."""
    units = (grid[0] // unit_tokens, grid[1] // unit_tokens)
    noise = torch.rand(b, units[0] * units[1], generator=torch.Generator().manual_seed(seed))
    m = mask_from_noise(noise, keep, units)
    return unit_token_coords(m.unit_ids_keep, m.unit_grid, unit_tokens)


def _timm_swin(enc):
    arch, kwargs = enc.timm_spec()
    ref = timm.create_model(arch, pretrained=False, **kwargs).eval()
    ref.load_state_dict(enc.state_dict(), strict=True)
    return ref


# --------------------------------------------------------------------------- group window attention


def test_one_group_equals_plain_window_attention():
    attn = WindowAttention(16, num_heads=2, window_size=4).eval()
    torch.nn.init.normal_(attn.relative_position_bias_table, std=1.0)  # a bias that matters
    x = torch.randn(3, 16, 16)  # 3 samples, one 4x4 window each
    groups = window_groups(_grid_coords(3, 4, 4), (4, 4), (4, 4))
    assert groups.num_groups == 1 and groups.group_size == 16
    with torch.no_grad():
        torch.testing.assert_close(grouped_window_attention(attn, x, groups), attn(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shift", [0, 2])
def test_grouped_block_equals_timm_block_on_full_windows(shift):
    blk = SwinTransformerBlock(16, (8, 8), num_heads=2, window_size=4, shift_size=shift).eval()
    torch.nn.init.normal_(blk.attn.relative_position_bias_table, std=1.0)
    x = torch.randn(2, 8, 8, 16)
    groups = window_groups(_grid_coords(2, 8, 8), (8, 8), blk.window_size, blk.shift_size)
    assert groups.num_groups == 4 and groups.group_size == 16  # one group per window
    with torch.no_grad():
        torch.testing.assert_close(visible_block(blk, x.reshape(2, 64, 16), groups), blk(x).reshape(2, 64, 16),
                                   atol=1e-5, rtol=1e-5)


def test_ungroup_inverts_group_and_groups_hold_whole_windows():
    coords = _visible_coords(4, (16, 16), 4, keep=5, seed=1)  # [4, 80, 2], windows of 3 straddle the units
    n = coords.shape[1]
    groups = window_groups(coords, (16, 16), (4, 4), (2, 2))
    x = torch.randn(4, n, 8)
    assert torch.equal(ungroup_tokens(group_tokens(x, groups), groups), x)
    assert sorted(groups.slot[0].tolist()) == sorted(set(groups.slot[0].tolist()))  # a permutation into the slots
    # every window sits in exactly one group
    wid = ((coords - 2) % 16 // 4)
    wid = wid[..., 0] * 4 + wid[..., 1]  # [B, N]
    group_of_token = groups.slot // groups.group_size
    for b in range(4):
        for w in wid[b].unique():
            assert group_of_token[b, wid[b] == w].unique().numel() == 1


def _reference_visible_attention(attn, x, coords, grid, window, shift):
    """Per sample and window, timm's attention over that window's visible tokens only (a loop, no grouping)."""
    out = torch.zeros(x.shape[0], x.shape[1], attn.proj.out_features)
    rolled = (coords - torch.tensor(shift)) % torch.tensor(grid)
    wid = rolled // torch.tensor(window)
    inner = rolled % torch.tensor(window)
    region = torch.zeros(coords.shape[:2], dtype=torch.long)
    for a in range(2):
        if shift[a]:
            region = region * 3 + (rolled[..., a] >= grid[a] - window[a]).long() + (rolled[..., a] >= grid[a] - shift[a]).long()
    for b in range(x.shape[0]):
        keys = wid[b, :, 0] * 1000 + wid[b, :, 1]
        for w in keys.unique():
            idx = (keys == w).nonzero().flatten()
            qkv = attn.qkv(x[b, idx]).reshape(len(idx), 3, attn.num_heads, -1).permute(1, 2, 0, 3)
            q, k, v = qkv[0] * attn.scale, qkv[1], qkv[2]
            d = inner[b, idx][:, None] - inner[b, idx][None]
            rel = (d[..., 0] + window[0] - 1) * (2 * window[1] - 1) + d[..., 1] + window[1] - 1
            logits = q @ k.transpose(-2, -1) + attn.relative_position_bias_table[rel].permute(2, 0, 1)
            r = region[b, idx]
            logits = logits + (r[:, None] != r[None]).float() * NEG_REGION
            o = (logits.softmax(-1) @ v).transpose(0, 1).reshape(len(idx), -1)
            out[b, idx] = attn.proj(o)
    return out


@pytest.mark.parametrize("shift", [(0, 0), (3, 3)])
def test_grouped_attention_is_per_window_attention_over_visible_tokens(shift):
    attn = WindowAttention(16, num_heads=2, window_size=7).eval()
    torch.nn.init.normal_(attn.relative_position_bias_table, std=1.0)
    coords = _visible_coords(3, (28, 28), 4, keep=12, seed=2)  # stage-2 geometry at 224 px: windows of 7, units of 4
    x = torch.randn(3, coords.shape[1], 16)
    groups = window_groups(coords, (28, 28), (7, 7), shift)
    assert groups.num_groups * groups.group_size < 49 * 16  # packed: fewer slots than the 16 windows padded
    with torch.no_grad():
        got = grouped_window_attention(attn, x, groups)
        want = _reference_visible_attention(attn, x, coords, (28, 28), (7, 7), shift)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- the encoder


@pytest.mark.parametrize("args", [SMALL, PUBLISHED], ids=["window4-128px", "window7-224px"])
def test_visible_only_swin_equals_dense_timm_swin_when_nothing_is_masked(args):
    enc = create_encoder(NAME, **args).eval()
    ref = _timm_swin(enc)
    x = torch.randn(2, 3, *enc.img_size)
    mask = random_masking(2, enc.grid_size, 0.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = enc.forward_masked(x, mask)  # [B, L, D] in ids_keep (noise) order
        dense = ref.forward_features(x).flatten(1, 2)  # timm, row-major
        torch.testing.assert_close(enc.forward_mask_tokens(x, mask), out, atol=1e-5, rtol=1e-4)
    restored = torch.gather(out, 1, mask.ids_restore.unsqueeze(-1).expand(-1, -1, out.shape[-1]))
    torch.testing.assert_close(restored, dense, atol=1e-5, rtol=1e-4)


def test_masked_output_follows_ids_keep_and_hides_masked_pixels():
    mae = create_mae(NAME, **PUBLISHED, decoder_depth=1, decoder_embed_dim=32, decoder_num_heads=2).eval()
    enc = mae.encoder
    assert (enc.patch_size, enc.mask_unit, enc.grid_size) == (32, 32, (7, 7))
    x = torch.randn(2, 3, 224, 224)
    noise = torch.rand(2, 49, generator=torch.Generator().manual_seed(4))
    mask = mae.random_mask(2, noise=noise)
    assert mask.ids_keep.shape == (2, 12)
    hidden = torch.nn.functional.interpolate(mask.mask.reshape(2, 1, 7, 7), scale_factor=32).bool().expand_as(x)
    garbage = torch.where(hidden, torch.randn_like(x) * 50, x)
    # the same visible units in another order: the same tokens, in that order
    kept_order = torch.argsort(noise, 1)[:, :12]
    noise2 = noise.clone().scatter_(1, kept_order, noise.gather(1, kept_order).flip(1))
    mask2 = mae.random_mask(2, noise=noise2)
    assert torch.equal(mask2.ids_keep, mask.ids_keep.flip(1))
    with torch.no_grad():
        out = enc.forward_masked(x, mask)
        assert torch.equal(enc.forward_masked(garbage, mask), out)
        torch.testing.assert_close(enc.forward_masked(x, mask2), out.flip(1), atol=1e-5, rtol=1e-5)
        ref = enc.forward_mask_tokens(x, mask)  # the SimMIM path hides masked pixels too
        assert ref.shape == out.shape and torch.equal(enc.forward_mask_tokens(garbage, mask), ref)
        assert mae(x, noise=noise).pred.shape == (2, 49, 32 * 32 * 3)  # the decoder rebuilds 32 px patches


def test_classifier_loads_into_timm_strictly_with_the_same_logits(tmp_path):
    clf = create_classifier(NAME, 10, **SMALL).eval()
    ref = _timm_swin(clf)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), clf(x))
    arch, kwargs = clf.timm_spec()
    assert arch == "swin_tiny_patch4_window7_224" and kwargs["num_classes"] == 10 and kwargs["window_size"] == 4


def test_fine_tuning_at_another_window_resizes_relative_position_tables():
    src = create_encoder(NAME, **SMALL)
    dst = create_classifier(NAME, 10, **{**SMALL, "img_size": 256, "window_size": 8})
    report = load_encoder_weights(dst, src.state_dict(), fresh=("head.",))
    key = "layers.0.blocks.0.attn.relative_position_bias_table"
    assert key in report.resized and dst.state_dict()[key].shape == (15 * 15, 1)
    # a timm checkpoint from a Swin with more blocks loads what fits and reports the rest
    big = create_encoder(NAME, **{**SMALL, "depths": (2, 2, 2, 1)}).state_dict()
    report = load_encoder_weights(create_encoder(NAME, **SMALL), big, strict=False)
    assert any("layers.2.blocks.1" in k for k in report.unexpected)


def test_bad_geometry_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of the Swin mask unit 32"):
        create_encoder(NAME, **{**SMALL, "img_size": 112})
    with pytest.raises(ValueError, match="window_size that divides"):
        create_encoder(NAME, **{**SMALL, "window_size": 5})
