"""Eager vs regional vs whole-model ``torch.compile`` of one training step (forward, backward, fused AdamW),
side by side in one process, on the demo's models or MAE ViT-Tiny/16 at 224 px.

    python benchmarks/compile_speed.py mae       # the demo's MAE (ViT 192 x 4, patch 4, 32 px), batch 64
    python benchmarks/compile_speed.py cls       # the demo's fine-tuning classifier, batch 64
    python benchmarks/compile_speed.py mae224    # MAE ViT-Tiny/16, 224 px, decoder 128 x 4, batch 32
    python benchmarks/compile_speed.py mae --variants eager regional --threads 1

Prints the time of the first two steps (compilation) and, after them, images/s of each variant as the
median of ``--rounds`` rounds of two steps (variants alternate, the order reversing every round), relative
to eager.
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import timm
import torch
import torch.nn.functional as F

from maevit.models import create_mae
from maevit.train.perf import compile_blocks


def build(kind: str):
    """(model, images, loss function) of one kind."""
    if kind == "mae":
        model = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=4, depth=4, decoder_embed_dim=128,
                           decoder_depth=2, decoder_num_heads=4)
        x = torch.randn(64, 3, 32, 32)
        return model, x, lambda m: m(x).loss
    if kind == "mae224":
        model = create_mae("mae_vit_tiny_patch16", img_size=224, decoder_embed_dim=128, decoder_num_heads=4)
        x = torch.randn(32, 3, 224, 224)
        return model, x, lambda m: m(x).loss
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4, num_classes=10,
                              global_pool="avg", drop_path_rate=0.1)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    return model, x, lambda m: F.cross_entropy(m(x), y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("mae", "cls", "mae224"))
    p.add_argument("--variants", nargs="+", default=["eager", "regional", "whole"],
                   choices=("eager", "regional", "whole"))
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    base, x, loss_of = build(a.kind)
    steps = {}
    for name in a.variants:
        model = copy.deepcopy(base)
        if name == "regional":
            compile_blocks(model)
        elif name == "whole":
            model = torch.compile(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step(model=model, opt=opt) -> None:
            loss_of(model).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t = time.perf_counter()
        step(), step()
        print(f"{name}: first 2 steps {time.perf_counter() - t:.1f} s", flush=True)
        steps[name] = step
    times = {k: [] for k in steps}
    for r in range(a.rounds):
        for k in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            t = time.perf_counter()
            steps[k](), steps[k]()
            times[k].append((time.perf_counter() - t) / 2)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    ref = med[a.variants[0]]
    for k, v in med.items():
        print(f"{k}: {x.shape[0] / v:.1f} images/s, {ref / v:.2f}x {a.variants[0]} ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
