"""Attention in fp32 inside a bf16 step, on CPUs whose bf16 attention kernel is slower than their fp32 one.

Measured on an AMD Zen 4 (avx512_bf16, no AMX), torch 2.14.1, one thread (BENCHMARKS.md "bf16 on a CPU with
avx512_bf16"): torch's CPU flash-attention kernel runs forward + backward **1.3-7x slower in bf16 than in
fp32** at ViT shapes (50 visible tokens x 64 per head: 21 vs 7.7 ms; a 197-token decoder: 86 vs 55 ms), and
was 40% of a bf16-autocast MAE step. With q, k, v cast to fp32 for the attention alone (the matmuls around
it stay bf16) the whole bf16 step ran 1.2-1.4x faster, and its loss came closer to fp32's.

- :func:`fp32_attention_wanted`: the rule, a pure function of the hardware (CPU, bf16, no AMX: the
  issue's AMX profile has attention at 14% of its bf16 step, so AMX CPUs keep bf16 attention; GPUs have
  bf16 flash kernels);
- :class:`Fp32Attention`: a torch-function mode that runs ``F.scaled_dot_product_attention`` in fp32. A mode
  rather than an edit of the models because the calls sit inside timm's blocks (ViT, DeiT, Swin, Hiera,
  SReT) as well as ours (CvT, windowed Swin); no torch or Accelerate setting picks an attention *dtype*
  (``torch.nn.attention.sdpa_kernel`` picks a backend, and bf16 is slow in both CPU backends);
- :func:`in_fp32_attention`: a forward wrapped in that mode (what the run's Accelerator applies).

The same holds for one convolution: a **grouped convolution with a stride** (CvT's depthwise key / value
projections at stride 2, SReT's depthwise pooling). Forward + backward, one thread, Zen 4, at CvT's CIFAR
shapes (batch 128, 64 x 16 x 16 and 192 x 8 x 8, 3x3): bf16 63-82 ms against fp32 6.5-21 ms (**3.1-12.6x
slower**), while the same convolution at stride 1 and the dense ones run 2-3x *faster* in bf16
(``/tmp``-only micro-benchmark; BENCHMARKS.md "CvT's strided depthwise convolutions"). In a bf16 CvT step
its backward took 44% of the time and the step ran no faster than fp32. So the mode runs exactly those
convolutions (``groups > 1`` and a stride above 1) in fp32 as well, on the same rule.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def fp32_attention_wanted(device_type: str, precision: str, bf16_native: Sequence[str]) -> bool:
    """Whether a run at ``precision`` on ``device_type`` computes its attention in fp32.

    Args:
        device_type: "cpu", "cuda", ...
        precision: the resolved ``run.precision`` (fp32 / bf16 / fp16).
        bf16_native: the CPU's bf16 flags (:func:`maevit.train.precision.cpu_bf16_flags`).
    """
    return device_type == "cpu" and precision == "bf16" and "amx_bf16" not in bf16_native


def _runs_in_bf16(first: Any) -> bool:
    """Whether a call whose first input is ``first`` would run in bf16: a bf16 input, or bf16 autocast."""
    if not torch.is_tensor(first) or not first.is_floating_point():
        return False
    return first.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled(first.device.type)
        and torch.get_autocast_dtype(first.device.type) == torch.bfloat16)


def _to_fp32(x: Any) -> Any:
    return x.float() if torch.is_tensor(x) and x.dtype == torch.bfloat16 else x


def _strided_grouped_conv(args: tuple, kwargs: dict) -> bool:
    """Whether ``F.conv2d(*args, **kwargs)`` is a grouped convolution with a stride above 1."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    call = dict(zip(names, args), **kwargs)
    stride = call.get("stride", 1)
    return call.get("groups", 1) > 1 and max((stride,) if isinstance(stride, int) else tuple(stride)) > 1


class Fp32Attention(TorchFunctionMode):
    """While active, ``F.scaled_dot_product_attention`` and strided grouped ``F.conv2d`` on bf16 inputs (or
    under bf16 autocast) cast their floating inputs to fp32, run with autocast off, and return bf16 again:
    the same dtypes for the code around them, the fp32 kernel inside (its backward, too, is the fp32 one).
    Other calls pass through."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        first = args[0] if args else kwargs.get("query", kwargs.get("input"))
        if ((func is F.scaled_dot_product_attention or (func is F.conv2d and _strided_grouped_conv(args, kwargs)))
                and _runs_in_bf16(first)):
            device = first.device.type
            with torch.autocast(device, enabled=False):
                out = func(*(_to_fp32(a) for a in args), **{k: _to_fp32(v) for k, v in kwargs.items()})
            return out.to(torch.bfloat16)
        return func(*args, **kwargs)


def in_fp32_attention(forward: Callable) -> Callable:
    """``forward`` run inside :class:`Fp32Attention`."""

    @functools.wraps(forward)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with Fp32Attention():
            return forward(*args, **kwargs)

    wrapped.in_fp32_attention = True
    return wrapped
