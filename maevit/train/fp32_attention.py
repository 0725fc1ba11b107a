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


def _bf16_attention(query: Any) -> bool:
    """Whether this attention call would run in bf16: bf16 inputs, or CPU bf16 autocast."""
    if not torch.is_tensor(query) or not query.is_floating_point():
        return False
    return query.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled(query.device.type)
        and torch.get_autocast_dtype(query.device.type) == torch.bfloat16)


def _to_fp32(x: Any) -> Any:
    return x.float() if torch.is_tensor(x) and x.dtype == torch.bfloat16 else x


class Fp32Attention(TorchFunctionMode):
    """While active, ``F.scaled_dot_product_attention`` on bf16 inputs (or under bf16 autocast) casts its
    floating inputs to fp32, runs with autocast off, and returns bf16 again: the same dtypes for the
    code around it, the fp32 kernel inside (its backward, too, is the fp32 one). Other calls pass through."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and _bf16_attention(args[0] if args else kwargs.get("query")):
            device = (args[0] if args else kwargs["query"]).device.type
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
