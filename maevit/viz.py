"""Reconstruction grids and PCA maps of patch features (the command, ``maevit visualize``, is
:mod:`maevit.visualize`).

One row per image: original | masked input | reconstruction | reconstruction
with the visible patches pasted back. With ``norm_pix_loss`` the model predicts
per-patch normalised pixels, so predictions are mapped back with the mean and
variance of each *target* patch (what the loss normalised by) before display.
"""
from __future__ import annotations

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
    seed: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Run the MAE on ``imgs`` and return display panels in [0, 1].

    Args:
        model: a ``MaskedAutoencoder`` (or anything with its forward / attributes).
        imgs: normalised images ``[B, C, H, W]``.
        noise: ``[B, U]`` masking noise over mask units (fixed noise gives a fixed mask).
        seed: draw the mask from a generator with this seed (the same seed, the same mask).
        mean, std: the normalisation of ``imgs``, undone for display.

    Returns:
        ``[B, 4, C, H, W]``: original, masked, reconstruction, reconstruction + visible.
    """
    generator = None if seed is None else torch.Generator(imgs.device).manual_seed(seed)
    out = model(imgs, noise=noise, generator=generator)
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


COLUMN_TITLES = ("original", "masked input", "reconstruction", "visible pasted back")


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable font (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide."""
    from PIL import Image, ImageDraw

    draw, lines = ImageDraw.Draw(Image.new("RGB", (1, 1))), [""]
    for word in text.split():
        trial = f"{lines[-1]} {word}".strip()
        if lines[-1] and draw.textlength(trial, font=font) > width:
            lines.append(word)
        else:
            lines[-1] = trial
    return lines


