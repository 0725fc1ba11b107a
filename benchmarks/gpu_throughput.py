"""MAE pretraining throughput and MFU: maevit vs Hugging Face ViTMAE vs the published MAE code.

All three get the same architecture and the same weights (maevit's, copied into
the others), the same batch on the same device, the same precision (autocast)
and an AdamW step with MAE's hyper-parameters. maevit runs its own recipe
(fused AdamW, and with ``--compile`` its regional compile of the blocks); the
peers run as their code is written (``torch.optim.AdamW`` defaults, eager), or with
``--peers-fused-adamw`` with the same fused AdamW, which compares the models alone. The
models take turns (A B C, C B A, ...) so that drifts in load or clocks hit all
alike; each round times ``--steps`` steps with one device sync at the end (no
per-step host sync, as in training). Reported: the median over rounds of
images/s, achieved TFLOP/s and MFU (FLOPs per image from
``torch.utils.flop_counter``, identical for the three since the architecture
is; the peak from maevit's table of GPU peaks or, on CPU, a matmul measured in every
round, so that each round's MFU is taken against the peak under that round's load).

The published MAE model code (``models_mae.py`` of github.com/facebookresearch/mae)
is not part of maevit: pass a checkout with ``--mae-code DIR``. It was written for
timm 0.3 and numpy < 1.24; two import-time shims make it run unchanged on
current versions (timm's ``Block`` no longer takes ``qk_scale``; ``util.pos_embed``
uses ``np.float``: its table is replaced by maevit's identical one, and is
overwritten by the copied weights anyway).

    # the issue's GPU goal: ViT-B/16 and ViT-L/16, bf16, one GPU
    python benchmarks/gpu_throughput.py --device cuda --dtype bf16 --models base large --compile \\
        --mae-code ~/src/mae
    # CPU, same precision for all (the issue's ViT-Tiny/16 with a 128-wide, 4-block decoder)
    python benchmarks/gpu_throughput.py --device cpu --dtype fp32 --models tiny --batch-size 32 \
        --model-args decoder_embed_dim=128 decoder_num_heads=4 --mae-code /tmp/mae
    # a seconds-long smoke run (the tests)
    python benchmarks/gpu_throughput.py --tiny
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import types
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from maevit import create_mae
from maevit.models.pos_embed import sincos_2d
from maevit.models.hf_vitmae import hf_vitmae_config, to_hf_vitmae_keys
from maevit.train.optim import build_adamw
from maevit.train.fp32_attention import Fp32Attention, fp32_attention_wanted
from maevit.train.perf import compile_blocks, count_train_flops, matmul_tflops, peak_tflops
from maevit.train.precision import cpu_bf16_flags

SIZES = {"tiny": "mae_vit_tiny_patch16", "small": "mae_vit_small_patch16", "base": "mae_vit_base_patch16",
         "large": "mae_vit_large_patch16", "huge": "mae_vit_huge_patch14"}
# the tests' smoke run: 32 px, 8 px patches, one narrow block each side
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2)


# ----------------------------------------------------------------------------- the peers
def hf_twin(model: nn.Module, attn: str = "sdpa") -> nn.Module:
    """A ``ViTMAEForPreTraining`` with ``model``'s architecture and weights (square images only)."""
    from transformers import ViTMAEForPreTraining

    hf = ViTMAEForPreTraining(hf_vitmae_config(model, attn))
    hf.load_state_dict(to_hf_vitmae_keys(model.state_dict(), layout="transformers5"), strict=True)
    return hf


