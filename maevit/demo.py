"""``maevit demo``: does MAE pretraining help? Measured in one run, on real photos.

1. MAE-pretrains a small ViT (``pretrain/demo.yaml``) on the 5,000 CIFAR-10 photos
   shipped with maevit (``sample:train``; labels unused) -> ``OUT/pretrain``;
2. kNN top-1 of the pretrained encoder and of a randomly initialised one (no training);
3. fine-tunes (``finetune/demo.yaml``) the pretrained encoder on 10% of the labels
   (500 photos), and the *same* architecture from scratch with the same recipe and
   budget (layer decay off: it would only slow a random network's lower blocks);
   ``--full`` adds the same pair on 100% of the labels;
4. prints the comparison (top-1 on the 1,000 photos of ``sample:val``, images/s,
   time) and writes it to ``OUT/demo.json``.

A second run with the same settings shows the results again; ``--fresh`` runs
the demo again (the old runs are moved to ``OUT/previous-<time>/``, never deleted).
An interrupted demo resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from maevit.fileio import write_text_atomic
from maevit.recipes import recipe_root

RECIPES = recipe_root()  # pretrain/ and finetune/: shipped in the package, or a source checkout's top level
STATE = "demo.json"
TAGS = ("10", "100")  # fine-tuning stages: the recipe's label fraction (10%), and all labels (--full)


def _recipe(kind: str) -> Path:
    return RECIPES / kind / "demo.yaml"


def find_recipes(model: str | None) -> tuple[dict[str, Path], str | None]:
    """The demo's recipes for ``--model`` (a registered model or a family name), and the model name to use.

    Without ``--model``, and for the family of ``pretrain/demo.yaml``'s model, the demo recipes
    themselves; for another family, its small-image recipes ``pretrain/cifar10_<family>.yaml`` and
    ``finetune/cifar10_<family>.yaml``, whose ``model`` sections replace the demo recipes' (the
    budget, data and run settings stay the demo's).

    Returns:
        ``({"pretrain": path, "finetune": path}, model name or None)``; the paths are the demo
        recipes when the family's own are not needed.

    Raises:
        ConfigError: an unknown name, or a family without small-image recipes (saying what exists).
    """
    import yaml

    from maevit.config import ConfigError
    from maevit.models import list_models, model_info

    demo = {kind: _recipe(kind) for kind in ("pretrain", "finetune")}
    if model is None:
        return demo, None
    families = sorted({model_info(n).family for n in list_models()})
    if model in list_models():
        family, name = model_info(model).family, model
    elif model in families:
        family, name = model, None
    else:
        raise ConfigError(f"--model {model}: not a registered model or family; families: {', '.join(families)} "
                          "(`maevit models` lists the models)")
    demo_model = (yaml.safe_load(demo["pretrain"].read_text()) or {}).get("model", {}).get("name")
    if demo_model and model_info(demo_model).family == family:
        return demo, name
    own = {kind: RECIPES / kind / f"cifar10_{family}.yaml" for kind in ("pretrain", "finetune")}
    missing = [str(p.relative_to(RECIPES)) for p in own.values() if not p.is_file()]
    if missing:
        have = sorted(f for f in families if all((RECIPES / k / f"cifar10_{f}.yaml").is_file() for k in own))
        raise ConfigError(f"--model {model}: the {family} family has no small-image recipe ({' and '.join(missing)} "
                          f"not found); the demo runs {', '.join(sorted({model_info(demo_model).family, *have}))}")
    return own, name


def _demo_config(cls: type, kind: str, recipes: dict[str, Path], model: str | None, overrides: list[str]):
    """The demo recipe of ``kind``, with the ``model`` section of ``recipes[kind]`` when that is another
    family's recipe (and ``model.name`` when ``--model`` named a model), then ``overrides``."""
    import yaml

    from maevit.config import from_dict, merge, parse_overrides

    data = yaml.safe_load(_recipe(kind).read_text()) or {}
    if recipes[kind] != _recipe(kind):
        data["model"] = dict((yaml.safe_load(recipes[kind].read_text()) or {}).get("model") or {})
    if model is not None:
        data.setdefault("model", {})["name"] = model
    return from_dict(cls, merge(data, parse_overrides(overrides)))


