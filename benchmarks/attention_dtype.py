"""CPU attention, forward + backward, at MAE's shapes: fp32 vs bf16 (flash and math kernels) vs bf16 computed in fp32.

The numbers behind ``maevit/train/fp32_attention.py``: on a CPU without AMX, is the bf16 attention kernel
slower than the fp32 one? Each variant is timed alone (median of ``--reps`` after one warm-up call); the
shapes are (batch, heads, tokens, head dim) of MAE's visible-only encoders and full decoders.

    python benchmarks/attention_dtype.py --threads 1
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from maevit.train.fp32_attention import Fp32Attention

# (batch, heads, tokens, head dim)
SHAPES = {
    "ViT-Tiny/16 encoder, 224 px, 25% visible (batch 32)": (32, 3, 50, 64),
    "its decoder 128 x 4 heads, 197 tokens": (32, 4, 197, 32),
    "demo encoder, 32 px patch 4 (batch 64)": (64, 3, 17, 64),
    "demo decoder, 65 tokens": (64, 4, 65, 32),
    "ViT-B/16 encoder, 224 px, 25% visible (batch 8)": (8, 12, 50, 64),
    "its decoder 512 x 16 heads, 197 tokens": (8, 16, 197, 32),
}


def time_attention(shape: tuple[int, int, int, int], dtype: torch.dtype, variant: str, reps: int) -> float:
    """Median milliseconds of one forward + backward."""
    q, k, v = (torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(*shape, dtype=dtype)

    def call() -> None:
        if variant == "fp32 inside":
            with Fp32Attention():
                out = F.scaled_dot_product_attention(q, k, v)
        else:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION if variant == "flash" else SDPBackend.MATH):
                out = F.scaled_dot_product_attention(q, k, v)
        out.backward(grad)

    call()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; ms per forward + backward (median)")
    print("| shape (B, heads, tokens, head dim) | fp32 flash | fp32 math | bf16 flash | bf16 math | bf16 in, fp32 inside "
          "(maevit) |")
    print("|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        cells = [time_attention(shape, torch.float32, v, a.reps) for v in ("flash", "math")]
        cells += [time_attention(shape, torch.bfloat16, v, a.reps) for v in ("flash", "math", "fp32 inside")]
        print(f"| {name} {shape} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