def _annotate(grid: torch.Tensor, titles: Sequence[str], cell: int, pad: int, note: str | None):
    """A PIL image of ``grid`` ([3, H, W] in [0, 1]) with a title above each column and an
    optional note below."""
    from PIL import Image, ImageDraw

    body = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    fsize = max(10, min(16, cell // 8))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    while fsize > 8 and max(probe.textlength(t, font=_font(fsize)) for t in titles) > cell - 4:
        fsize -= 1  # the longest title fits its column
    font, line = _font(fsize), fsize + 6
    notes = _wrap(note, font, body.width - 2 * pad) if note else []
    head = line + 6
    canvas = Image.new("RGB", (body.width, head + body.height + len(notes) * line + (6 if notes else 0)), "white")
    canvas.paste(body, (0, head))
    draw = ImageDraw.Draw(canvas)
    for i, title in enumerate(titles):
        draw.text((pad + i * (cell + pad) + cell // 2, head // 2 + 2), title, fill="black", font=font, anchor="mm")
    for j, text in enumerate(notes):
        draw.text((pad, head + body.height + 3 + j * line), text, fill=(70, 70, 70), font=font)
    return canvas


def save_reconstruction_grid(
    model: nn.Module,
    imgs: torch.Tensor,
    path: str | Path,
    *,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    min_size: int = 128,
    titles: bool = True,
) -> Path:
    """Write the reconstruction grid PNG of ``imgs`` (one row per image, 4 columns).

    Args:
        model, imgs, noise, seed, mean, std: as in :func:`reconstruction_panels`.
        path: the PNG to write (parent folders are created).
        min_size: panels smaller than this many pixels are upscaled by a whole factor
            (nearest neighbour, so pixels and patch edges stay sharp); 0 keeps the input size.
        titles: column titles above the grid and, with ``norm_pix_loss``, a note below it
            saying how the normalised predictions were turned back into colours.
    """
    panels = reconstruction_panels(model, imgs, noise=noise, seed=seed, mean=mean, std=std)  # [B, 4, C, H, W]
    ratio = getattr(model, "mask_ratio", None)
    names = list(COLUMN_TITLES)
    if ratio is not None:
        names[1] = f"masked ({ratio:.0%})"
    note = None
    if getattr(model, "norm_pix_loss", False):
        note = ("Targets are norm-pix (each patch normalised to mean 0, std 1): every predicted "
                "patch is shown with the true patch's mean and std put back, so its average colour "
                "comes from the original.")
    return save_panel_grid(panels, path, names if titles else None, note, min_size=min_size)


def save_panel_grid(panels: torch.Tensor, path: str | Path, titles: Sequence[str] | None, note: str | None = None,
                    *, min_size: int = 128) -> Path:
    """Write ``panels`` ``[B, n, C, H, W]`` (in [0, 1]) as one PNG: a row per image, a titled column per panel.

    Args:
        panels: what to show; 1-channel panels are shown grey, more than 3 channels by their first three.
        path: the PNG (parent folders are created; written atomically with titles).
        titles: one per column, or None for the bare grid.
        note: a line of text under the grid.
        min_size: panels smaller than this many pixels are upscaled by a whole factor
            (nearest neighbour, so pixels and patch edges stay sharp); 0 keeps the input size.
    """
    b, n, c, h, w = panels.shape
    factor = max(1, -(-min_size // min(h, w))) if min_size else 1  # ceil: at least min_size
    flat = panels.flatten(0, 1).float().cpu()  # [B*4, C, H, W]
    if factor > 1:
        flat = torch.nn.functional.interpolate(flat, scale_factor=factor, mode="nearest")
    if c == 1:
        flat = flat.expand(-1, 3, -1, -1)
    elif c != 3:
        flat = flat[:, :3]  # show the first three channels
    pad = 2 if factor == 1 else 4
    grid = make_grid(flat, nrow=n, padding=pad, pad_value=1.0)  # [3, H', W']
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not titles:
        save_image(grid, path)
        return path
    from maevit.fileio import save_image_atomic

    return save_image_atomic(_annotate(grid, titles, w * factor, pad, note), path)


def _oriented_pca(x: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` principal components of the rows of ``x`` ``[N, D]`` projected: ``[N, k]`` (zeros
    where there are fewer). SVD signs are arbitrary: each component is turned so that its largest loading
    is positive, so the same features always give the same colours."""
    x = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)  # vh: [min(N, D), D]
    vh = vh[:k]
    vh = vh * torch.sign(vh.gather(1, vh.abs().argmax(1, keepdim=True)))
    out = x @ vh.T  # [N, <=k]
    return torch.nn.functional.pad(out, (0, k - out.shape[1]))


def feature_pca_maps(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DINOv2-style pictures of patch features ``[B, h, w, D]`` (one PCA over all the images' patches).

    The first component separates foreground from background: scaled to [0, 1] and turned so that
    the border patches (background, mostly) are low; patches above 0.5 are the foreground. A second
    PCA over the foreground patches gives three components, scaled to [0, 1] as red, green, blue;
    background patches are black.

    Returns:
        ``(first [B, h, w] in [0, 1], foreground [B, h, w] bool, rgb [B, 3, h, w] in [0, 1])``.
    """
    b, h, w, d = grid.shape
    x = grid.reshape(-1, d).double()  # [B*h*w, D]
    first = _oriented_pca(x, 1)[:, 0].reshape(b, h, w)
    first = (first - first.min()) / (first.max() - first.min()).clamp_min(1e-12)
    border = torch.ones(h, w, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    if h > 2 and w > 2 and first[:, border].mean() > first[:, ~border].mean():
        first = 1 - first
    fg = first > 0.5
    if fg.sum() < 2:  # nothing stands out: colour every patch
        fg = torch.ones_like(fg)
    comps = _oriented_pca(x[fg.reshape(-1)], 3)  # [F, 3]
    lo, hi = comps.min(0).values, comps.max(0).values
    rgb = torch.zeros(b * h * w, 3, dtype=torch.float64)
    rgb[fg.reshape(-1)] = (comps - lo) / (hi - lo).clamp_min(1e-12)
    return first.float(), fg, rgb.reshape(b, h, w, 3).permute(0, 3, 1, 2).float()


FEATURE_TITLES = ("original", "1st component", "foreground", "PCA of foreground")


@torch.no_grad()
def save_feature_pca_grid(
    encoder: nn.Module,
    imgs: torch.Tensor,
    path: str | Path,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    min_size: int = 128,
) -> Path:
    """Write one PNG: per image, the original | first component | foreground | RGB of three components
    (:func:`feature_pca_maps` of the encoder's last feature map, upsampled to the image)."""
    from maevit.train.knn import patch_features

    was = encoder.training
    grid = patch_features(encoder.eval(), imgs).float().cpu()  # [B, h, w, D]
    encoder.train(was)
    first, fg, rgb = feature_pca_maps(grid)
    size = imgs.shape[-2:]
    up = lambda m: torch.nn.functional.interpolate(m, size=size, mode="nearest")  # noqa: E731
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    original = (imgs.float().cpu()[:, :3] * s + m).clamp(0, 1)
    panels = [original, up(first[:, None]).expand(-1, 3, -1, -1), up(fg[:, None].float()).expand(-1, 3, -1, -1),
              up(rgb)]
    h, w = grid.shape[1:3]
    note = (f"PCA of the {h}x{w} grid of {grid.shape[-1]}-d features over all {len(imgs)} images; foreground = "
            "first component above half its range (turned so the border is low); colours = the foreground's "
            "first three components.")
    return save_panel_grid(torch.stack(panels, 1), path, FEATURE_TITLES, note, min_size=min_size)
