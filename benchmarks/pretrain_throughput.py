"""Steady-state pretraining throughput: `maevit pretrain` (data + model) vs the model alone.

    python benchmarks/pretrain_throughput.py pretrain/cifar10_vit_tiny.yaml \
        data.train=/tmp/cifar10/train data.batch_size=64 optim.accum_steps=1 run.precision=fp32

The model-alone loop runs the same forward / backward / AdamW step on one batch
held in memory, at the same precision (`run.precision=auto` is resolved once, here,
and used by both); `maevit pretrain` adds the data stream, the schedule, the
device-side loss bookkeeping and the non-finite guard. Both skip the first
`--warmup` steps. Prints one JSON line (with the pipeline's `data_wait` per window).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import nullcontext

import torch

from maevit.config import load_config
from maevit.models import create_mae
from maevit.train import precision as throughput, runs
from maevit.train.optim import build_adamw
from maevit.train.pretrain import PretrainConfig, train


def model_alone(cfg: PretrainConfig, warmup: int, steps: int) -> list[float]:
    """Images/s of each window of `warmup` steps after the first (same windows as the pipeline's rows)."""
    torch.manual_seed(0)
    model = create_mae(cfg.model.name, **cfg.model.overrides())
    opt = build_adamw(model, 1e-4, cfg.optim.weight_decay)
    imgs = torch.randn(cfg.data.batch_size, 3, cfg.model.img_size, cfg.model.img_size)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.run.precision == "bf16" else nullcontext()
    rates, t0 = [], time.perf_counter()
    for i in range(1, warmup + steps + 1):
        with autocast:
            loss = model(imgs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i % warmup == 0:
            t1 = time.perf_counter()
            rates.append(warmup * cfg.data.batch_size / (t1 - t0))
            t0 = t1
    return rates[1:]


def full_pipeline(cfg: PretrainConfig, warmup: int, steps: int, waits: list[float]) -> list[float]:
    with tempfile.TemporaryDirectory() as d:
        # rows every `warmup` steps: the first window holds start-up, the rest are steady state
        cfg.run.dir, cfg.run.log_every, cfg.optim.max_steps = d, warmup, warmup + steps
        cfg.run.viz_every, cfg.run.ckpt_every, cfg.run.progress = 0, 10**9, False
        train(cfg)
        rows = runs.read_metrics(f"{d}/metrics.jsonl")
    rows = [r for r in rows if r["step"] > warmup]  # rows after the warm-up window
    waits += [r["data_wait"] for r in rows]
    return [r["images_per_sec"] for r in rows]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2, help="alternate the two measurements this many times")
    a = p.parse_args()
    base = load_config(PretrainConfig, a.recipe, a.overrides)
    choice = throughput.resolve_precision(base.run.precision, device="cpu")
    print(f"# precision {base.run.precision} -> {choice}")

    def cfg() -> PretrainConfig:  # a fresh config per measurement, at the resolved precision
        c = load_config(PretrainConfig, a.recipe, a.overrides)
        c.run.precision = choice.precision
        return c

    alone, full, waits = [], [], []
    for _ in range(a.repeats):  # interleaved, so load changes on a shared machine hit both
        alone += model_alone(cfg(), a.warmup, a.steps)
        full += full_pipeline(cfg(), a.warmup, a.steps, waits)
    med = lambda x: sorted(x)[len(x) // 2]  # noqa: E731
    print(json.dumps({
        "threads": torch.get_num_threads(), "batch": cfg().data.batch_size, "precision": choice.precision,
        "model_alone_img_s": [round(x, 1) for x in alone], "pretrain_img_s": [round(x, 1) for x in full],
        "gap_pct_best": round(100 * (1 - max(full) / max(alone)), 1),
        "gap_pct_median": round(100 * (1 - med(full) / med(alone)), 1),
        "data_wait": waits,
    }))


if __name__ == "__main__":
    main()
