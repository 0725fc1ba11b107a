"""CIFAR-10 quality check: does MAE pretraining beat training from scratch?

Runs, on one small model of any registered family (``--model``, ``--model-args``)
and one compute budget (all numbers are written to ``OUT/results.json`` and
printed as a Markdown table):

1. MAE pretraining on the CIFAR-10 training images (labels unused);
2. fine-tuning the pretrained encoder vs the same model from scratch, with the
   same recipe and budget, on 100% and on 10% of the labels;
3. linear probe (frozen, class token, BN + linear, LARS) and kNN (k=20, cosine)
   of the pretrained vs a randomly initialised encoder.

Usage (CPU, about an hour at the defaults on 2 busy cores; scale with the flags)::

    python benchmarks/quality_cifar10.py --data /tmp/cifar10 --out /tmp/quality \\
        --per-class 1000 --pretrain-epochs 30 --ft-epochs 15

Another family (the fine-tune reads the architecture from the pretraining run;
the scratch run is built from the same name and arguments)::

    python benchmarks/quality_cifar10.py --model mae_vit_small_patch16_rope \
        --model-args '{"embed_dim": 192, "depth": 6, "num_heads": 3, "patch_size": 4}' --out /tmp/q_rope

``--data`` is the extracted ``cifar10-jpg.tar.gz`` (``train/<class>/*.jpg``,
``test/<class>/*.jpg``); it is extracted there when missing.
"""
from __future__ import annotations

import argparse
import json
import os
import tarfile
import time
from pathlib import Path

ARCHIVE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpg.tar.gz"


