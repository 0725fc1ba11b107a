"""SReT: sliced group attention, permutations, the masked stem, visible-only pooling, weights.

The registry-wide contract tests (tests/test_contract.py) cover leaks, gradients,
export / rebuild and layer decay for the registered SReT sizes; these test the parts.
"""
import pytest
import torch
from timm.layers.attention import Attention

from maevit.models import create_classifier, create_encoder, create_mae, export_encoder, model_info, random_masking
from maevit.models.sret import (
    ConvStem, SReTEncoder, StagePooling, group_attention, inverse_permutation, slice_permutation,
)

SMOKE = model_info("mae_sret_tiny").smoke


def _encoder(**kw):
    return create_encoder("mae_sret_tiny", **{**SMOKE, **kw})


def test_group_attention_with_one_group_is_plain_attention():
    attn = Attention(32, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 24, 32)
    torch.testing.assert_close(group_attention(x, attn, 1), attn(x), atol=0, rtol=0)


def test_group_attention_attends_within_contiguous_slices():
    attn = Attention(16, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(2, 12, 16)
    out = group_attention(x, attn, 3)
    expected = torch.cat([attn(x[:, i:i + 4]) for i in range(0, 12, 4)], dim=1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="equal slices"):
        group_attention(x, attn, 5)


def test_inverse_permutation_restores_token_order():
    x = torch.randn(2, 50, 8)
    for perm in (torch.randperm(50), slice_permutation(50, training=False)):
        inv = inverse_permutation(perm)
        assert torch.equal(x[:, perm][:, inv], x)
        assert torch.equal(inv, torch.argsort(perm))


def test_permuted_group_attention_is_slices_of_the_permuted_sequence_put_back():
    attn = Attention(16, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(2, 12, 16)
    perm = torch.randperm(12)
    out = group_attention(x, attn, 2, perm)
    expected = torch.empty_like(x)
    expected[:, perm] = group_attention(x[:, perm], attn, 2)  # token perm[i] gets slice output i
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    # a token attends to its own slice only: changing a token of the other slice leaves it alone
    y = x.clone()
    y[:, perm[11]] += 1.0
    assert torch.equal(group_attention(y, attn, 2, perm)[:, perm[0]], out[:, perm[0]])


def test_eval_permutation_is_fixed_training_permutation_is_drawn():
    assert torch.equal(slice_permutation(64, training=False), slice_permutation(64, training=False))
    torch.manual_seed(1)
    a = slice_permutation(64, training=True)
    torch.manual_seed(2)
    assert not torch.equal(a, slice_permutation(64, training=True))
    assert sorted(a.tolist()) == list(range(64))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_masked_stem_with_nothing_masked_is_the_dense_stem(mode):
    torch.manual_seed(0)
    dense, masked = ConvStem(3, 16), ConvStem(3, 16)
    for bn in (dense.bn1, dense.bn2, dense.bn3):  # non-trivial running statistics for eval mode
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    masked.load_state_dict(dense.state_dict())
    dense.train(mode == "train")
    masked.train(mode == "train")
    x = torch.randn(4, 3, 64, 64)
    nothing = random_masking(4, (2, 2), 0.0)
    torch.testing.assert_close(masked(x, nothing), dense(x), atol=1e-5, rtol=1e-4)
    for a, b in zip(masked.buffers(), dense.buffers()):  # same running-statistics update
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_masked_stem_reads_masked_units_as_zeros():
    stem = ConvStem(3, 16).train()
    x = torch.randn(2, 3, 64, 64)
    mask = random_masking(2, (2, 2), 0.5, generator=torch.Generator().manual_seed(0))
    hidden = torch.nn.functional.interpolate(mask.unit_mask.reshape(2, 1, 2, 2), size=(64, 64)).bool()
    out = stem(x, mask)  # [2, 16, 8, 8]
    masked_out = torch.nn.functional.interpolate(mask.unit_mask.reshape(2, 1, 2, 2), size=(8, 8)).bool()
    assert (out.masked_select(masked_out.expand_as(out)) == 0).all()
    torch.testing.assert_close(stem(torch.where(hidden, torch.randn_like(x) * 50, x), mask), out, atol=0, rtol=0)


def test_pooling_on_visible_tokens_equals_dense_pooling_with_zeros_where_masked():
    pool = StagePooling(8, 16)
    mask = random_masking(2, (2, 2), 0.5, generator=torch.Generator().manual_seed(3))
    enc = _encoder()
    ids = enc._visible_ids(mask)  # stage grids 8x8, 4x4, 2x2
    x = torch.randn(2, 64, 8)
    vis = torch.nn.functional.interpolate(mask.unit_mask.reshape(2, 1, 2, 2), size=(8, 8)).flatten(1) == 0
    dense = pool(x * vis.unsqueeze(-1), (8, 8))  # [2, 16, 16]
    visible = pool(torch.gather(x, 1, ids[0].unsqueeze(-1).expand(-1, -1, 8)), (8, 8), ids[0], ids[1])
    torch.testing.assert_close(visible, torch.gather(dense, 1, ids[1].unsqueeze(-1).expand(-1, -1, 16)))


def test_visible_tokens_are_whole_units_in_raster_order():
    enc = _encoder(img_size=128)  # 4x4 units
    mask = random_masking(3, enc.grid_size, 0.75, generator=torch.Generator().manual_seed(0))
    for s, ids in enumerate(enc._visible_ids(mask)):
        assert ids.shape[1] == 4 * (32 // enc.strides[s]) ** 2
        assert (ids.diff(dim=1) > 0).all()  # ascending = raster order of the stage grid
    assert torch.equal(enc._visible_ids(mask)[-1], mask.ids_keep.sort(dim=1).values)


def test_forward_masked_follows_ids_keep_and_matches_the_dense_model_in_training():
    enc = _encoder().train()
    x = torch.randn(2, 3, 64, 64)
    nothing = random_masking(2, enc.grid_size, 0.0, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)  # the same random permutations on both paths
    masked = enc.forward_masked(x, nothing)
    torch.manual_seed(0)
    full = enc.forward_features(x)
    torch.testing.assert_close(masked, torch.gather(full, 1, nothing.ids_keep.unsqueeze(-1).expand(-1, -1, 64)),
                               atol=1e-5, rtol=1e-4)


def test_mask_token_path_is_leak_free_and_differs_from_visible_only():
    mae = create_mae("mae_sret_tiny", **SMOKE, decoder_depth=1, decoder_embed_dim=32, decoder_num_heads=2).eval()
    enc = mae.encoder
    x = torch.randn(2, 3, 64, 64)
    mask = mae.random_mask(2, generator=torch.Generator().manual_seed(0))
    hidden = torch.nn.functional.interpolate(mask.unit_mask.reshape(2, 1, 2, 2), size=(64, 64)).bool()
    with torch.no_grad():
        ref = enc.forward_mask_tokens(x, mask)
        again = enc.forward_mask_tokens(torch.where(hidden, torch.randn_like(x) * 50, x), mask)
        assert torch.equal(ref, again) and ref.shape == enc.forward_masked(x, mask).shape
        mae.encoder_path = "mask_tokens"
        assert torch.isfinite(mae(x, noise=torch.rand(2, 4)).loss)


def test_authors_weights_load_and_give_the_same_model():
    """The authors' layout (transformers.{s}.blocks.{i} interleaving block applications and NLLs,
    coefficient{k}.bias, pools.{s}.conv, a post-pooling norm) is mapped onto this one."""
    ours = create_classifier("mae_sret_tiny", 5, **SMOKE).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    block = {"skip_scale1": "coefficient1.bias", "branch_scale1": "coefficient2.bias",
             "skip_scale2": "coefficient3.bias", "branch_scale2": "coefficient4.bias"}
    nll = {"skip_scale": "coefficient1.bias", "branch_scale": "coefficient2.bias"}
    theirs = {}
    for k, v in ours.state_dict().items():
        p = k.split(".")
        if p[0] == "stages" and p[2] == "units":  # smoke: one unit per stage, two loops
            s, rest = p[1], ".".join(p[5:] if p[4] == "block" else p[6:])
            if p[4] == "block":
                for i in (0, 2):  # a shared block is saved under both of its applications
                    theirs[f"transformers.{s}.blocks.{i}.{block.get(rest, rest)}"] = v
            else:
                rest = nll.get(rest, rest.replace("norm.", "norm1.", 1))
                theirs[f"transformers.{s}.blocks.{2 * int(p[5]) + 1}.{rest}"] = v
        elif p[0] == "stages":
            theirs[f"pools.{int(p[1]) - 1}.{'.'.join(p[3:])}"] = v
        elif p[0] == "fc_norm":
            theirs[f"norm.{p[1]}"] = v
        else:
            theirs[k] = v
    again = create_classifier("mae_sret_tiny", 5, pretrained=theirs, **SMOKE).eval()
    assert again.load_report.unexpected == [] and again.load_report.new == []
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours(x), atol=0, rtol=0)


def test_position_table_is_resized_for_another_image_size(tmp_path):
    mae = create_mae("mae_sret_tiny", **SMOKE, decoder_depth=1, decoder_embed_dim=32, decoder_num_heads=2)
    path = export_encoder(mae, tmp_path / "enc.safetensors")
    clf = create_classifier(None, 3, pretrained=path, img_size=96)
    assert clf.pos_embed.shape == (1, 16, 12, 12)
    assert "pos_embed" in clf.load_report.resized
    assert clf(torch.randn(1, 3, 96, 96)).shape == (1, 3)


def test_layer_groups_follow_execution_order():
    from timm.models import group_parameters

    clf = create_classifier("mae_sret_tiny", 5, **SMOKE)
    layer = group_parameters(clf, clf.group_matcher(), reverse=True)
    order = ["pos_embed", "patch_embed.conv1.weight", "stages.0.units.0.block.attn.qkv.weight",
             "stages.1.downsample.conv.weight", "stages.2.units.0.nlls.1.mlp.fc2.weight", "fc_norm.weight"]
    ids = [layer[n] for n in order]
    assert ids[0] == ids[1] < ids[2] < ids[3] < ids[4] < ids[5]
    assert layer["stages.1.downsample.conv.weight"] == layer["stages.1.units.0.block.norm1.weight"]


def test_pooling_choice_and_probe_layout():
    enc = _encoder()
    assert isinstance(enc.fc_norm, torch.nn.Identity) and not isinstance(enc.norm, torch.nn.Identity)
    enc.reset_classifier(4, "avg")  # fine-tuning: fresh fc_norm after pooling, no per-token norm
    assert isinstance(enc.norm, torch.nn.Identity) and enc.head.out_features == 4
    enc.reset_classifier(4, "token")  # probe: pretrained per-token norm, tokens averaged
    assert isinstance(enc.fc_norm, torch.nn.Identity)
    with pytest.raises(ValueError, match="global_pool"):
        enc.reset_classifier(4, "map")


@pytest.mark.parametrize("kw, match", [
    (dict(img_size=48), "multiples of 32"),
    (dict(depths=[3, 2, 2], recursions=[2, 1, 1]), "multiple of recursions"),
    (dict(embed_dims=[16, 24, 64]), "multiple of the"),
    (dict(groups=[[8, 2], [4, 1]]), "one entry per stage"),
])
def test_bad_configurations_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        SReTEncoder(**{**SMOKE, **kw})
