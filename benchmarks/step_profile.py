"""Where an MAE training step's time goes, fp32 vs bf16, and how far bf16 can take it on this machine.

Profiles maevit's pretraining step (forward, backward, fused AdamW; bf16 as a run uses it: autocast,
and on a CPU without AMX attention in fp32, ``maevit.train.fp32_attention``) with ``torch.profiler``
and sorts every operator's own CPU time into a few kinds: matrix products (``mm``, ``addmm``,
``bmm``, convolutions), attention kernels, copies (``copy_``: layout copies, and in bf16 autocast's
casts), norms, the optimizer, and the
rest (elementwise work, indexing, reductions). With one thread the kinds add up to the step.

Then the bound the machine sets (Amdahl): if bf16 sped up only the matrix products, by the
machine's own bf16 / fp32 matmul ratio (measured here), and left everything else as fast as in fp32,
the bf16 step would run ``fp32 step / (rest + matmul / ratio)`` times the fp32 one. A target
above that needs the rest of the step to get faster too (bf16 tensors halve the memory traffic of
elementwise work, so some of it does: the table's last column says how much).

    # the demo model (ViT 192 x 4, patch 4, 32 px, decoder 128 x 2), batch 64, one thread
    python benchmarks/step_profile.py --model mae_vit_tiny_patch16 --img-size 32 --batch-size 64 \\
        --model-args patch_size=4 depth=4 decoder_embed_dim=128 decoder_depth=2 decoder_num_heads=4
    # MAE ViT-Tiny/16 at 224 px, batch 32, decoder 128 x 4 heads (issue 23's model)
    python benchmarks/step_profile.py --model mae_vit_tiny_patch16 --batch-size 32 \\
        --model-args decoder_embed_dim=128 decoder_num_heads=4
"""
from __future__ import annotations

import argparse
import ast
import json
from contextlib import nullcontext

import torch

from maevit import create_mae
from maevit.train.fp32_attention import Fp32Attention, fp32_attention_wanted
from maevit.train.optim import build_adamw
from maevit.train.perf import matmul_tflops
from maevit.train.precision import cpu_bf16_flags

KINDS = ("matmul", "attention", "copies", "norms", "optimizer", "rest")


def kind_of(op: str) -> str:
    """The kind of a profiler operator name (``aten::addmm`` -> ``matmul``)."""
    name = op.split("::")[-1]
    if "attention" in name or "flash" in name:
        return "attention"
    if name in ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_addmm_activation") or "convolution" in name:
        return "matmul"
    if name in ("copy_", "_to_copy", "to", "_copy_from", "_copy_from_and_resize"):
        return "copies"
    if "norm" in name and "clip" not in name and "linalg" not in name:
        return "norms"
    if "adam" in name or "_foreach" in name:
        return "optimizer"
    return "rest"


def profile_step(model: torch.nn.Module, imgs: torch.Tensor, dtype: str, fp32_attention: bool,
                 steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Per kind and per operator: own CPU milliseconds per step, over ``steps`` profiled steps (after one warm-up)."""
    opt = build_adamw(model, 1.5e-4, 0.05)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast, Fp32Attention() if fp32_attention else nullcontext():
            loss = model(imgs).loss
        loss.backward()
        opt.step()

    step()  # warm-up: allocations, kernel choices
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    kinds, ops = dict.fromkeys(KINDS, 0.0), {}
    for evt in prof.key_averages():
        ms = evt.self_cpu_time_total / 1e3 / steps  # profiler times are microseconds
        if ms <= 0:
            continue
        kinds[kind_of(evt.key)] += ms
        ops[evt.key] = ms
    return kinds, ops


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mae_vit_tiny_patch16")
    p.add_argument("--model-args", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="profiled steps per precision (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the kinds add up to the step)")
    p.add_argument("--top", type=int, default=8, help="operators listed per precision")
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    overrides = {k: ast.literal_eval(v) if v[:1].isdigit() or v[:1] in "[(-" else v
                 for k, v in (kv.split("=", 1) for kv in a.model_args)}
    flags = cpu_bf16_flags()
    rates = matmul_tflops(("fp32", "bf16"))
    ratio = rates["bf16"] / rates["fp32"]
    print(f"CPU bf16 flags: {', '.join(flags) or 'none'}; matmul 1024^2, {a.threads} thread(s): fp32 "
          f"{rates['fp32']:.3f}, bf16 {rates['bf16']:.3f} TFLOP/s (ratio {ratio:.2f}x)")
    torch.manual_seed(0)
    imgs = torch.randn(a.batch_size, 3, a.img_size, a.img_size)
    results = {}
    for dtype in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = create_mae(a.model, img_size=a.img_size, **overrides).train()
        results[dtype] = profile_step(model, imgs, dtype, fp32_attention_wanted("cpu", dtype, flags), a.steps)
    (k32, ops32), (k16, ops16) = results["fp32"], results["bf16"]
    t32, t16 = sum(k32.values()), sum(k16.values())
    print(f"\n{a.model} {overrides}, {a.img_size} px, batch {a.batch_size}: own CPU ms per step, share of the step")
    print("| kind | fp32 ms | fp32 share | bf16 ms | bf16 share | bf16 / fp32 time |")
    print("|---|---|---|---|---|---|")
    for k in KINDS:
        print(f"| {k} | {k32[k]:.1f} | {100 * k32[k] / t32:.1f}% | {k16[k]:.1f} | {100 * k16[k] / t16:.1f}% | "
              f"{k16[k] / k32[k] if k32[k] else float('nan'):.2f} |")
    print(f"| **step** | {t32:.1f} | | {t16:.1f} | | **{t16 / t32:.2f}** (speed-up {t32 / t16:.2f}x) |")
    share = k32["matmul"] / t32
    bound = 1 / (1 - share + share / ratio)
    need = (1 - 1 / 2) / (1 - 1 / ratio) if ratio > 1 else float("inf")  # matmul share a 2x step needs
    print(f"\nmatmul share of the fp32 step: {100 * share:.1f}%. If bf16 sped up only the matrix products, by "
          f"this machine's {ratio:.2f}x, the bf16 step could run at most {bound:.2f}x the fp32 one (measured "
          f"{t32 / t16:.2f}x: the other kinds change too, last column). " + (f"A 2x step needs a matmul share of at least {100 * need:.0f}% at this ratio."
                                   if need <= 1 else "At this ratio no share of matmuls gives a 2x step."))
    for dtype, ops in (("fp32", ops32), ("bf16", ops16)):
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:a.top]
        total = sum(ops.values())
        print(f"\ntop operators, {dtype}: " + "; ".join(f"{n} {100 * v / total:.1f}%" for n, v in top))
    out = dict(rates=rates, ratio=ratio, fp32=k32, bf16=k16, bound=bound, speedup=t32 / t16)
    print("\n" + json.dumps(out))
    return out


if __name__ == "__main__":
    main()
