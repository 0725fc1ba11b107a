"""What MAE gives each family: pretrained vs scratch at 10% labels, and linear probe vs random init.

For every family (or ``--families``), at the geometry of its CIFAR-10 recipe
(``pretrain/cifar10_<family>.yaml``: model, image size, strides; mask ratio and the fine-tuning
layer decay from the model's registered defaults), and for each seed:

1. MAE pretraining on ``--per-class`` training photos per class at one stated budget;
2. fine-tuning on a fixed class-balanced 10% of their labels, pretrained vs the same model
   from scratch (layer decay 1.0), same recipe and budget;
3. linear probe (frozen, BN + linear, LARS) of the pretrained vs the randomly initialised encoder.

Each (family, seed) is one run of ``benchmarks/quality_cifar10.py`` (``--only pretrain,ft10,probe``)
in ``OUT/<family>/seed<N>``; finished parts are reused, so an interrupted command continues.
Prints one Markdown table: mean over seeds and each seed, with gains and minutes.

Usage (the defaults are the budget of BENCHMARKS.md "Sixty epochs": 60 pretraining epochs, 45
fine-tuning epochs at 10% labels, bf16 where the CPU has bf16 units; 30-90 minutes per family and
seed on one core)::

    python benchmarks/family_gains.py --data /tmp/cifar10 --out /tmp/gains --families hybrid sret --seeds 0 1
    # the earlier, shorter budgets: --pretrain-epochs 15 --ft-epochs 5 --precision fp32
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality_cifar10  # noqa: E402  (benchmarks/ is not a package)


def recipe_of(family: str) -> dict:
    """Model name, image size, arguments and decoder of ``pretrain/cifar10_<family>.yaml``."""
    from maevit.config import load_config
    from maevit.train.pretrain import PretrainConfig

    m = load_config(PretrainConfig, ROOT / "pretrain" / f"cifar10_{family}.yaml", []).model
    return dict(model=m.name, img_size=m.img_size, args=m.overrides(),
                decoder=f"{m.decoder_embed_dim},{m.decoder_depth},{m.decoder_num_heads}")


FAMILIES = ("hybrid", "sret", "vit", "deit", "cvt", "swin", "hiera")  # the order runs go in


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/cifar10")
    p.add_argument("--out", default="/tmp/family_gains")
    p.add_argument("--families", nargs="+", default=list(FAMILIES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--per-class", type=int, default=500)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--pretrain-epochs", type=int, default=60)
    p.add_argument("--ft-epochs", type=int, default=15, help="fine-tuning epochs are 3x this at 10%% labels")
    p.add_argument("--probe-epochs", type=int, default=20)
    p.add_argument("--only", default="pretrain,ft10,probe")
    p.add_argument("--precision", default="auto", choices=("fp32", "bf16", "auto"),
                   help="run.precision of every stage (auto: bf16 on CPUs with bf16 units, about 1.7x faster)")
    p.add_argument("--probe-pool", choices=("token", "avg"), default="avg",
                   help="what the probe reads: the mean of the patch tokens (default: what MAE trains at small "
                        "budgets) or the class token (MAE's protocol; weak until long pretraining, BENCHMARKS.md)")
    a = p.parse_args()

    rows = {}
    for fam in a.families:
        r = recipe_of(fam)
        args = {k: v for k, v in r["args"].items()
                if k not in ("img_size", "decoder_embed_dim", "decoder_depth", "decoder_num_heads")}
        for seed in a.seeds:
            t = time.time()
            res = quality_cifar10.main([
                "--data", a.data, "--out", str(Path(a.out) / fam / f"seed{seed}"), "--per-class", str(a.per_class),
                "--test-per-class", str(a.test_per_class), "--pretrain-epochs", str(a.pretrain_epochs),
                "--ft-epochs", str(a.ft_epochs), "--probe-epochs", str(a.probe_epochs), "--only", a.only,
                "--model", r["model"], "--model-args", json.dumps(args), "--img-size", str(r["img_size"]),
                "--decoder", r["decoder"], "--seed", str(seed), "--workers", "0", "--probe-pool", a.probe_pool,
                "--precision", a.precision,
            ])
            res["wall_minutes"] = round((time.time() - t) / 60, 1)
            rows[(fam, seed)] = res

    def top1(res: dict, key: str) -> float | None:
        return (res.get(key) or {}).get("top1")

    def cell(fam: str, key: str) -> str:
        vals = [top1(rows[(fam, s)], key) for s in a.seeds]
        if any(v is None for v in vals):
            return "-"
        return f"{sum(vals) / len(vals):.1f} ({' / '.join(f'{v:.1f}' for v in vals)})"

    def gain(fam: str, k1: str, k2: str) -> str:
        d = [top1(rows[(fam, s)], k1) - top1(rows[(fam, s)], k2) for s in a.seeds
             if top1(rows[(fam, s)], k1) is not None and top1(rows[(fam, s)], k2) is not None]
        return f"**{sum(d) / len(d):+.1f}** ({' / '.join(f'{x:+.1f}' for x in d)})" if len(d) == len(a.seeds) else "-"

    print(f"\nbudget: {a.per_class} photos per class, pretraining {a.pretrain_epochs} epochs, fine-tuning "
          f"{3 * a.ft_epochs} epochs at 10% labels, probe {a.probe_epochs} epochs, {a.test_per_class} test photos "
          f"per class; seeds {a.seeds}; precision {a.precision}; top-1 %, mean (per seed)")
    print("| family | model | MAE loss | ft 10% MAE | ft 10% scratch | gain | probe MAE | probe random | gain | "
          "minutes per seed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    pm, pr = ("probe_mae", "probe_random") if a.probe_pool == "token" else ("probe_mae_avg", "probe_random_avg")
    for fam in a.families:
        loss = "/".join(f"{(rows[(fam, s)].get('pretrain') or {}).get('loss', float('nan')):.3f}" for s in a.seeds)
        mins = "/".join(str(rows[(fam, s)]["wall_minutes"]) for s in a.seeds)
        print(f"| {fam} | `{recipe_of(fam)['model']}` | {loss} | {cell(fam, 'ft_mae_10')} | "
              f"{cell(fam, 'ft_scratch_10')} | {gain(fam, 'ft_mae_10', 'ft_scratch_10')} | {cell(fam, pm)} | "
              f"{cell(fam, pr)} | {gain(fam, pm, pr)} | {mins} |")


if __name__ == "__main__":
    main()
