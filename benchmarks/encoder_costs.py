"""Encoder costs of registered models under MAE masking, as markdown tables.

    python benchmarks/encoder_costs.py mae_vit_tiny_r_s16 mae_cvt_tiny --reference mae_vit_tiny_patch16 \
        --img-size 224 --batch-size 8 --repeats 5

For every name (the reference first):

- encoder parameters;
- encoder forward FLOPs per image (``torch.utils.flop_counter``; attention forced to the math
  kernel, since the counter does not see fused CPU attention): ``forward_masked`` at
  ``--mask-ratio`` vs ``forward_features`` on the full image;
- per part (each top-level child of the encoder; ``stages`` / ``layers`` lists one entry per stage):
  convolution FLOPs and matrix-multiply FLOPs, masked / full. A ratio near ``1 - mask_ratio`` means
  that work runs on visible units only; near 1, densely (with masking);
- CPU MAE train step (``MaskedAutoencoder`` forward + backward, no optimizer step) with the
  registered decoder: time relative to ``--reference``, and the same model with
  ``encoder_path = "mask_tokens"`` (the SimMIM-style dense path) relative to its visible path;
- per part, forward time of the mask-token path / the visible path (hooks around each part, during
  the same timed steps): > 1 where the visible path saves time.

Timing: CPU seconds of this process (``time.process_time``) with one torch thread by default, so
other jobs on a shared machine do not enter the figures (wall time with ``--clock wall``);
``--warmup`` untimed rounds, then ``--repeats`` rounds; each round times one step of every
(model, path), in an order that reverses every round, so load drifts hit all alike; medians over
rounds. Same images and the same mask noise for every step of a model.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections import defaultdict

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from maevit.models import create_mae

CONV_OPS = ("convolution",)


def parts_of(encoder: nn.Module) -> dict[str, list[nn.Module]]:
    """Named parts: top-level children, stage lists expanded (a part may be several modules)."""
    parts: dict[str, list[nn.Module]] = {}
    for name, child in encoder.named_children():
        if name in ("stages", "layers") and isinstance(child, (nn.ModuleList, nn.Sequential)):
            for i, stage in enumerate(child):
                parts[f"{name}.{i}"] = [stage]
        elif isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child):
            parts[name] = list(child)  # e.g. ViT blocks, called one by one
        elif any(True for _ in child.parameters()):
            parts[name] = [child]
    return parts


class _Call(nn.Module):
    """Calls one encoder method, so the flop counter names modules from the encoder down."""

    def __init__(self, encoder: nn.Module, method: str, mask=None) -> None:
        super().__init__()
        self.encoder, self.method, self.mask = encoder, method, mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = getattr(self.encoder, self.method)
        return fn(x) if self.mask is None else fn(x, self.mask)


def flops(mae, x: torch.Tensor, masked: bool, ratio: float) -> tuple[int, dict[str, tuple[int, int]]]:
    """Total encoder FLOPs and, per part, (conv FLOPs, other FLOPs) for one forward."""
    enc = mae.encoder
    call = _Call(enc, "forward_masked", mae.random_mask(x.shape[0], mask_ratio=ratio,
                                                        generator=torch.Generator().manual_seed(0))) \
        if masked else _Call(enc, "forward_features")
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        call(x)
    counts = fc.get_flop_counts()  # module name -> {op: flops}; a module's count includes its children's

    def conv_other(key: str) -> tuple[int, int]:
        ops = counts.get(key, {})
        conv = sum(n for op, n in ops.items() if any(c in str(op) for c in CONV_OPS))
        return conv, sum(ops.values()) - conv

    per_part = {}
    for part in parts_of(enc):
        root = f"_Call.encoder.{part}"
        if isinstance(getattr(enc, part, None), (nn.ModuleList, nn.Sequential)):  # called item by item
            keys = [k for k in counts if k.startswith(root + ".") and k.count(".") == root.count(".") + 1]
        else:
            keys = [root]
        pairs = [conv_other(k) for k in keys]
        per_part[part] = (sum(c for c, _ in pairs), sum(o for _, o in pairs))
    return fc.get_total_flops(), per_part


class PartTimer:
    """Forward time of each part (hooks before / after every module of the part)."""

    def __init__(self, encoder: nn.Module, clock=time.process_time) -> None:
        self.clock = clock
        self.times: dict[str, float] = defaultdict(float)
        self.handles = []
        for name, modules in parts_of(encoder).items():
            for m in modules:
                self.handles.append(m.register_forward_pre_hook(self._start(name)))
                self.handles.append(m.register_forward_hook(self._stop(name)))
        self._t0: dict[str, float] = {}

    def _start(self, name):
        def hook(module, args):
            self._t0[name] = self.clock()
        return hook

    def _stop(self, name):
        def hook(module, args, out):
            self.times[name] += self.clock() - self._t0[name]
        return hook

    def pop(self) -> dict[str, float]:
        out, self.times = dict(self.times), defaultdict(float)
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+", help="registered model names")
    p.add_argument("--reference", default="mae_vit_tiny_patch16", help="plain ViT of similar FLOPs")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="cpu: this process's CPU seconds (robust to other jobs); wall: elapsed seconds")
    p.add_argument("--no-timing", action="store_true", help="parameters and FLOPs only")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    names = [a.reference] + [n for n in a.names if n != a.reference]
    torch.manual_seed(0)
    maes = {n: create_mae(n, img_size=a.img_size, mask_ratio=a.mask_ratio).train() for n in names}

    x1 = torch.randn(1, 3, a.img_size, a.img_size)
    rows, part_rows = {}, []
    for n, mae in maes.items():
        fm, parts_m = flops(mae, x1, True, a.mask_ratio)
        ff, parts_f = flops(mae, x1, False, a.mask_ratio)
        rows[n] = dict(params=sum(q.numel() for q in mae.encoder.parameters()), masked=fm, full=ff)
        for part in parts_f:
            (cm, om), (cf, of) = parts_m[part], parts_f[part]
            if cf or of:
                part_rows.append((n, part, cm, cf, om, of))

    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    part_times: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    if not a.no_timing:
        imgs = torch.randn(a.batch_size, 3, a.img_size, a.img_size)
        timers = {n: PartTimer(m.encoder, clock) for n, m in maes.items()}
        noise = {n: torch.rand(a.batch_size, m.random_mask(1).unit_mask.shape[1],
                               generator=torch.Generator().manual_seed(1)) for n, m in maes.items()}
        order = [(n, path) for n in names for path in ("visible", "mask_tokens")]
        for r in range(a.warmup + a.repeats):
            for n, path in (order if r % 2 == 0 else order[::-1]):
                mae = maes[n]
                mae.encoder_path = path
                mae.zero_grad(set_to_none=True)
                timers[n].pop()
                t0 = clock()
                mae(imgs, noise=noise[n]).loss.backward()
                dt = clock() - t0
                spent = timers[n].pop()
                if r >= a.warmup:
                    times[(n, path)].append(dt)
                    for part, s in spent.items():
                        part_times[(n, part, path)].append(s)
            print(f"round {r + 1}/{a.warmup + a.repeats} done", flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nimage {a.img_size} px, mask ratio {a.mask_ratio}, batch {a.batch_size}, {a.repeats} rounds "
          f"(+{a.warmup} warm-up), {a.clock} clock, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}\n")
    print(f"| model | params (M) | enc GFLOPs masked {a.mask_ratio} | enc GFLOPs full | masked / full | "
          f"step / {a.reference} step | mask-token step / visible step |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        r = rows[n]
        rel = f"{med[(n, 'visible')] / med[(a.reference, 'visible')]:.2f}" if med else "-"
        mt = f"{med[(n, 'mask_tokens')] / med[(n, 'visible')]:.2f}" if med else "-"
        print(f"| {n} | {r['params'] / 1e6:.1f} | {r['masked'] / 1e9:.2f} | {r['full'] / 1e9:.2f} | "
              f"{r['masked'] / r['full']:.2f} | {rel} | {mt} |")
    print("\n| model | part | conv GFLOPs masked / full | matmul GFLOPs masked / full | "
          "forward time mask-token / visible |")
    print("|---|---|---|---|---|")
    for n, part, cm, cf, om, of in part_rows:
        conv = f"{cm / 1e9:.3f} / {cf / 1e9:.3f} ({cm / cf:.2f})" if cf else "-"
        mm = f"{om / 1e9:.3f} / {of / 1e9:.3f} ({om / of:.2f})" if of else "-"
        pt = "-"
        if part_times.get((n, part, "visible")):
            v = statistics.median(part_times[(n, part, "visible")])
            m = statistics.median(part_times[(n, part, "mask_tokens")])
            pt = f"{m / v:.2f}" if v > 0 else "-"
        print(f"| {n} | {part} | {conv} | {mm} | {pt} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
