"""Reconstruction grids: ``maevit visualize CHECKPOINT --data SRC --out grid.png``.

One row per image: original | masked input | reconstruction | reconstruction
with the visible patches pasted back. With ``norm_pix_loss`` the model predicts
per-patch normalised pixels, so predictions are mapped back with the mean and
variance of each *target* patch (what the loss normalised by) before display.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torchvision.utils import make_grid, save_image

from maevit.models import patchify, unpatchify

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@torch.no_grad()
def reconstruction_panels(
    model: nn.Module,
    imgs: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Run the MAE on ``imgs`` and return display panels in [0, 1].

    Args:
        model: a ``MaskedAutoencoder`` (or anything with its forward / attributes).
        imgs: normalised images ``[B, C, H, W]``.
        noise: ``[B, L]`` masking noise (fixed noise gives a fixed mask).
        mean, std: the normalisation of ``imgs``, undone for display.

    Returns:
        ``[B, 4, C, H, W]``: original, masked, reconstruction, reconstruction + visible.
    """
    out = model(imgs, noise=noise)
    p, c = model.patch_size, imgs.shape[1]
    pred = out.pred.float()  # [B, L, p*p*C]
    if model.norm_pix_loss:
        target = patchify(imgs.float(), p)  # [B, L, p*p*C]
        pred = pred * (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    recon = unpatchify(pred, p, model.grid_size, c)  # [B, C, H, W]
    mask = out.mask.unsqueeze(-1).expand(-1, -1, p * p * c)  # [B, L, p*p*C], 1 = masked
    mask = unpatchify(mask.float(), p, model.grid_size, c)  # [B, C, H, W]
    imgs = imgs.float()
    m = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1)
    shown = [imgs, imgs * (1 - mask), recon, imgs * (1 - mask) + recon * mask]
    shown = [(x * s + m).clamp(0, 1) for x in shown]
    shown[1] = shown[1] * (1 - mask) + 0.5 * mask  # masked patches in grey, not black
    return torch.stack(shown, dim=1)


def save_reconstruction_grid(
    model: nn.Module,
    imgs: torch.Tensor,
    path: str | Path,
    *,
    noise: torch.Tensor | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Path:
    """Write the reconstruction grid PNG of ``imgs`` (one row per image, 4 columns)."""
    panels = reconstruction_panels(model, imgs, noise=noise, mean=mean, std=std)  # [B, 4, C, H, W]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(panels.flatten(0, 1).cpu(), nrow=4, padding=2, pad_value=1.0)
    save_image(grid, path)
    return path


def _resolve(checkpoint: str) -> tuple[Path, Path | None]:
    """(weights file or checkpoint dir, the run directory holding config.yaml if any)."""
    from maevit.train.runs import RunDir, is_complete_checkpoint

    path = Path(checkpoint)
    if (path / "checkpoints").is_dir():  # a run directory: its latest checkpoint
        ckpt = RunDir(path).latest_checkpoint()
        if ckpt is None:
            raise FileNotFoundError(f"run directory {path} has no complete checkpoint yet")
        return ckpt / "model.safetensors", path
    if is_complete_checkpoint(path):
        return path / "model.safetensors", path.parent.parent
    return path, None


def main(argv: list[str] | None = None) -> int:
    """``maevit visualize CHECKPOINT --data SRC --out grid.png``."""
    parser = argparse.ArgumentParser(prog="maevit visualize", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run directory, a checkpoints/step-* directory, or an MAE weights file")
    parser.add_argument("--data", help="images to show (shards, folder, 'bundled'); default: the run's data.train")
    parser.add_argument("--out", default="reconstruction.png", help="output PNG")
    parser.add_argument("--model", help="model name (needed for a bare weights file; default: the run's)")
    parser.add_argument("--img-size", type=int, help="default: the run's model.img_size, else 224")
    parser.add_argument("--patch-size", type=int, help="default: the run's / the model's")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--mask-ratio", type=float, default=None, help="default: the model's")
    parser.add_argument("--seed", type=int, default=0, help="picks the images and the masks")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from maevit.config import load_config
    from maevit.data.stream import pretrain_loader
    from maevit.models import create_mae
    from maevit.train.pretrain import PretrainConfig

    weights, run_dir = _resolve(args.checkpoint)
    cfg = load_config(PretrainConfig, run_dir / "config.yaml") if run_dir else PretrainConfig()
    overrides = cfg.model.overrides() if run_dir else {}
    name = args.model or (cfg.model.name if run_dir else None)
    if name is None:
        print("maevit visualize: a bare weights file needs --model NAME (see `maevit models`)", file=sys.stderr)
        return 2
    for key, value in (("img_size", args.img_size), ("patch_size", args.patch_size), ("mask_ratio", args.mask_ratio)):
        if value is not None:
            overrides[key] = value
    data = args.data or (cfg.data.train if run_dir else None)
    if not data:
        print("maevit visualize: pass --data SRC (shards, an image folder, or 'bundled')", file=sys.stderr)
        return 2
    model = create_mae(name, checkpoint=weights, **overrides).eval()
    img_size = overrides.get("img_size", 224)
    loader = pretrain_loader(data, img_size=img_size, batch_size=args.num_images, num_workers=0, seed=args.seed,
                             scale=(1.0, 1.0), shuffle_buffer=args.num_images, mean=cfg.data.mean, std=cfg.data.std)
    imgs = next(iter(loader))
    noise = torch.rand(len(imgs), model.num_patches, generator=torch.Generator().manual_seed(args.seed))
    path = save_reconstruction_grid(model, imgs, args.out, noise=noise, mean=cfg.data.mean, std=cfg.data.std)
    print(f"wrote {path} ({len(imgs)} rows: original | masked | reconstruction | reconstruction + visible)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