def _subset(src: Path, dst: Path, per_class: int | None) -> Path:
    """A class-per-folder tree of the first ``per_class`` images of each class (symlinks)."""
    if per_class is None:
        return src
    if dst.is_dir():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (tmp / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[:per_class]:
            (tmp / cls.name / f.name).symlink_to(f.resolve())
    tmp.rename(dst)
    return dst


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/cifar10")
    p.add_argument("--out", default="/tmp/quality_cifar10")
    p.add_argument("--per-class", type=int, default=1000, help="training images per class (None: all 5000)")
    p.add_argument("--test-per-class", type=int, default=200)
    p.add_argument("--pretrain-epochs", type=int, default=30)
    p.add_argument("--pretrain-lr", type=float, default=1.5e-3, help="base lr (x batch/256); 10x MAE's for short runs")
    p.add_argument("--ft-epochs", type=int, default=15)
    p.add_argument("--ft-epochs-low", type=int, default=None,
                   help="fine-tune epochs at 10%% labels (default: 3x --ft-epochs; 10x fewer images per epoch)")
    p.add_argument("--probe-every", type=int, default=0,
                   help="online kNN probe every N pretraining steps (the curve of kNN vs steps; 0: off)")
    p.add_argument("--probe-epochs", type=int, default=50)
    p.add_argument("--model", default="mae_vit_tiny_patch16", help="registered name (`maevit models`)")
    p.add_argument("--patch", type=int, default=4, help="plain ViT shorthand, used when --model-args is absent")
    p.add_argument("--dim", type=int, default=192, help="plain ViT shorthand")
    p.add_argument("--depth", type=int, default=6, help="plain ViT shorthand")
    p.add_argument("--heads", type=int, default=3, help="plain ViT shorthand")
    p.add_argument("--model-args", default=None,
                   help="encoder arguments as JSON (default: the plain ViT shorthands above)")
    p.add_argument("--img-size", type=int, default=32,
                   help="model input size; CIFAR's 32 px images are resized to it (64 for SReT: 32 px mask units)")
    p.add_argument("--decoder", default="128,2,4", help="MAE decoder width,depth,heads")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--only", default="", help="comma list of stages to run: pretrain,ft,ft10,probe,knn")
    p.add_argument("--probe-pool", choices=("token", "avg"), default="token",
                   help="what the linear probe reads: the class token (MAE's protocol) or the mean of the patch "
                        "tokens; results of avg are stored as probe_*_avg")
    p.add_argument("--seed", type=int, default=0, help="run.seed of every stage (init, data order, masks)")
    p.add_argument("--mask-ratio", type=float, default=None, help="pretraining mask ratio (default: the model's)")
    p.add_argument("--layer-decay", type=float, default=None,
                   help="fine-tuning layer decay of the pretrained encoder (default: the model's; scratch: 1.0)")
    p.add_argument("--ft-set", action="append", default=[],
                   help="extra fine-tuning override for the pretrained run, e.g. optim.layer_decay_exempt=[...]")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"),
                   help="run.precision of every stage (fp32: the rows of BENCHMARKS.md before 2026-12-07; "
                        "auto: bf16 where the CPU has bf16 units, for budgets twice as long)")
    p.add_argument("--ft-tag", default="", help="suffix of the fine-tuning result keys (several recipes, one pretraining)")
    a = p.parse_args(argv)

    import torch

    from maevit.config import make_config, merge, parse_overrides
    from maevit.train import pretrain as pt
    from maevit.train.finetune import FinetuneConfig, finetune
    from maevit.train.probe import ProbeConfig, probe

    data, out = Path(a.data), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (data / "train").is_dir():
        data.mkdir(parents=True, exist_ok=True)
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(data, filter="data")
    train = _subset(data / "train", out / f"train{a.per_class}", a.per_class)
    test = _subset(data / "test", out / f"test{a.test_per_class}", a.test_per_class)
    stages = set(a.only.split(",")) if a.only else {"pretrain", "ft", "probe", "knn"}
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    def save(key: str, value) -> None:
        results[key] = value
        results_path.write_text(json.dumps(results, indent=1))
        print(f"[{time.strftime('%H:%M:%S')}] {key}: {value}", flush=True)

    model_args = json.loads(a.model_args) if a.model_args else dict(
        patch_size=a.patch, embed_dim=a.dim, depth=a.depth, num_heads=a.heads)
    arch = dict(name=a.model, img_size=a.img_size, args=model_args)  # the model section from scratch
    enc_path = out / "pretrain" / "encoder.safetensors"
    threads = torch.get_num_threads()
    save("budget", dict(per_class=a.per_class, test_per_class=a.test_per_class, pretrain_epochs=a.pretrain_epochs,
                        ft_epochs=a.ft_epochs, model=a.model, model_args=model_args, img_size=a.img_size,
                        decoder=a.decoder, threads=threads))

    if "pretrain" in stages and not enc_path.is_file():
        t = time.time()
        decoder = dict(zip(("decoder_embed_dim", "decoder_depth", "decoder_num_heads"), map(int, a.decoder.split(","))))
        probe_online = dict(probe_every=a.probe_every, probe_train=str(train), probe_val=str(test)) if a.probe_every else {}
        mask = {} if a.mask_ratio is None else {"mask_ratio": a.mask_ratio}
        cfg = make_config(
            pt.PretrainConfig, model={**arch, **decoder, **mask},
            data=dict(train=str(train), batch_size=128, num_workers=a.workers),
            optim=dict(epochs=a.pretrain_epochs, base_lr=a.pretrain_lr, warmup_epochs=1),
            run=dict(dir=str(out / "pretrain"), seed=a.seed, log_every=10, ckpt_every=200, viz_every=400,
                     progress=False, keep_last=1, precision=a.precision, **probe_online))
        res = pt.train(cfg)
        save("pretrain", dict(loss=res.get("loss"), minutes=round((time.time() - t) / 60, 1),
                              images_per_sec=res.get("images_per_sec")))
        rows = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
        save("pretrain_curve", [{k: r[k] for k in ("step", "loss", "knn_top1") if k in r}
                                for r in rows if "knn_top1" in r or r["step"] % 100 == 0])

    def ft(name: str, pretrained: Path | None, fraction: float | None, epochs: int) -> None:
        if name in results:
            return
        t = time.time()
        # from the pretraining run, the file says the architecture; from scratch, the same name and arguments
        model = dict(name=None, img_size=a.img_size, pretrained=str(pretrained)) if pretrained else dict(arch)
        # layer decay only makes sense for a pretrained encoder: from scratch it would just starve the
        # lower blocks of learning rate, so scratch runs use 1.0 (as DeiT does); all else is equal
        # (pretrained: the model's registered layer decay, grouping and exempt parts unless --layer-decay)
        optim = dict(epochs=epochs, base_lr=1.0e-3, warmup_epochs=2, weight_decay=0.05)
        if not pretrained:
            optim["layer_decay"] = 1.0
        elif a.layer_decay:
            optim["layer_decay"] = a.layer_decay
        sections = dict(
            model={**model, "drop_path": 0.1},
            data=dict(train=str(train), val=str(test), batch_size=64, num_workers=a.workers,
                      label_fraction=fraction or None, mixup=0.8, cutmix=1.0, smoothing=0.1, re_prob=0.25),
            optim=optim,
            run=dict(dir=str(out / name), seed=a.seed, eval_every=epochs, log_every=20, precision=a.precision))
        if pretrained:  # --ft-set KEY=VALUE: the user's own overrides, on top
            sections = merge(sections, parse_overrides(a.ft_set))
        res = finetune(make_config(FinetuneConfig, **sections))
        save(name, dict(top1=res["top1"], top5=res["top5"], minutes=round((time.time() - t) / 60, 1)))

    for enc_name, src in (("mae", enc_path), ("random", None)):
        probe_key = f"probe_{enc_name}" + ("" if a.probe_pool == "token" else "_avg")
        if "probe" in stages and probe_key not in results:
            t = time.time()
            res = probe(make_config(
                ProbeConfig, model=dict(pretrained=str(src), img_size=a.img_size, global_pool=a.probe_pool) if src
                else dict(arch, global_pool=a.probe_pool),
                data=dict(train=str(train), val=str(test), batch_size=256, num_workers=a.workers),
                optim=dict(epochs=a.probe_epochs, warmup_epochs=5),
                run=dict(dir=str(out / probe_key), seed=a.seed, precision=a.precision)))
            save(probe_key, dict(top1=res["top1"], top5=res["top5"], minutes=round((time.time() - t) / 60, 1)))
        for pool in ("token", "avg"):
            key = f"knn_{enc_name}" + ("" if pool == "token" else "_avg")
            if "knn" not in stages or key in results:
                continue
            from accelerate import Accelerator

            from maevit.data.stream import labeled_loader
            from maevit.models.classifier import create_classifier
            from maevit.train.knn import knn_accuracy

            Accelerator(cpu=True)
            t = time.time()
            enc = create_classifier(None if src else a.model, 0, pretrained=src, img_size=a.img_size,
                                    global_pool=pool, **({} if src else model_args))
            kw = dict(img_size=a.img_size, batch_size=256, train=False, num_workers=a.workers)
            res = knn_accuracy(enc, labeled_loader(str(train), **kw), labeled_loader(str(test), **kw), k=20, T=0.07)
            save(key, dict(top1=res["knn_top1"], top5=res["knn_top5"], minutes=round((time.time() - t) / 60, 1)))

    if "ft" in stages or "ft10" in stages:  # ft10: the 10%-label pair only
        low = a.ft_epochs_low or 3 * a.ft_epochs
        for frac, tag, epochs in ((0.1, "10", low), (None, "100", a.ft_epochs)):  # the cheap pair first
            if tag == "100" and "ft" not in stages:
                continue
            ft(f"ft_mae_{tag}{a.ft_tag}", enc_path, frac, epochs)
            ft(f"ft_scratch_{tag}", None, frac, epochs)

    rows = [("fine-tune, 100% labels", "ft_mae_100", "ft_scratch_100"), ("fine-tune, 10% labels", "ft_mae_10", "ft_scratch_10"),
            ("linear probe", "probe_mae", "probe_random"), ("kNN (k=20), class token", "knn_mae", "knn_random"),
            ("kNN (k=20), mean of patch tokens", "knn_mae_avg", "knn_random_avg")]
    print("\n| CIFAR-10 top-1 | MAE-pretrained | scratch / random init |\n|---|---|---|")
    for label, k1, k2 in rows:
        f = lambda k: f"{results[k]['top1']:.1f}%" if k in results and results[k].get("top1") is not None else "-"  # noqa: E731
        print(f"| {label} | {f(k1)} | {f(k2)} |")
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
