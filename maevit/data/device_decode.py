"""JPEG decoding on the training device, after the crop is chosen on the CPU (``data.decode=device``).

MAE ViT-B on a recent GPU consumes thousands of images per second, more than a
handful of CPU cores decode (``REFERENCES``: ~390 JPEGs/s per core with
libjpeg-turbo). In this mode the loader workers do not decode JPEGs: they read
the bytes, parse the header, and draw the RandomResizedCrop box and the flip
exactly as the CPU path does (same per-sample generator, so the stream, its
resume and its augmentation are unchanged); the batch then travels as encoded
bytes, and ``batch.to(device)`` decodes all JPEGs in one call of torchvision's
batched ``decode_jpeg`` on that device (nvJPEG on CUDA), crops, resizes
(antialiased bicubic), flips and normalizes there. PNG / WebP / other formats,
and JPEGs the device decoder rejects (e.g. CMYK), are decoded on the CPU as usual.

The decode costs device time that the model no longer gets (nvJPEG decodes
several thousand ImageNet-size JPEGs/s on an A100-class GPU), so it pays only
when the loader is the bottleneck (``data_wait`` in ``metrics.jsonl``).
Shards written with ``maevit shards write --resize-shorter 320`` (a few times
fewer pixels per image than ImageNet's originals) cut the cost of either path.

On a CPU device the same code decodes in the main process, which the tests use
to check that it reproduces the worker path exactly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .transforms import PretrainTransform, normalize_batch, open_image, rrc_params

log = logging.getLogger(__name__)


@dataclass
class DeferredCrop:
    """One JPEG still encoded, with its augmentation already drawn.

    Attributes:
        data: the encoded bytes, uint8 ``[N]``.
        box: RandomResizedCrop box ``(top, left, h, w)`` in full-image pixels.
        flip: horizontal flip.
    """

    data: torch.Tensor
    box: tuple[int, int, int, int]
    flip: bool


class DeferredBatch:
    """A pretraining batch whose JPEGs are decoded by ``.to(device)``.

    Holds the encoded JPEGs packed into one byte tensor (one shared-memory buffer
    between processes, not one per image) with their crop boxes and flips, and the
    images the worker decoded itself (non-JPEG formats) as one uint8 tensor.
    ``.to(device)`` returns the normalized float32 batch ``[B, 3, H, W]`` on
    ``device``, like the tensor the CPU path yields.

    Args:
        items: per image, a :class:`DeferredCrop` or a decoded uint8 ``[3, H, W]``.
        out_size: ``(H, W)``.
        mean, std: normalization.
    """

    def __init__(self, items: Sequence[DeferredCrop | torch.Tensor], out_size: tuple[int, int],
                 mean: Sequence[float], std: Sequence[float]) -> None:
        jobs = [(i, x) for i, x in enumerate(items) if isinstance(x, DeferredCrop)]
        done = [(i, x) for i, x in enumerate(items) if not isinstance(x, DeferredCrop)]
        self.size, self.out_size, self.mean, self.std = len(items), tuple(out_size), tuple(mean), tuple(std)
        self.jpeg_index = [i for i, _ in jobs]
        self.offsets = np.cumsum([0] + [len(x.data) for _, x in jobs]).tolist()
        self.data = torch.cat([x.data for _, x in jobs]) if jobs else torch.zeros(0, dtype=torch.uint8)  # [N]
        self.boxes = [x.box for _, x in jobs]
        self.flips = [x.flip for _, x in jobs]
        self.decoded_index = [i for i, _ in done]
        self.decoded = (torch.stack([x for _, x in done]) if done
                        else torch.zeros(0, 3, *self.out_size, dtype=torch.uint8))  # [M, 3, H, W]

    def __len__(self) -> int:
        return self.size

    def pin_memory(self) -> "DeferredBatch":
        """Pin the host buffers (the DataLoader calls this with ``pin_memory=True``)."""
        self.data, self.decoded = self.data.pin_memory(), self.decoded.pin_memory()
        return self

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        """Decode, crop, resize, flip and normalize on ``device`` -> float32 ``[B, 3, H, W]``."""
        import torchvision.transforms.v2.functional as TF

        device = torch.device(device)
        datas = [self.data[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]
        decoded = _decode_jpegs(datas, device)  # [3, H_i, W_i] uint8 on device, or None
        out = torch.empty((self.size, 3, *self.out_size), dtype=torch.float32, device=device)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(-1, 1, 1) * 255
        inv_std = 1.0 / (torch.tensor(self.std, dtype=torch.float32, device=device).view(-1, 1, 1) * 255)
        failed = []
        for i, full, data, (top, left, h, w), flip in zip(self.jpeg_index, decoded, datas, self.boxes, self.flips):
            if full is None:  # the device decoder refused it: decode on the CPU, as the workers would
                try:
                    full = _decode_on_cpu(data).to(device, non_blocking=non_blocking)
                except Exception:  # corrupt beyond its header (which the worker read)
                    failed.append(i)
                    continue
            crop = full[:, top:top + h, left:left + w]  # [3, h, w]
            if device.type == "cpu":  # torchvision's uint8 kernel, as the worker path (bit-identical)
                img = TF.resize(crop, list(self.out_size), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
            else:  # antialiased uint8 resizing is CPU-only: float, then round like the uint8 result
                img = TF.resize(crop.float(), list(self.out_size), interpolation=TF.InterpolationMode.BICUBIC,
                                antialias=True).round_().clamp_(0, 255)
            if flip:
                img = img.flip(-1)
            torch.sub(img, mean, out=out[i]).mul_(inv_std)
        if self.decoded_index:  # images the workers decoded (other formats)
            rest = self.decoded.to(device, non_blocking=non_blocking)  # [M, 3, H, W] uint8
            out[self.decoded_index] = (rest - mean) * inv_std
        if failed:  # as the worker path does with corrupt images: copies of good images of the batch
            good = [i for i in range(self.size) if i not in set(failed)]
            if not good:
                raise RuntimeError(f"none of the {self.size} images of this batch could be decoded")
            log.warning("%d JPEG(s) in a batch could not be decoded (on %s or the CPU): replaced by copies of "
                        "other images of the batch; `maevit shards check` finds them", len(failed), device)
            for k, i in enumerate(failed):
                out[i] = out[good[k % len(good)]]
        return out


def _decode_on_cpu(data: torch.Tensor) -> torch.Tensor:
    from .transforms import pil_to_uint8

    return pil_to_uint8(open_image(data.numpy().tobytes()).convert("RGB"))


def _decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Batched ``decode_jpeg`` on ``device``; on failure, one by one (None where it fails)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    try:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, TypeError) as exn:  # one bad image fails the batch; old torchvision: no lists
        log.debug("batched decode_jpeg on %s failed (%s); decoding one by one", device, exn)
    out: list[torch.Tensor | None] = []
    for d in datas:
        try:
            out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out.append(None)
    return out


class DeviceDecodeTransform(PretrainTransform):
    """:class:`PretrainTransform` that leaves JPEGs encoded (with their crop and flip drawn).

    The random draws are the CPU path's, in the same order, so a sample gets the same
    crop box and flip in both modes (draft-mode decoding does not apply here).
    """

    def __call__(self, data: bytes, rng: np.random.Generator,
                 img: Image.Image | None = None) -> DeferredCrop | torch.Tensor:
        img = open_image(data) if img is None else img  # header only: a broken header is bad data, counted
        if img.format != "JPEG":
            return super().__call__(data, rng, img=img)
        box = rrc_params(*img.size, rng, self.scale, self.ratio)
        flip = bool(rng.random() < self.hflip)
        return DeferredCrop(torch.frombuffer(bytearray(data), dtype=torch.uint8), box, flip)

    def collate(self, images: list[DeferredCrop | torch.Tensor], mean: Sequence[float],
                std: Sequence[float]) -> DeferredBatch | torch.Tensor:
        """The batch the loader yields: a :class:`DeferredBatch`, or a plain tensor without JPEGs."""
        if not any(isinstance(x, DeferredCrop) for x in images):
            return normalize_batch(images, mean, std)
        return DeferredBatch(images, self.out_size, mean, std)
