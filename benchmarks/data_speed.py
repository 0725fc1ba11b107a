"""Images/s per core: maevit's pretraining stream from shards vs torchvision ImageFolder + PIL.

Both sides run the same augmentation (RandomResizedCrop(224, scale 0.2-1, bicubic) +
flip + normalize) on the same JPEGs, each in one process with one thread
(`num_workers=0`, `torch.set_num_threads(1)`), so images/s is images/s per core.
Two rates are printed: per wall-clock second and per CPU second of the process
(robust when other jobs share the cores). Runs alternate (A, B, A, B, ...);
medians are reported, and speed-ups are medians of the paired ratios.

Images: CIFAR-10 JPEGs upscaled (bicubic) to a random size with the shorter side
in [420, 560] (`--short-side`) and aspect 1-1.5, saved at JPEG quality 90 (from
`../shared/data/cifar10-jpg.tar.gz` when present, otherwise procedural images).

    python benchmarks/data_speed.py --images 1024 --repeats 5 [--short-side 420 560] [--workdir /tmp/maevit-bench]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"


def make_images(folder: Path, n: int, short_side: tuple[int, int] = (420, 560), seed: int = 0) -> None:
    """n upscaled JPEGs in `folder/<class>/` (ImageFolder layout), shorter side in `short_side`."""
    if folder.exists() and sum(1 for _ in folder.rglob("*.jpg")) == n:
        return
    rng = np.random.default_rng(seed)
    sources: list[tuple[str, Image.Image]] = []
    if CIFAR.exists():
        with tarfile.open(CIFAR) as tf:
            for m in tf:
                if m.isreg() and m.name.endswith(".jpg") and "/train/" in f"/{m.name}":
                    cls = m.name.split("/")[-2]
                    sources.append((cls, Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")))
                    if len(sources) == n:
                        break
    else:  # procedural fallback
        from maevit.data.bundled import CLASSES, render

        sources = [(CLASSES[i % 10], Image.fromarray(render(CLASSES[i % 10], rng))) for i in range(n)]
    for i, (cls, img) in enumerate(sources):
        short = int(rng.integers(short_side[0], short_side[1] + 1))
        aspect = float(rng.uniform(1.0, 1.5))
        size = (int(short * aspect), short) if rng.random() < 0.5 else (short, int(short * aspect))
        (folder / cls).mkdir(parents=True, exist_ok=True)
        img.resize(size, Image.BICUBIC).save(folder / cls / f"{i:05d}.jpg", quality=90)


def bench_torchvision(folder: Path, img_size: int, batch_size: int, limit: int) -> tuple[float, float]:
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ])
    ds = datasets.ImageFolder(str(folder), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True)
    return _time(((x for x, _ in loader)), limit)


def bench_maevit(
    shards: Path, img_size: int, batch_size: int, limit: int, draft: bool = True
) -> tuple[float, float]:
    from maevit.data import pretrain_loader

    loader = pretrain_loader(str(shards), img_size=img_size, batch_size=batch_size, num_workers=0, draft=draft)
    return _time(iter(loader), limit)


def _time(batches, limit: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process)."""
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    for x in batches:
        assert x.ndim == 4 and x.dtype == torch.float32
        n += x.shape[0]
        if n >= limit:
            break
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--short-side", type=int, nargs=2, default=(420, 560), metavar=("MIN", "MAX"))
    p.add_argument("--workdir", default="/tmp/maevit-bench")
    p.add_argument("--no-draft-run", action="store_true", help="skip the maevit run without draft decoding")
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(args.workdir)
    folder, shards = work / "images", work / "shards"
    make_images(folder, args.images, tuple(args.short_side))
    if not (shards / "dataset.json").exists() or json.loads((shards / "dataset.json").read_text())["total"] != args.images:
        from maevit.data.shards import write_shards

        write_shards(str(folder), shards, samples_per_shard=250, progress=False, overwrite=True)
    limit = args.images - args.images % args.batch_size
    names = ["torchvision ImageFolder+PIL", "maevit stream (draft)"] + ([] if args.no_draft_run else
                                                                      ["maevit stream (no draft)"])
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
    for r in range(args.repeats):  # alternate, so load changes hit every contender alike
        runs[names[0]].append(bench_torchvision(folder, args.img_size, args.batch_size, limit))
        runs[names[1]].append(bench_maevit(shards, args.img_size, args.batch_size, limit))
        if len(names) > 2:
            runs[names[2]].append(bench_maevit(shards, args.img_size, args.batch_size, limit, draft=False))
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1][0]:.0f}/s wall {v[-1][1]:.0f}/s cpu"
                                          for k, v in runs.items()), flush=True)
    base = runs[names[0]]
    print(f"\nimages/s per core: median of {args.repeats} alternating runs ({limit} images each, "
          f"{args.img_size}px, 1 thread, num_workers=0, {os.cpu_count()} cores on the machine)")
    print(f"  {'':<30} {'wall':>8} {'CPU':>8}  {'x wall':>7} {'x CPU':>7}  (ratios: median of paired runs)")
    summary = {}
    for k, v in runs.items():
        wall, cpu = statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)
        rw = statistics.median(x[0] / b[0] for x, b in zip(v, base))
        rc = statistics.median(x[1] / b[1] for x, b in zip(v, base))
        summary[k] = {"wall": wall, "cpu": cpu, "ratio_wall": rw, "ratio_cpu": rc}
        print(f"  {k:<30} {wall:8.1f} {cpu:8.1f}  {rw:7.2f} {rc:7.2f}")
    print(json.dumps({"summary": summary, "runs": runs}))


if __name__ == "__main__":
    main()
