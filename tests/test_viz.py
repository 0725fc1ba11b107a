"""Reconstruction grids: titled, upscaled panels; the plain layout on request."""
import torch
from PIL import Image

from maevit.models import create_mae
from maevit.viz import COLUMN_TITLES, reconstruction_panels, save_reconstruction_grid

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=2)


def test_grid_is_upscaled_and_titled(tmp_path):
    model = create_mae("mae_vit_tiny_patch16", **TINY).eval()
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    panels = reconstruction_panels(model, imgs, noise=noise)
    assert panels.shape == (3, 4, 3, 32, 32) and 0 <= panels.min() and panels.max() <= 1
    assert len(COLUMN_TITLES) == 4

    titled = save_reconstruction_grid(model, imgs, tmp_path / "a.png", noise=noise)  # 32 px -> 128 px panels
    plain = save_reconstruction_grid(model, imgs, tmp_path / "b.png", noise=noise, min_size=0, titles=False)
    model.norm_pix_loss = False  # no note below the grid
    no_note = save_reconstruction_grid(model, imgs, tmp_path / "c.png", noise=noise)
    with Image.open(titled) as a, Image.open(plain) as b, Image.open(no_note) as c:
        assert b.size == (4 * 34 + 2, 3 * 34 + 2)  # torchvision's make_grid, 2 px gaps
        assert a.size[0] == 4 * 132 + 4 and a.size[1] > c.size[1] > 3 * 132 + 4
        # a 4x nearest upscale: the first panel of the titled grid is the plain one's, pixel for pixel
        head = a.size[1] - 3 * 132 - 4 - (a.size[1] - c.size[1])  # title band height
        big = a.crop((4, head + 4, 4 + 128, head + 4 + 128)).resize((32, 32), Image.NEAREST)
        small = b.crop((2, 2, 34, 34))
        assert list(big.getdata()) == list(small.getdata())


def test_feature_pca_finds_the_object_whichever_sign_the_svd_picks():
    """Patches of an 'object' (a 4x4 square) share one feature direction, the background another: the
    foreground is exactly the square, on every image, for the features and their negation."""
    from maevit.viz import feature_pca_maps

    g = torch.Generator().manual_seed(0)
    obj, bg = torch.randn(16, generator=g), torch.randn(16, generator=g)
    grid = bg + 0.05 * torch.randn(3, 8, 8, 16, generator=g)  # [B, h, w, D]
    square = torch.zeros(8, 8, dtype=torch.bool)
    square[2:6, 3:7] = True
    grid[:, square] = obj + 0.05 * torch.randn(3, 16, 16, generator=g)
    for feats in (grid, -grid):
        first, fg, rgb = feature_pca_maps(feats)
        assert torch.equal(fg, square.expand(3, -1, -1))
        assert rgb.shape == (3, 3, 8, 8) and rgb[:, :, ~square].abs().max() == 0  # background black
        assert 0 <= first.min() and first.max() <= 1 and rgb.max() <= 1


def test_visualize_features_of_an_encoder_file(tmp_path, capsys):
    from maevit.cli import main as cli
    from maevit.models import export_encoder

    enc = export_encoder(create_mae("mae_vit_tiny_patch16", **TINY), tmp_path / "enc.safetensors")
    out = tmp_path / "pca.png"
    assert cli(["visualize", str(enc), "--features", "--data", "sample:val", "--num-images", "3",
                "--out", str(out)]) == 0
    assert "original | 1st component | foreground | PCA of the foreground" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.size[0] == 4 * 132 + 4 and im.size[1] > 3 * 132  # 4 titled columns of 128 px panels, 3 rows
