"""Checkpoint size and write / verify / load time of full MAE training states (BENCHMARKS.md, "Scale on paper").

Builds the MAE model (encoder + decoder), an AdamW with its state filled (one step on zero gradients),
and writes checkpoints through the training loop's own path (`maevit.train.runs.save_checkpoint`:
`accelerator.save_state`, safetensors weights, optimizer state, per-rank RNG, SHA-256 digests, fsync,
atomic rename), then loads them back (`load_checkpoint`, which checks the digests again).

    OMP_NUM_THREADS=1 python benchmarks/checkpoint_cost.py --models mae_vit_base_patch16 mae_vit_large_patch16 \
        --dir /tmp/maevit-ckpt --repeats 2
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def measure(name: str, root: Path, repeats: int) -> dict:
    import torch
    from accelerate import Accelerator

    from maevit.models import create_mae
    from maevit.train import runs

    model = create_mae(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # fills exp_avg / exp_avg_sq: the optimizer state a real checkpoint holds
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(model, opt)
    run_dir = root / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run, _ = runs.open_run(run_dir, acc)
    writes, loads = [], []
    for step in range(1, repeats + 1):
        t = time.perf_counter()
        ckpt = runs.save_checkpoint(acc, run, step, {"step": step, "epoch": 0, "batch": 0}, keep_last=1)
        writes.append(time.perf_counter() - t)
        t = time.perf_counter()
        runs.load_checkpoint(acc, ckpt)
        loads.append(time.perf_counter() - t)
    files = {f.name: f.stat().st_size for f in ckpt.iterdir() if f.is_file()}
    run.unlock()
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), "bytes": sum(files.values()),
            "files": files, "write_s": min(writes), "load_s": min(loads)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mae_vit_base_patch16", "mae_vit_large_patch16"])
    p.add_argument("--dir", default="/tmp/maevit-ckpt")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    for name in args.models:
        r = measure(name, Path(args.dir), args.repeats)
        big = {k: f"{v / 2**20:.0f} MiB" for k, v in r["files"].items() if v > 2**20}
        print(f"{r['model']}: {r['params'] / 1e6:.1f}M parameters, checkpoint {r['bytes'] / 2**30:.2f} GiB "
              f"({big}), write {r['write_s']:.1f} s ({r['bytes'] / 2**20 / r['write_s']:.0f} MiB/s), "
              f"load + verify {r['load_s']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