def _apply(cfg: Any, overrides: list[str]) -> None:
    """Set ``key=value`` overrides on a config object (validated as when loading)."""
    from maevit.config import from_dict, merge, parse_overrides, to_dict

    if overrides:
        fresh = from_dict(type(cfg), merge(to_dict(cfg), parse_overrides(overrides)))
        for section in vars(fresh):
            setattr(cfg, section, getattr(fresh, section))


def _split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """``pretrain.K=V`` / ``finetune.K=V`` -> the two lists; a bare ``K=V`` goes to pretraining."""
    pre, fine = [], []
    for item in items:
        if item.startswith("finetune."):
            fine.append(item[len("finetune."):])
        else:
            pre.append(item[len("pretrain."):] if item.startswith("pretrain.") else item)
    return pre, fine


def _fmt_time(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _median_rate(metrics: Path) -> float | None:
    """Median training images/s over the logged windows of a run (evaluation not counted)."""
    if not metrics.is_file():
        return None
    rates = [row["images_per_sec"] for row in map(json.loads, metrics.read_text().splitlines())
             if row.get("images_per_sec")]
    return round(statistics.median(rates), 1) if rates else None


class Demo:
    """The demo's stages, each recorded in ``OUT/demo.json`` when done (so a rerun skips it)."""

    def __init__(self, out: Path, settings: dict[str, Any]) -> None:
        self.out, self.settings = out, settings
        self.path = out / STATE
        self.stages: dict[str, Any] = {}
        self.started = time.time()

    def load(self, wanted: list[str]) -> str:
        """'new', 'resume', 'complete' (every stage in ``wanted`` done), or 'other' (OUT holds a
        demo with other settings)."""
        if not self.path.is_file():
            return "new"
        state = json.loads(self.path.read_text())
        self.stages = state.get("stages", {})
        if state.get("settings") != self.settings:
            return "other"
        return "complete" if all(name in self.stages for name in wanted) else "resume"

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"settings": self.settings, "stages": self.stages}, indent=1) + "\n"
        write_text_atomic(self.path, text)

    def record(self, name: str, value: dict[str, Any]) -> None:
        self.stages[name] = value
        self.save()


def _arch(cfg) -> dict[str, Any]:
    """The encoder's architecture from the pretraining config, for both fine-tunes: read from the
    encoder contract (its name and build arguments), so any family works."""
    from maevit.models import create_mae

    mae = create_mae(cfg.model.name, **cfg.model.overrides())
    enc = mae.encoder
    args = {k: v for k, v in enc.build_args.items() if k not in ("img_size", "drop_path_rate")}
    out = {"model_name": enc.model_name, "build_args": args, "patch_size": int(mae.patch_size),
           "num_features": int(enc.num_features), "prefix_tokens": int(enc.num_prefix_tokens),
           "params": sum(p.numel() for p in enc.parameters())}
    for key in ("embed_dim", "depth", "num_heads"):  # the table's words for plain ViTs
        if isinstance(args.get(key), int):
            out[key] = args[key]
    return out


def _build_args(arch: dict[str, Any]) -> dict[str, Any]:
    """Build arguments of a recorded architecture (demos recorded before build_args: ViT sizes)."""
    if "build_args" in arch:
        return dict(arch["build_args"])
    return {"patch_size": arch["patch_size"], "embed_dim": arch["embed_dim"], "depth": arch["depth"],
            "num_heads": arch["num_heads"]}


def _knn(cfg, encoder_path: Path | None, arch: dict[str, Any]) -> float:
    """kNN top-1 (k=20) on the probe sets of ``cfg`` of an encoder file, or of a random init."""
    import torch

    from maevit.data.stream import labeled_loader
    from maevit.models.classifier import create_classifier
    from maevit.train.knn import knn_accuracy

    torch.manual_seed(cfg.run.seed)
    pool = "token" if arch.get("prefix_tokens", 1) else None  # MAE's probe reads the class token where there is one
    enc = create_classifier(arch.get("model_name", cfg.model.name), 0, pretrained=encoder_path,
                            img_size=cfg.model.img_size, global_pool=pool, **_build_args(arch))
    kw = dict(img_size=cfg.model.img_size, batch_size=256, train=False, num_workers=0,
              mean=cfg.data.mean, std=cfg.data.std)
    with torch.no_grad():
        bank = labeled_loader(cfg.run.probe_train, **kw)
        res = knn_accuracy(enc, bank, labeled_loader(cfg.run.probe_val, class_names=bank.class_names, **kw),
                           k=cfg.run.probe_k)
    return res["knn_top1"]


