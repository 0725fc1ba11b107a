"""Image decoding and augmentation for MAE pretraining, fine-tuning and evaluation.

Pretraining (`PretrainTransform`): RandomResizedCrop(scale 0.2-1.0, bicubic) +
horizontal flip, as in MAE, with *crop-aware decoding*: the crop box is drawn
from the image header alone, then a JPEG whose crop is much larger than the
output is decoded at a reduced DCT scale (PIL draft mode: 1/2, 1/4 or 1/8) with
the crop box snapped to that scale's pixel grid (a shift below one output
pixel), so the result matches cropping the full decode up to resampling
error, at a fraction of the decode cost; other
JPEGs are decoded with torchvision's libjpeg-turbo `decode_jpeg`, and the
crop is resized with torchvision's uint8 bicubic kernel (much faster than PIL's). Randomness comes from a `numpy.random.Generator` passed per
sample, so a stream can reproduce any sample exactly (resume).

Fine-tune / eval (`labeled_transform`): timm's `create_transform` (RandAugment,
random erasing, ...) and resize + center crop. timm's transforms draw from the
global `random` / `torch` generators, so `apply_seeded` seeds them per sample
and restores them afterwards.
"""
from __future__ import annotations

import io
import math
import random
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

# Shard / folder members decoded as images. Everything else except .cls/.txt/.json is ignored
# (never unpickled, never torch.load-ed).
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff")


def to_2tuple(size: int | Sequence[int]) -> tuple[int, int]:
    """`224 -> (224, 224)`; `(h, w)` unchanged."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def rrc_params(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """RandomResizedCrop box `(top, left, h, w)` in full-image pixels.

    Same algorithm as `torchvision.transforms.RandomResizedCrop.get_params`
    (10 tries, then a center crop), but driven by an explicit numpy generator
    and by the image size alone, so it runs before decoding.

    Args:
        width, height: full image size.
        rng: per-sample generator.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (w / h).
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# Images above this many pixels are skipped (and counted) by the loaders: decoding one costs
# 3 bytes of memory per pixel and seconds of CPU in every worker, every epoch. 64 MP is
# 8192 x 8192; the cure is to store smaller images (`maevit shards write --resize-shorter`).
DEFAULT_MAX_PIXELS = 1 << 26


class ImageTooLargeError(ValueError):
    """An image has more pixels than the loader's limit (`max_pixels`)."""


def check_pixels(img: Image.Image, max_pixels: int | None) -> None:
    """Raise `ImageTooLargeError` if `img` (opened, header read) exceeds `max_pixels` (None / 0: no limit)."""
    w, h = img.size
    if max_pixels and w * h > max_pixels:
        raise ImageTooLargeError(
            f"{w}x{h} = {w * h / 1e6:.0f} MP is over the pixel limit of {max_pixels / 1e6:.0f} MP (data.max_pixels); "
            f"store smaller images with `maevit shards write --resize-shorter 512 ...`, or raise the limit"
        )


def open_image(data: bytes) -> Image.Image:
    """Open encoded image bytes lazily (header only; pixels are decoded on first use)."""
    return Image.open(io.BytesIO(data))


def _float_to_8bit(arr: np.ndarray, full: float) -> np.ndarray:
    arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=full, neginf=0.0)
    return np.clip(np.floor(arr * (255.0 / full) + 0.5), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, scaling high bit depths instead of clipping them.

    Pillow's `convert("RGB")` clips 16-bit grayscale (modes `I;16*`, `I`) to 0..255,
    which turns a normal picture near-white, and maps float images (`F`, e.g. float
    TIFF) to black. Here 16-bit and 32-bit integer values are read as 0..65535, float
    values as 0..1 (or 0..255 / 0..65535 when they go beyond 1 / 255), and both are
    scaled to 0..255 (rounded). 16-bit RGB(A) PNGs already open as 8-bit RGB(A) in Pillow
    (the high byte of each value), which is the same scaling up to rounding.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "F") or mode.startswith("I;16"):
        arr = np.asarray(img)  # [H, W] uint16 / int32 / float32
        if mode == "F":
            peak = float(np.nanmax(arr, initial=0.0)) if arr.size else 0.0
            full = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0
        else:
            full = 65535.0
        gray = _float_to_8bit(arr, full)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")
    return img.convert("RGB")


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 tensor `[3, H, W]` (RGB)."""
    img = to_rgb(img)
    arr = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 tensor `[3, H, W]` (RGB)."""
    return _pil_to_tensor(img)


