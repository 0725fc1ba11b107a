"""MAE model: published sizes, shapes, masking invariants, patchify, loss, sin-cos table
(every registered model's contract, gradients and leak test: tests/test_contract.py)."""
import pytest
import timm
import torch

from maevit import create_mae, list_models, patchify, unpatchify
from maevit.models import create_encoder, mask_from_noise, model_info, random_masking, sincos_2d

# small overrides keep every registered size cheap on CPU; depth/width stay as registered
# for tiny only (the others are shrunk in depth, their width and heads are kept)
SMALL = dict(img_size=32, patch_size=8)


@pytest.mark.parametrize("name,size", [
    ("mae_vit_base_patch16", (768, 12, 12, 16, 512, 8)), ("mae_vit_large_patch16", (1024, 24, 16, 16, 512, 8)),
    ("mae_vit_huge_patch14", (1280, 32, 16, 14, 512, 8)), ("mae_vit_tiny_patch16", (192, 12, 3, 16, 256, 4)),
    ("mae_vit_small_patch16", (384, 12, 6, 16, 256, 4)),
])
def test_full_size_config_matches_published(name, size):
    with torch.device("meta"):
        mae = create_mae(name)
    b = mae.encoder.build_args
    d = model_info(name).decoder
    assert (b["embed_dim"], b["depth"], b["num_heads"], b["patch_size"], d.embed_dim, d.depth) == size
    assert mae.mask_ratio == 0.75 and mae.norm_pix_loss


def test_non_square_any_channels():
    model = create_mae("mae_vit_tiny_patch16", img_size=(32, 48), patch_size=8, in_chans=5, depth=1, decoder_depth=1)
    out = model(torch.randn(2, 5, 32, 48))
    assert out.pred.shape == (2, 24, 8 * 8 * 5)


def test_bad_sizes_and_names_have_clear_errors():
    with pytest.raises(ValueError, match="30x30 is not divisible by patch size 8"):
        create_mae("mae_vit_tiny_patch16", img_size=30, patch_size=8)
    with pytest.raises(KeyError, match="decoder_embed_dim"):
        create_mae("mae_vit_tiny_patch16", decoder_dim=64)
    with pytest.raises(KeyError, match="mae_vit_base_patch16"):
        create_mae("mae_vit_base_patch61")
    model = create_mae("mae_vit_tiny_patch16", **SMALL, depth=1, decoder_depth=1)
    with pytest.raises(ValueError, match="expected \\[B, 3, 32, 32\\]"):
        model(torch.randn(1, 3, 40, 40))


@pytest.mark.parametrize("shape,p", [((2, 3, 32, 32), 8), ((1, 1, 16, 48), 4), ((3, 7, 28, 14), 14)])
def test_patchify_round_trip(shape, p):
    imgs = torch.randn(shape)
    patches = patchify(imgs, p)
    grid = (shape[2] // p, shape[3] // p)
    assert patches.shape == (shape[0], grid[0] * grid[1], p * p * shape[1])
    assert torch.equal(unpatchify(patches, p, grid, shape[1]), imgs)
    # patch (i, j) holds exactly the pixels of that window, channel-last
    i, j = grid[0] - 1, grid[1] - 1
    window = imgs[0, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[0, i * grid[1] + j], window)


def test_masking_invariants():
    b, length = 4, 49
    m = random_masking(b, length, 0.75)
    keep = int(length * 0.25)
    assert m.ids_keep.shape == (b, keep)
    assert (m.mask.sum(1) == length - keep).all()
    # kept ids are exactly the unmasked positions
    for i in range(b):
        assert set(m.ids_keep[i].tolist()) == set((m.mask[i] == 0).nonzero().flatten().tolist())
    # ids_restore inverts the shuffle: gathering the sorted order back gives 0..L-1
    shuffle = torch.argsort(m.ids_restore, dim=1)
    assert torch.equal(torch.gather(shuffle, 1, m.ids_restore), torch.arange(length).expand(b, -1))


def test_smallest_noise_is_kept_and_reproducible():
    noise = torch.rand(3, 16)
    a, b = mask_from_noise(noise, 4), mask_from_noise(noise.clone(), 4)
    assert torch.equal(a.ids_keep, b.ids_keep) and torch.equal(a.mask, b.mask)
    assert torch.equal(a.ids_keep, noise.argsort(1)[:, :4])
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(random_masking(3, 16, 0.5, generator=g1).mask, random_masking(3, 16, 0.5, generator=g2).mask)
    model = create_mae("mae_vit_tiny_patch16", **SMALL, depth=1, decoder_depth=1).eval()
    imgs = torch.randn(2, 3, 32, 32)
    n = torch.rand(2, 16)
    o1, o2 = model(imgs, noise=n), model(imgs, noise=n)
    assert torch.equal(o1.mask, o2.mask) and torch.equal(o1.pred, o2.pred)


def test_bad_mask_ratio():
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(1, 16, 1.0)
    with pytest.raises(ValueError, match="expected \\[batch=2, mask units=16\\]"):
        random_masking(2, 16, 0.5, noise=torch.rand(2, 15))


def test_loss_only_counts_masked_patches():
    model = create_mae("mae_vit_tiny_patch16", **SMALL, depth=1, decoder_depth=1, norm_pix_loss=False).eval()
    imgs = torch.randn(2, 3, 32, 32)
    out = model(imgs, noise=torch.rand(2, 16))
    target = patchify(imgs, 8)
    per_patch = ((out.pred - target) ** 2).mean(-1)
    expected = per_patch[out.mask.bool()].mean()
    assert torch.allclose(out.loss, expected, rtol=1e-6)


def test_sincos_table_matches_published_construction():
    # the published MAE table on a square grid, rebuilt independently with numpy-style loops
    dim, g = 16, 3
    table = sincos_2d(dim, (g, g))
    assert torch.all(table[0] == 0)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    for r in range(g):
        for c in range(g):
            col = torch.cat([torch.sin(c * omega), torch.cos(c * omega)])
            row = torch.cat([torch.sin(r * omega), torch.cos(r * omega)])
            assert torch.allclose(table[1 + r * g + c].double(), torch.cat([col, row]), atol=1e-6)


def test_encoder_loads_into_timm_strictly():
    model = create_mae("mae_vit_tiny_patch16")
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, pretrained=False)
    vit.load_state_dict(model.encoder.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    model.eval(), vit.eval()
    assert torch.allclose(vit.forward_features(x), model.encoder.forward_features(x), atol=1e-5)
