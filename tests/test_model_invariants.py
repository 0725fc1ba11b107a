"""MAE invariants checked without Hugging Face: the norm-pix targets and where position
embeddings are added (before the gather of visible patches)."""
import pytest
import torch

from maevit import create_mae, patchify

SMALL = dict(img_size=32, patch_size=8, depth=2, decoder_depth=1)  # 4 x 4 patches


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_targets_are_per_patch_normalised_pixels_when_asked(norm_pix):
    model = create_mae("mae_vit_tiny_patch16", **SMALL, norm_pix_loss=norm_pix).eval()
    imgs = torch.randn(2, 3, 32, 32) * 3 + 1  # patches far from zero mean / unit variance
    out = model(imgs, noise=torch.rand(2, 16))
    target = patchify(imgs, 8)  # [B, L, p*p*C]
    if norm_pix:  # the published rule: per patch, unbiased variance, eps 1e-6
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((out.pred - target) ** 2).mean(-1)  # [B, L]
    expected = (per_patch * out.mask).sum() / out.mask.sum()
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)
    other = patchify(imgs, 8)
    if not norm_pix:
        other = (other - other.mean(-1, keepdim=True)) / (other.var(-1, keepdim=True) + 1e-6) ** 0.5
    wrong = (((out.pred - other) ** 2).mean(-1) * out.mask).sum() / out.mask.sum()
    assert not torch.allclose(out.loss, wrong, rtol=1e-3)  # the two targets are told apart


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_position_embeddings_travel_with_their_patches(ratio):
    """Position embeddings are added before visible patches are gathered, so reordering the kept
    patches (the order follows the noise) only reorders the encoder's output tokens. Adding them
    after the gather would give each token the embedding of its slot instead of its patch."""
    torch.manual_seed(0)
    model = create_mae("mae_vit_tiny_patch16", **SMALL).eval()
    with torch.no_grad():  # a learned-looking table, so that every position differs clearly
        model.encoder.pos_embed.add_(torch.randn_like(model.encoder.pos_embed))
    imgs = torch.randn(1, 3, 32, 32)
    noise = torch.rand(1, 16)
    kept = int(16 * (1 - ratio))
    order = noise.argsort(dim=1)[0, :kept]  # the kept patches, in the order the encoder sees them
    # the same kept set, presented in a different order: permute the noise values among the kept patches
    shuffled = noise.clone()
    perm = order[torch.randperm(kept, generator=torch.Generator().manual_seed(1))]
    shuffled[0, order] = noise[0, perm]
    order2 = shuffled.argsort(dim=1)[0, :kept]
    assert set(order.tolist()) == set(order2.tolist()) and order.tolist() != order2.tolist()
    with torch.no_grad():
        a = model(imgs, mask_ratio=ratio, noise=noise).latent  # [1, 1 + K, D]
        b = model(imgs, mask_ratio=ratio, noise=shuffled).latent
    where = {p: i for i, p in enumerate(order.tolist())}
    idx = torch.tensor([where[p] for p in order2.tolist()])
    torch.testing.assert_close(b[:, 0], a[:, 0], rtol=1e-5, atol=1e-5)  # class token: same set, same output
    torch.testing.assert_close(b[:, 1:], a[:, 1:][:, idx], rtol=1e-5, atol=1e-5)