def draft_box(
    box: tuple[int, int, int, int], full_size: tuple[int, int], out_size: tuple[int, int]
) -> tuple[tuple[int, int, int, int], int]:
    """The reduced-decode scale for a crop, and the crop snapped to that scale's pixel grid.

    JPEG DCT scaling decodes at 1/2, 1/4 or 1/8 size, where reduced pixel k covers
    full pixels [k*s, (k+1)*s). The largest s that keeps the crop at least
    `out_size` is used; the box is moved to multiples of s (by < s full pixels,
    which is < 1 output pixel since the crop is >= s * output), so the reduced
    image holds exactly the box's region and no sub-pixel resampling is needed.

    Args:
        box: (top, left, h, w) in full-resolution pixels.
        full_size: image (width, height).
        out_size: output (height, width).

    Returns:
        (snapped box, s); s == 1 and the box unchanged when no reduction applies.
    """
    top, left, h, w = box
    full_w, full_h = full_size
    out_h, out_w = out_size
    s = next((s for s in (8, 4, 2) if w >= s * out_w and h >= s * out_h), 1)
    if s == 1:
        return box, 1
    t, l = round(top / s) * s, round(left / s) * s
    hh, ww = max(s, round(h / s) * s), max(s, round(w / s) * s)
    t, l = min(t, (full_h - hh) // s * s), min(l, (full_w - ww) // s * s)
    return (max(t, 0), max(l, 0), hh, ww), s


def decode_crop(
    data: bytes,
    box: tuple[int, int, int, int],
    out_size: tuple[int, int],
    draft: bool = True,
    img: Image.Image | None = None,
) -> torch.Tensor:
    """Decode the region `box = (top, left, h, w)` of an image, resized to `out_size = (H, W)`.

    Returns uint8 `[3, H, W]`. With `draft=True`, a JPEG whose crop is at least
    twice the output on both sides is decoded at reduced DCT scale (PIL draft mode),
    with the box snapped to that scale's grid (`draft_box`). Otherwise JPEGs are
    decoded with `torchvision.io.decode_jpeg` (libjpeg-turbo, faster than PIL) and
    other formats with PIL. The crop is resized with torchvision's antialiased
    bicubic uint8 kernel (several times faster than PIL's `resize` here).

    Args:
        data: encoded image bytes.
        box: crop in full-resolution pixels.
        out_size: output (height, width).
        draft: allow reduced-scale JPEG decoding.
        img: `data` already opened with `open_image` (header read, pixels not loaded), if at hand.
    """
    import torchvision.transforms.v2.functional as TF

    img = open_image(data) if img is None else img
    full_w, full_h = img.size
    out_h, out_w = out_size
    x = None  # [3, H', W'] uint8
    if img.format == "JPEG" and draft:
        dbox, s = draft_box(box, (full_w, full_h), out_size)
        if s > 1:
            # PIL picks the largest power-of-two reduction keeping the image >= the request.
            img.draft("RGB", (full_w // s, full_h // s))
            if img.size == (math.ceil(full_w / s), math.ceil(full_h / s)):
                x = _pil_to_tensor(img)
                box = tuple(v // s for v in dbox)
            else:  # PIL chose another scale (not expected): decode in full below
                img = open_image(data)
    if x is None and img.format == "JPEG":
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            x = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            x = None  # let PIL decode it, or raise its clearer error
    if x is None:
        x = _pil_to_tensor(img)
    top, left, h, w = box
    crop = x[:, top:top + h, left:left + w]  # [3, h, w] view
    return TF.resize(crop, [out_h, out_w], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)


def normalize_batch(
    images: torch.Tensor | Sequence[torch.Tensor], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 images (`[B, 3, H, W]` or a list of `[3, H, W]`) -> normalized float32 `[B, 3, H, W]`.

    Writes each image straight into one preallocated batch with a fused
    `(x - 255*mean) * 1/(255*std)`, while it is still in cache: the obvious
    `stack(...).float().sub(m).div(s)` allocates and streams through three more
    batch-sized buffers and was a third of the pretraining loader's time.
    """
    first = images[0]
    out = torch.empty((len(images), *first.shape), dtype=torch.float32)  # [B, 3, H, W]
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) * 255  # [3, 1, 1]
    inv_s = 1.0 / (torch.tensor(std, dtype=torch.float32).view(-1, 1, 1) * 255)
    for i, img in enumerate(images):
        torch.sub(img, m, out=out[i]).mul_(inv_s)
    return out


class PretrainTransform:
    """MAE pretraining augmentation on encoded bytes: crop-aware RandomResizedCrop + flip.

    Returns uint8 `[3, H, W]`; normalization happens once per batch (`normalize_batch`).

    Args:
        img_size: output size (int or (H, W)).
        scale: RandomResizedCrop area range (MAE: (0.2, 1.0)).
        ratio: aspect-ratio range.
        hflip: probability of a horizontal flip.
        draft: crop-aware reduced-scale JPEG decoding.
    """

    def __init__(
        self,
        img_size: int | Sequence[int],
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        draft: bool = True,
    ) -> None:
        self.out_size = to_2tuple(img_size)
        self.scale, self.ratio, self.hflip, self.draft = tuple(scale), tuple(ratio), hflip, draft

    def __call__(self, data: bytes, rng: np.random.Generator, img: Image.Image | None = None) -> torch.Tensor:
        """`img`: `data` already opened with `open_image` (header read, pixels not loaded), if at hand."""
        img = open_image(data) if img is None else img  # header only: the crop is chosen before decoding
        box = rrc_params(*img.size, rng, self.scale, self.ratio)
        flip = rng.random() < self.hflip
        out = decode_crop(data, box, self.out_size, draft=self.draft, img=img)  # [3, H, W] uint8
        return out.flip(-1) if flip else out


def labeled_transform(
    img_size: int | Sequence[int],
    train: bool,
    *,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    re_prob: float = 0.25,
    color_jitter: float | None = None,
    scale: tuple[float, float] | None = None,
    hflip: float = 0.5,
    interpolation: str = "bicubic",
    crop_pct: float | None = None,
    **timm_kwargs: Any,
) -> Callable[[Image.Image], torch.Tensor]:
    """Fine-tune (train=True) or eval (train=False) transform: PIL RGB -> normalized `[3, H, W]`.

    Thin wrapper over `timm.data.create_transform` with the MAE fine-tuning
    defaults (RandAugment m9, random erasing 0.25, bicubic); eval is resize to
    `img_size / crop_pct` + center crop.

    Args:
        img_size: output size.
        train: augmentation (True) or deterministic resize + center crop (False).
        mean, std: normalization.
        auto_augment: timm auto-augment spec, or None to disable.
        re_prob: random-erasing probability.
        color_jitter: color jitter strength (None: off, as MAE does with RandAugment).
        scale: RandomResizedCrop scale range (timm default (0.08, 1.0)).
        hflip: horizontal flip probability.
        interpolation: resize interpolation.
        crop_pct: eval center-crop fraction (timm default 0.875).
        **timm_kwargs: passed to `create_transform`.
    """
    from timm.data import create_transform

    h, w = to_2tuple(img_size)
    if train:
        transform = create_transform(
            (3, h, w), is_training=True, auto_augment=auto_augment, re_prob=re_prob,
            re_mode="pixel", color_jitter=color_jitter, scale=scale, hflip=hflip,
            interpolation=interpolation, mean=tuple(mean), std=tuple(std), **timm_kwargs,
        )
        return _patch_posterize(transform)
    return create_transform(
        (3, h, w), is_training=False, interpolation=interpolation, crop_pct=crop_pct,
        mean=tuple(mean), std=tuple(std), **timm_kwargs,
    )


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's ``posterize`` op, also for 0 bits (an all-black image).

    timm's RandAugment ``PosterizeIncreasing`` asks for 4 - level x 4/10 bits, i.e.
    0 bits at magnitude 10, which ``rand-m9-mstd0.5`` reaches now and then; Pillow
    >= 10 rejects 0 bits with a ValueError ("bits must be between or equal to 1
    and 8") that would otherwise kill or skip the sample.
    """
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # keeping no bit zeroes every pixel
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform: Any) -> Any:
    """Swap :func:`posterize_any_bits` into the posterize ops of timm's RandAugment / AutoAugment."""
    from timm.data.auto_augment import posterize

    for t in getattr(transform, "transforms", ()):
        for op in getattr(t, "ops", ()) or getattr(t, "policy", ()):
            for sub in op if isinstance(op, (list, tuple)) else (op,):  # AutoAugment: lists of ops
                if getattr(sub, "aug_fn", None) is posterize:
                    sub.aug_fn = posterize_any_bits
    return transform


def apply_seeded(transform: Callable[[Any], torch.Tensor], img: Any, seed: int) -> torch.Tensor:
    """Run a transform that draws from global `random` / `numpy` / `torch` RNGs with a fixed per-sample seed.

    The global states are restored afterwards so data loading in the main process
    (num_workers=0) never perturbs the training RNG.

    Args:
        transform: e.g. a timm / torchvision transform.
        img: its input.
        seed: per-sample seed.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)  # timm's RandAugment picks its ops with np.random
        # the CPU generator only (what fork_rng(devices=[]) restores): torch.manual_seed would also seed
        # every accelerator backend, and on a CUDA build without a GPU each call queues a formatted stack
        # trace for a later lazy CUDA init (1.6 ms per image, and a list that grows for the whole run)
        torch.default_generator.manual_seed(seed)
        try:
            return transform(img)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