def _table(demo: Demo, settings: dict[str, Any]) -> str:
    """The comparison, as plain text."""
    st = demo.stages
    pt, arch = st.get("pretrain", {}), st.get("arch", {})
    size = (f"{arch.get('embed_dim')} wide, {arch.get('depth')} blocks" if "depth" in arch or "build_args" not in arch
            else f"{arch.get('model_name')}, {arch.get('num_features')} features")
    what = "ViT" if "build_args" not in arch or arch.get("model_name", "").startswith("mae_vit_") else "encoder"
    lines = [
        "",
        f"maevit demo: MAE-pretrained vs from scratch, same {what} "
        f"({size}, patch {arch.get('patch_size')} at "
        f"{settings.get('img_size')} px, {arch.get('params', 0) / 1e6:.1f}M parameters)",
        f"data: {pt.get('train')} ({pt.get('train_images')} photos) for pretraining and fine-tuning; "
        f"top-1 on {pt.get('val')} ({pt.get('val_images')} photos)",
        "",
        f"{'':32}{'pretrained':>12}{'scratch':>10}{'gain':>8}   {'images/s':>13}   {'time':>15}",
    ]

    def row(label: str, a: dict | None, b: dict | None) -> None:
        if not a or not b:
            return
        gain = a["top1"] - b["top1"]
        rate = f"{a.get('images_per_sec') or 0:.0f} / {b.get('images_per_sec') or 0:.0f}" if "sec" in a else ""
        secs = f"{_fmt_time(a['sec'])} / {_fmt_time(b['sec'])}" if "sec" in a else ""
        lines.append(f"{label:32}{a['top1']:>11.1f}%{b['top1']:>9.1f}%{gain:>+8.1f}   {rate:>13}   {secs:>15}")

    knn = st.get("knn")
    if knn:
        row("kNN (k=20), no fine-tuning", {"top1": knn["pretrained"]}, {"top1": knn["random"]})
    for tag in TAGS:
        a, b = st.get(f"finetune-{tag}-pretrained"), st.get(f"finetune-{tag}-scratch")
        if a and b:
            row(f"fine-tune, {tag}% labels ({a['labeled']})", a, b)
    if pt:
        lines += ["", f"MAE pretraining (labels unused): {pt['steps']} steps of {pt['batch']} images, "
                      f"{pt['images_per_sec']:.0f} images/s, {_fmt_time(pt['sec'])}; "
                      f"loss {pt['first_loss']:.2f} -> {pt['loss']:.2f}"]
    if "total_sec" in st:
        lines.append(f"demo total: {_fmt_time(st['total_sec'])} (measured in this run, {st.get('threads')} threads)")
    return "\n".join(lines)