def load_published_code(path: str | os.PathLike) -> types.ModuleType:
    """Import the published ``models_mae.py`` (a file, or the checkout holding it) with the
    shims described in the module docstring; nothing is left patched afterwards."""
    import timm.models.vision_transformer as vit_mod

    path = Path(path)
    file = path / "models_mae.py" if path.is_dir() else path
    if not file.is_file():
        raise SystemExit(f"--mae-code: no models_mae.py at {path} (clone github.com/facebookresearch/mae there)")

    class Block(vit_mod.Block):  # timm >= 0.9 dropped qk_scale (None: the default scale, as published)
        def __init__(self, *args: Any, qk_scale: float | None = None, **kwargs: Any) -> None:
            assert qk_scale is None, "the published models pass qk_scale=None only"
            super().__init__(*args, **kwargs)

    def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False):
        return sincos_2d(embed_dim, (grid_size, grid_size), int(cls_token)).double().numpy()

    pos = types.ModuleType("util.pos_embed")
    pos.get_2d_sincos_pos_embed = get_2d_sincos_pos_embed
    util = types.ModuleType("util")
    util.pos_embed = pos
    saved = {k: sys.modules.get(k) for k in ("util", "util.pos_embed")}
    real_block = vit_mod.Block
    sys.modules.update({"util": util, "util.pos_embed": pos})
    vit_mod.Block = Block
    try:
        spec = importlib.util.spec_from_file_location("mae_published_models_mae", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        vit_mod.Block = real_block
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module


def to_published_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """maevit MAE state dict -> the published ``MaskedAutoencoderViT`` names."""
    out = {}
    for k, v in sd.items():
        if k.startswith("encoder."):
            out[k[len("encoder."):]] = v
        elif k in ("decoder.mask_token", "decoder.pos_embed"):
            out[{"decoder.mask_token": "mask_token", "decoder.pos_embed": "decoder_pos_embed"}[k]] = v
        else:  # decoder.embed.weight -> decoder_embed.weight, decoder.blocks.0... -> decoder_blocks.0...
            out["decoder_" + k[len("decoder."):]] = v
    return out


def published_twin(module: types.ModuleType, model: nn.Module) -> nn.Module:
    """The published ``MaskedAutoencoderViT`` with ``model``'s architecture and weights."""
    enc, dec = model.encoder, model.decoder
    twin = module.MaskedAutoencoderViT(
        img_size=enc.patch_embed.img_size[0], patch_size=enc.patch_size, in_chans=enc.in_chans,
        embed_dim=enc.embed_dim, depth=len(enc.blocks), num_heads=enc.blocks[0].attn.num_heads,
        decoder_embed_dim=dec.embed.out_features, decoder_depth=len(dec.blocks),
        decoder_num_heads=dec.blocks[0].attn.num_heads, mlp_ratio=enc.blocks[0].mlp.fc1.out_features / enc.embed_dim,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=model.norm_pix_loss,
    )
    sd = {k: v for k, v in model.state_dict().items()}
    twin.load_state_dict(to_published_keys(sd), strict=True)
    return twin


# ----------------------------------------------------------------------------- timing
class Runner:
    """One model's training step: zero_grad, autocast forward, backward, AdamW."""

    def __init__(self, name: str, model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 optimizer: torch.optim.Optimizer, device: torch.device, dtype: str,
                 fp32_attention: bool = False) -> None:
        self.name, self.model, self.loss_fn, self.opt, self.dtype = name, model, loss_fn, optimizer, dtype
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext())
        self.fp32_attention = fp32_attention  # maevit's CPU policy (maevit.train.fp32_attention)
        self.device = device
        self.rates: list[float] = []  # images/s (wall clock) per round
        self.cpu_rates: list[float] = []  # images per CPU-second of this process per round (CPU runs)

    def step(self, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        with self.autocast, Fp32Attention() if self.fp32_attention else nullcontext():
            loss = self.loss_fn(imgs, noise)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def timed_round(self, imgs: torch.Tensor, noises: list[torch.Tensor]) -> float:
        """Images/s of ``len(noises)`` steps, one device sync at the end."""
        _sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        for n in noises:
            loss = self.step(imgs, n)
        loss.item()  # waits for the device
        n_img = len(noises) * imgs.shape[0]
        rate = n_img / (time.perf_counter() - t0)
        self.rates.append(rate)
        self.cpu_rates.append(n_img / max(time.process_time() - c0, 1e-9))
        return rate


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_runners(args: argparse.Namespace, name: str, device: torch.device, overrides: dict[str, Any],
                  published: types.ModuleType | None,
                  peers: Any = ("hf", "published")) -> tuple[list[Runner], nn.Module]:
    torch.manual_seed(0)
    ours = create_mae(name, **overrides)
    twins: dict[str, nn.Module] = {}
    if "hf" in peers:
        twins["hf_vitmae"] = hf_twin(ours, args.attn)
    if published is not None:
        twins["published_mae"] = published_twin(published, ours)
    ours.to(device).train()
    # alone (another family's units): the model draws its own mask
    fn = (lambda x, n: ours(x, noise=n).loss) if peers else (lambda x, n: ours(x).loss)
    flags = cpu_bf16_flags() if device.type == "cpu" else []
    fp32_attn = fp32_attention_wanted(device.type, args.dtype, flags)
    runners = [Runner("maevit", ours, fn, build_adamw(ours, 1.5e-4, 0.05), device, args.dtype, fp32_attn)]
    if args.dtype == "bf16" and args.fp32_baseline:  # the same model in fp32, side by side
        twin = copy.deepcopy(ours)
        runners.append(Runner("maevit_fp32", twin, lambda x, n, m=twin, p=peers: m(x, noise=n).loss if p else m(x).loss,
                              build_adamw(twin, 1.5e-4, 0.05), device, "fp32"))
    if fp32_attn and args.bf16_attention_too:  # without maevit's CPU attention policy: what it gains
        twin = copy.deepcopy(ours)
        runners.append(Runner("maevit_bf16_attention", twin,
                              lambda x, n, m=twin, p=peers: m(x, noise=n).loss if p else m(x).loss,
                              build_adamw(twin, 1.5e-4, 0.05), device, "bf16"))
    for peer_name, peer in twins.items():
        peer.to(device).train()
        params = [p for p in peer.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                fused=True if args.peers_fused_adamw else None)
        if peer_name == "hf_vitmae":
            fn = lambda x, n, m=peer: m(pixel_values=x, noise=n).loss  # noqa: E731
        else:  # the published forward draws its own mask noise: (loss, pred, mask)
            fn = lambda x, n, m=peer: m(x, mask_ratio=ours.mask_ratio)[0]  # noqa: E731
        runners.append(Runner(peer_name, peer, fn, opt, device, args.dtype))
    return runners, ours


def check_same_model(runners: list[Runner], imgs: torch.Tensor, noise: torch.Tensor) -> dict[str, float]:
    """fp32 loss of each model on the same batch and mask before any step: equal losses say
    the weights and the computation are the same. The published forward draws its mask from
    the global RNG; seeded, it draws the noise that maevit is then given as well."""
    out = {}
    with torch.no_grad():
        for r in runners:
            if r.name == "published_mae":
                torch.manual_seed(1234)
                same = torch.rand(noise.shape, device=imgs.device)  # what the published forward will draw
                torch.manual_seed(1234)
                out[r.name] = r.loss_fn(imgs, noise).item()
                out["maevit, published's mask"] = runners[0].loss_fn(imgs, same).item()
            else:
                out[r.name] = r.loss_fn(imgs, noise).item()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["base", "large"], choices=sorted(SIZES))
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--model-args", nargs="*", default=[], metavar="KEY=VALUE",
                   help="create_mae overrides for every model, e.g. decoder_embed_dim=128 decoder_num_heads=4")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 (base) / 128 (large+) on GPU, 32 on CPU")
    p.add_argument("--steps", type=int, default=10, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first (and compile)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="autocast dtype for all models")
    p.add_argument("--compile", action="store_true", help="maevit: torch.compile each block (regional)")
    p.add_argument("--compile-peers", action="store_true", help="with --compile: the peers' blocks too")
    p.add_argument("--peers", nargs="*", default=["hf", "published"], choices=("hf", "published"))
    p.add_argument("--peers-fused-adamw", action="store_true",
                   help="the peers use fused AdamW too (compares the models alone; default: torch's default "
                        "AdamW, as the peers' training scripts do)")
    p.add_argument("--mae-code", default=os.environ.get("MAE_CODE"),
                   help="checkout of github.com/facebookresearch/mae (or its models_mae.py); without it, "
                        "the published model is left out")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="HF attention implementation")
    p.add_argument("--fp32-baseline", action="store_true",
                   help="with --dtype bf16: maevit in fp32 too, side by side (the bf16 / fp32 step ratio)")
    p.add_argument("--bf16-attention-too", action="store_true",
                   help="with --dtype bf16 on a CPU where maevit runs attention in fp32: maevit with bf16 attention "
                        "too (what that policy gains)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--tiny", action="store_true", help="a seconds-long CPU smoke run (tiny model, 1 round)")
    p.add_argument("--maevit-only", nargs="*", default=[], metavar="MODEL",
                   help="registered MAE models of other families (e.g. mae_swin_tiny), timed alone (no peer has them)")
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.device, args.dtype = ["tiny"], "cpu", "fp32"
        args.batch_size, args.steps, args.rounds, args.warmup = 4, 1, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    published = None
    if "published" in args.peers and args.mae_code:
        published = load_published_code(args.mae_code)
    elif "published" in args.peers:
        print("# published MAE code left out: pass --mae-code DIR (a checkout of facebookresearch/mae)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (and its peak) here
    if device.type == "cpu":  # the machine's own yardsticks, both precisions, in this process
        rates = matmul_tflops(("fp32", "bf16"), n=256 if args.tiny else 1024, budget_s=0.05 if args.tiny else 0.5)
        flags = cpu_bf16_flags()
        print(f"# CPU matmul {'256' if args.tiny else '1024'}^2: fp32 {rates['fp32']:.4f} TFLOP/s, bf16 "
              f"{rates['bf16']:.4f} TFLOP/s ({rates['bf16'] / rates['fp32']:.2f}x); bf16 units: "
              f"{', '.join(flags) or 'none (bf16 is emulated)'}")
        if args.dtype == "bf16" and not flags:
            print("# bf16 skipped: this CPU has no bf16 units, a bf16 step would measure the emulation")
            return {"device": "cpu", "dtype": "bf16", "skipped": "no bf16 units", "matmul_tflops": rates}
    peak, peak_src = peak_tflops(device, args.dtype)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"# {dev_name}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"compile={args.compile}; peak {peak and round(peak, 4)} TFLOP/s ({peak_src})")
    results: dict[str, Any] = {"device": dev_name, "dtype": args.dtype, "peak_tflops": peak, "peak_source": peak_src,
                               "torch": torch.__version__, "compile": args.compile, "models": {}}
    for size in [*args.models, *args.maevit_only]:
        name = SIZES.get(size, size)
        overrides = dict(TINY) if args.tiny else {"img_size": args.img_size}
        for kv in args.model_args:
            key, _, value = kv.partition("=")
            overrides[key] = (value == "true" if value in ("true", "false")
                              else float(value) if "." in value else int(value))
        batch = args.batch_size or (32 if device.type == "cpu" else (256 if size in ("tiny", "small", "base") else 128))
        alone = size in args.maevit_only
        runners, ours = build_runners(args, name, device, overrides, None if alone else published,
                                      peers=() if alone else args.peers)
        h, w = getattr(ours.encoder, "img_size", None) or ours.encoder.patch_embed.img_size
        fpi = count_train_flops(ours, (ours.encoder.in_chans, h, w)).total
        gen = torch.Generator(device).manual_seed(0)
        imgs = torch.randn(batch, ours.encoder.in_chans, h, w, device=device, generator=gen)

        def noise() -> torch.Tensor:
            return torch.rand(batch, ours.num_patches, device=device, generator=gen)

        check = check_same_model(runners, imgs, noise())
        if args.compile:  # after the eager check
            compile_blocks(ours)
            if args.compile_peers:
                for r in runners[1:]:
                    compile_blocks(r.model)
        load0 = os.getloadavg()
        for r in runners:  # warm-up (and compilation)
            for _ in range(args.warmup):
                r.step(imgs, noise())
            _sync(device)
        round_peaks = []  # CPU: the matmul peak measured in every round, under that round's load
        for k in range(args.rounds):
            noises = [noise() for _ in range(args.steps)]  # the same masks for maevit and HF
            for r in (runners if k % 2 == 0 else runners[::-1]):
                r.timed_round(imgs, noises)
            if device.type == "cpu":
                dtypes = tuple(sorted({r.dtype for r in runners}))
                round_peaks.append(matmul_tflops(dtypes, budget_s=0.02 if args.tiny else 0.2))
        load1 = os.getloadavg()
        rows = {}
        for r in runners:
            rate = statistics.median(r.rates)
            tflops = fpi * rate / 1e12
            if round_peaks:  # MFU of each round against that round's measured peak, then the median
                round_mfu = statistics.median(fpi * x / 1e12 / p[r.dtype] for x, p in zip(r.rates, round_peaks))
            rows[r.name] = {"images_per_sec": round(rate, 2), "tflops": float(f"{tflops:.4g}"),
                            "mfu": float(f"{(round_mfu if round_peaks else tflops / peak):.4g}") if peak else None,
                            "rounds": [round(x, 2) for x in r.rates],
                            "images_per_cpu_sec": round(statistics.median(r.cpu_rates), 2)}
        ref = rows["maevit"]["images_per_sec"]
        for r in runners:
            rows[r.name]["maevit_speedup"] = round(ref / rows[r.name]["images_per_sec"], 3)
            # per-round ratios: a load burst within one round would otherwise move the median
            rows[r.name]["maevit_speedup_per_round"] = [round(a / b, 3) for a, b in zip(runners[0].rates, r.rates)]
            rows[r.name]["maevit_speedup_round_median"] = round(statistics.median(
                a / b for a, b in zip(runners[0].rates, r.rates)), 3)
            rows[r.name]["maevit_speedup_cpu_time"] = round(
                rows["maevit"]["images_per_cpu_sec"] / rows[r.name]["images_per_cpu_sec"], 3)
        results["models"][size] = {"name": name, "overrides": overrides, "batch": batch,
                                   "round_peaks_tflops": [{k: round(v, 4) for k, v in x.items()} for x in round_peaks],
                                   "gflop_per_image": round(fpi / 1e9, 3),
                                   "loadavg": [round(load0[0], 2), round(load1[0], 2)],
                                   "loss_before_training": {k: round(v, 6) for k, v in check.items()},
                                   "runners": rows}
        print(f"\n## {name}: {h}x{w} px, batch {batch}, {fpi / 1e9:.2f} GFLOP/image (fwd+bwd), "
              f"{args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up; "
              f"load average {load0[0]:.1f} -> {load1[0]:.1f}")
        if round_peaks:
            print("CPU matmul peak measured in each round: " + ", ".join(
                "/".join(f"{k} {v:.3f}" for k, v in x.items()) for x in round_peaks)
                + " TFLOP/s (MFU: per round against that round's peak at the runner's precision, median)")
        print("same weights, loss on one batch before training: "
              + ", ".join(f"{k} {v:.6f}" for k, v in check.items()))
        print("| model | images/s | TFLOP/s | MFU | maevit speed-up: ratio of medians / median of round ratios "
              "(round ratios) | images per CPU-s (speed-up) |")
        print("|---|---|---|---|---|---|")
        for k, row in rows.items():
            mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
            print(f"| {k} | {row['images_per_sec']:.1f} | {row['tflops']:.3f} | {mfu} | "
                  f"{row['maevit_speedup']:.2f}x / {row['maevit_speedup_round_median']:.2f}x "
                  f"({', '.join(f'{x:.2f}' for x in row['maevit_speedup_per_round'])}) | "
                  f"{row['images_per_cpu_sec']:.1f} ({row['maevit_speedup_cpu_time']:.2f}x) |")
        del runners, ours
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
