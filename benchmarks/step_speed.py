"""Train-step throughput: maevit MAE vs Hugging Face ViTMAEForPreTraining, same model and weights.

Both models get the same architecture, the same weights (copied through the
converter), the same batch, the same mask noise every step, and the same AdamW.
The two are timed in alternating rounds inside one process (A B, B A, ...) so
that background load drifts hit both alike; the result is the median step time
over all timed steps of each model.

    .venv/bin/python benchmarks/step_speed.py --model mae_vit_tiny_patch16 --img-size 224 --batch-size 32
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from contextlib import nullcontext

import torch

from maevit import create_mae
from maevit.models.hf_vitmae import hf_vitmae_config, to_hf_vitmae_keys


def hf_twin(model: torch.nn.Module, attn: str = "sdpa") -> torch.nn.Module:
    """A ``ViTMAEForPreTraining`` with ``model``'s architecture and weights (square images only)."""
    from transformers import ViTMAEForPreTraining

    h, w = model.encoder.patch_embed.img_size
    if h != w:
        raise SystemExit("HF ViTMAE supports square images only; use a square --img-size")
    cfg = hf_vitmae_config(model, attn)
    hf = ViTMAEForPreTraining(cfg)
    hf.load_state_dict(to_hf_vitmae_keys(model.state_dict(), layout="transformers5"), strict=True)
    return hf


def make_step(model, forward, device: torch.device, dtype: str):
    """One optimizer step: forward, loss, backward, AdamW (MAE's pretraining hyper-parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    )

    def step(imgs: torch.Tensor, noise: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = forward(imgs, noise)
        loss.backward()
        opt.step()
        return loss.item()  # .item() also waits for the device

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mae_vit_tiny_patch16")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before the first round")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast (cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="HF attention implementation")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    ours = create_mae(args.model, img_size=args.img_size).to(device)
    hf = hf_twin(ours, args.attn).to(device)
    ours.train(), hf.train()
    runners = {
        "maevit": make_step(ours, lambda x, n: ours(x, noise=n).loss, device, args.dtype),
        "hf_vitmae": make_step(hf, lambda x, n: hf(pixel_values=x, noise=n).loss, device, args.dtype),
    }
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randn(args.batch_size, ours.encoder.in_chans, args.img_size, args.img_size, generator=gen).to(device)

    def noise() -> torch.Tensor:
        return torch.rand(args.batch_size, ours.num_patches, generator=gen).to(device)

    def timed(name: str, n: torch.Tensor) -> float:
        t0 = time.perf_counter()
        runners[name](imgs, n)
        return time.perf_counter() - t0

    load0 = os.getloadavg()
    for _ in range(args.warmup):
        n = noise()
        for name in runners:
            timed(name, n)
    times: dict[str, list[float]] = {name: [] for name in runners}
    per_round = []
    order = list(runners)
    for r in range(args.rounds):
        noises = [noise() for _ in range(args.steps)]  # the same masks for both models
        for name in order if r % 2 == 0 else order[::-1]:
            times[name].extend(timed(name, n) for n in noises)
        per_round.append(
            statistics.median(times["hf_vitmae"][-args.steps:]) / statistics.median(times["maevit"][-args.steps:])
        )
    load1 = os.getloadavg()

    print(f"# {args.model} img {args.img_size} batch {args.batch_size} {args.dtype} on {device} "
          f"({platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    print(f"# {args.rounds} rounds x {args.steps} steps per model after {args.warmup} warm-up; "
          f"load average {load0[0]:.1f} -> {load1[0]:.1f}")
    print("| model | median step (s) | min step (s) | images/s (median) |")
    print("|---|---|---|---|")
    med = {}
    for name, ts in times.items():
        med[name] = statistics.median(ts)
        print(f"| {name} | {med[name]:.3f} | {min(ts):.3f} | {args.batch_size / med[name]:.1f} |")
    ratio = med["hf_vitmae"] / med["maevit"]
    print(f"\nthroughput ratio maevit / HF = {ratio:.3f} (per round: {', '.join(f'{x:.2f}' for x in per_round)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