def _where(demo: Demo) -> str:
    st, out = demo.stages, demo.out
    pt = Path(st.get("pretrain", {}).get("run_dir", out / "pretrain"))
    grids = sorted((pt / "images").glob("recon-*.png"))
    lines = ["", "written:",
             f"  {grids[-1] if grids else pt / 'images'}   reconstructions (original | masked | reconstruction | "
             "visible pasted back)",
             f"  {pt / 'metrics.jsonl'}   pretraining loss, images/s, kNN",
             f"  {pt / 'encoder.safetensors'}   pretrained encoder (timm names)"]
    for name in st:
        if name.startswith("finetune-"):
            lines.append(f"  {Path(st[name]['run_dir']) / 'classifier.safetensors'}   {name}")
    lines.append(f"  {demo.path}   these numbers")
    lines += ["", "next:",
              f"  maevit visualize {pt} --data sample:val --out recon-val.png",
              f"  maevit eval {out / 'finetune-10-pretrained'} --data sample:val   (per-class accuracy, confusion matrix)",
              "  maevit demo --full      (adds the 100%-labels pair, about 2x the time)",
              f"  maevit finetune finetune/demo.yaml model.pretrained={pt}",
              "  maevit finetune finetune/demo.yaml model.pretrained=null optim.layer_decay=1.0"
              "   (same model from scratch)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``maevit demo [--out runs/demo] [--model NAME] [--fresh] [--full] [--seed N] [pretrain.K=V | finetune.K=V ...]``."""
    from maevit.config import Range, ranged

    parser = argparse.ArgumentParser(prog="maevit demo", description=__doc__.splitlines()[0],
                                     epilog="overrides: pretrain.KEY=VALUE or finetune.KEY=VALUE (keys as in "
                                            "pretrain/demo.yaml and finetune/demo.yaml; a bare KEY=VALUE goes to "
                                            "pretraining), e.g. pretrain.optim.epochs=30")
    parser.add_argument("--out", default="runs/demo", help="where the runs go (default: ./runs/demo)")
    parser.add_argument("--fresh", action="store_true", help="run again (old runs are moved aside, never deleted)")
    parser.add_argument("--full", action="store_true", help="also fine-tune both on 100%% of the labels")
    parser.add_argument("--seed", type=ranged(int, Range(0)), default=0,
                        help="seed of pretraining and fine-tuning (default 0)")
    parser.add_argument("--no-finetune", action="store_true", help="pretraining (and kNN) only")
    parser.add_argument("--model", default=None, help="a registered model or a family (e.g. swin): the demo at "
                        "that family's small-image recipe (default: pretrain/demo.yaml's ViT)")
    parser.add_argument("overrides", nargs="*", help="pretrain.KEY=VALUE / finetune.KEY=VALUE")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from maevit.config import ConfigError
    from maevit.train.finetune import FinetuneConfig, finetune
    from maevit.train.pretrain import PretrainConfig, train
    from maevit.train.runs import RunDir

    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    for kind in ("pretrain", "finetune"):
        if not _recipe(kind).is_file():
            print(f"maevit demo: {_recipe(kind)} not found: this maevit was installed without its recipes; "
                  "reinstall it (pip install maevit, or pip install . in a source checkout)", file=sys.stderr)
            return 2
    out = Path(args.out)
    pre_ov, fine_ov = _split_overrides(args.overrides)
    tags = [] if args.no_finetune else ["10", "100"] if args.full else ["10"]
    try:
        recipes, model = find_recipes(args.model)
        pcfg = _demo_config(PretrainConfig, "pretrain", recipes, model,
                            [f"run.dir={out / 'pretrain'}", f"run.seed={args.seed}", *pre_ov])
        fbase = _demo_config(FinetuneConfig, "finetune", recipes, model, fine_ov)  # config errors before any work
    except ConfigError as e:
        print(f"maevit demo: {e}", file=sys.stderr)
        return 2
    settings = {"seed": args.seed, "pretrain_overrides": pre_ov, "finetune_overrides": fine_ov,
                "img_size": pcfg.model.img_size, **({"model": args.model} if args.model else {})}
    wanted = ["pretrain", *[f"finetune-{t}-{i}" for t in tags for i in ("pretrained", "scratch")]]
    demo = Demo(out, settings)
    if args.fresh:
        moved = RunDir(out).move_aside()
        if moved is not None:
            print(f"maevit demo --fresh: the previous demo in {out} was moved to {moved}")
    state = demo.load(wanted)
    if state == "other":
        print(f"maevit demo: {out} holds a demo run with other settings ({demo.path}); pass --fresh to run "
              f"again (the old runs are moved aside), or choose another --out", file=sys.stderr)
        return 2
    if state == "complete":
        print(f"this demo is complete ({demo.path}); its results (`maevit demo --fresh` runs it again):")
        print(_table(demo, settings))
        print(_where(demo))
        return 0
    if state == "resume":
        print(f"resuming the demo in {out}: done so far: {', '.join(demo.stages) or 'nothing'}")

    import torch

    elapsed = demo.stages.get("total_sec", 0.0)
    t_start = time.time()
    if "pretrain" not in demo.stages:
        t = time.time()
        result = train(pcfg)
        rows = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if "loss" in r]
        from maevit.data.stream import resolve_source

        demo.record("pretrain", {
            "run_dir": result["run_dir"], "encoder": result["encoder"], "steps": result["step"],
            "batch": pcfg.data.batch_size * result["num_processes"] * pcfg.optim.accum_steps,
            "images_per_sec": _median_rate(Path(result["run_dir"]) / "metrics.jsonl") or 0.0,
            "sec": round(time.time() - t, 1), "first_loss": losses[0] if losses else float("nan"),
            "loss": losses[-1] if losses else float("nan"), "train": pcfg.data.train,
            "train_images": resolve_source(pcfg.data.train).num_samples, "val": pcfg.run.probe_val or "-",
            "val_images": resolve_source(pcfg.run.probe_val).num_samples if pcfg.run.probe_val else 0,
            "precision": result.get("precision", "fp32"),
        })
    pt = demo.stages["pretrain"]
    if "arch" not in demo.stages:
        demo.record("arch", _arch(pcfg))
    arch = demo.stages["arch"]
    if "knn" not in demo.stages and pcfg.run.probe_train and pcfg.run.probe_val:
        print("kNN top-1 of the pretrained and of a randomly initialised encoder ...")
        demo.record("knn", {"pretrained": _knn(pcfg, Path(pt["encoder"]), arch), "random": _knn(pcfg, None, arch)})

    frac = fbase.data.label_fraction or 1.0
    for tag in tags:
        for init in ("pretrained", "scratch"):
            name = f"finetune-{tag}-{init}"
            if name in demo.stages:
                continue
            fcfg = _demo_config(FinetuneConfig, "finetune", recipes, model, fine_ov)
            # the same architecture for both fine-tunes, whatever the recipe says: the pretraining's
            fcfg.model.name, fcfg.model.img_size = arch.get("model_name", pcfg.model.name), pcfg.model.img_size
            fcfg.model.args = _build_args(arch)
            fcfg.model.patch_size = fcfg.model.args.get("patch_size")  # (families with another patch argument: None)
            fcfg.data.mean, fcfg.data.std = pcfg.data.mean, pcfg.data.std
            fcfg.run.precision = pt.get("precision", "fp32")  # both fine-tunes at the pretraining's precision
            fcfg.run.dir, fcfg.run.seed = str(out / name), args.seed
            if tag != "10":  # all labels: the same number of optimizer steps as at the recipe's fraction
                fcfg.data.label_fraction = None
                fcfg.optim.epochs = max(1, round(fbase.optim.epochs * frac))
                fcfg.optim.warmup_epochs = fbase.optim.warmup_epochs * frac
                fcfg.run.eval_every = max(1, round(fbase.run.eval_every * frac))
            if init == "pretrained":
                fcfg.model.pretrained = pt["encoder"]
            else:
                fcfg.model.pretrained, fcfg.optim.layer_decay = None, 1.0
            _apply(fcfg, fine_ov)  # the user's overrides win, as before
            print(f"\n{name}: fine-tuning {'the pretrained encoder' if init == 'pretrained' else 'from scratch'} "
                  f"on {tag}% of the labels")
            t = time.time()
            res = finetune(fcfg)
            from maevit.data.stream import resolve_source, select_fraction

            src = resolve_source(fcfg.data.train)
            f = fcfg.data.label_fraction
            labeled = select_fraction(src, f, fcfg.data.label_seed).num_samples if f and f < 1 else src.num_samples
            demo.record(name, {"top1": res["top1"], "top5": res["top5"], "steps": res["step"],
                               "labeled": labeled, "run_dir": res["run_dir"], "sec": round(time.time() - t, 1),
                               "images_per_sec": _median_rate(Path(res["run_dir"]) / "metrics.jsonl")})
    demo.stages["total_sec"] = round(elapsed + time.time() - t_start, 1)
    demo.stages["threads"] = torch.get_num_threads()
    demo.save()
    print(_table(demo, settings))
    print(_where(demo))
    return 0


if __name__ == "__main__":
    sys.exit(main())
