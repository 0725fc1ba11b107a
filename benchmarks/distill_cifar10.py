"""CIFAR-10: does DeiT's hard distillation from a CNN teacher help an MAE-pretrained DeiT?

Runs, on one small DeiT and one compute budget (every result goes to
``OUT/results.json``; a finished stage is not re-run; a Markdown table is printed):

1. MAE pretraining of ``mae_deit_tiny_patch16`` on the training images (labels unused;
   the distillation token is carried like the class token);
2. a CNN teacher (``timm:resnet18`` by default) fine-tuned from scratch on the same
   labels as the students: 100% and 10% of them;
3. DeiT students, at 100% and 10% of the labels: MAE-pretrained + hard distillation
   from the teacher trained on the same labels; MAE-pretrained without a teacher;
   from scratch without a teacher (and, with ``--scratch-distill``, from scratch with
   the teacher: DeiT's own setting). Each student reports the averaged heads' top-1
   and each head's own.

Usage (CPU; see BENCHMARKS.md for the budget that was run)::

    python benchmarks/distill_cifar10.py --data /tmp/cifar10 --out /tmp/distill \\
        --per-class 500 --pretrain-epochs 20 --ft-epochs 10

``--data`` is the extracted ``cifar10-jpg.tar.gz`` (extracted there when missing).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_cifar10 import ARCHIVE, _subset  # noqa: E402  (the same class-balanced subsets)

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/cifar10")
    p.add_argument("--out", default="/tmp/distill_cifar10")
    p.add_argument("--per-class", type=int, default=500, help="training images per class")
    p.add_argument("--test-per-class", type=int, default=200)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--depth", type=int, default=12, help="blocks (DeiT-Tiny: 12, width 192, 3 heads)")
    p.add_argument("--pretrain-epochs", type=int, default=20)
    p.add_argument("--pretrain-lr", type=float, default=1.5e-3)
    p.add_argument("--ft-epochs", type=int, default=10, help="fine-tune epochs at 100%% labels")
    p.add_argument("--ft-epochs-low", type=int, default=None, help="at 10%% labels (default: 3x --ft-epochs)")
    p.add_argument("--teacher", default="timm:resnet18")
    p.add_argument("--teacher-args", default="{output_stride: 8}",
                   help="model.args of the teacher (ResNet at 32 px: dilate the last two stages)")
    p.add_argument("--teacher-epochs", type=float, default=2.0, help="teacher epochs = this x the students'")
    p.add_argument("--teacher-lr", type=float, default=4e-3, help="base lr (x batch/256) of the teacher")
    p.add_argument("--teacher-labels", choices=("same", "all"), default="same",
                   help="same: each student's teacher saw the student's labels; all: every student's teacher is "
                        "the one trained on 100%% of the labels (DeiT's setting: a teacher that knows more)")
    p.add_argument("--fractions", default="10,100", help="label budgets to run, of 10,100")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--distill-type", choices=("hard", "soft"), default="hard",
                   help="hard: CE with the teacher's argmax (DeiT); soft: KL at --tau")
    p.add_argument("--tau", type=float, default=1.0, help="soft distillation's temperature")
    p.add_argument("--students", default="", help="comma list of students to run (default: all), of "
                   "mae_distill,mae_distill_unl,mae,scratch,scratch_distill")
    p.add_argument("--scratch-distill", action="store_true", help="also: from scratch + distillation")
    p.add_argument("--distill-unlabeled", action="store_true",
                   help="also, below 100%% labels: MAE + distillation whose distillation term also reads every "
                        "training image, labeled or not (distill.unlabeled=the training folder)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"),
                   help="run.precision of every run (auto: bf16 where the CPU has bf16 units)")
    p.add_argument("--seed", type=int, default=0, help="run.seed of the students (init, data order, augmentation)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--only", default="", help="comma list of stages: pretrain,teacher,student,diagnose")
    a = p.parse_args()

    import yaml

    from maevit.config import make_config, merge
    from maevit.train import pretrain as pt
    from maevit.train.finetune import FinetuneConfig, finetune

    data, out = Path(a.data), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (data / "train").is_dir():
        data.mkdir(parents=True, exist_ok=True)
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(data, filter="data")
    train = _subset(data / "train", out / f"train{a.per_class}", a.per_class)
    test = _subset(data / "test", out / f"test{a.test_per_class}", a.test_per_class)
    stages = set(a.only.split(",")) if a.only else {"pretrain", "teacher", "student", "diagnose"}
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    def save(key: str, value) -> None:
        results[key] = value
        results_path.write_text(json.dumps(results, indent=1))
        print(f"[{time.strftime('%H:%M:%S')}] {key}: {value}", flush=True)

    import torch

    save("budget", dict(per_class=a.per_class, test_per_class=a.test_per_class, patch=a.patch, depth=a.depth,
                        pretrain_epochs=a.pretrain_epochs, ft_epochs=a.ft_epochs,
                        ft_epochs_low=a.ft_epochs_low or 3 * a.ft_epochs, teacher=a.teacher,
                        teacher_args=a.teacher_args, teacher_epochs=a.teacher_epochs, alpha=a.alpha,
                        teacher_labels=a.teacher_labels, precision=a.precision, distill_type=a.distill_type, tau=a.tau,
                        threads=torch.get_num_threads()))
    size = dict(patch_size=a.patch, args={"depth": a.depth})  # the student's size, from scratch
    enc_path = out / "pretrain" / "encoder.safetensors"
    if "pretrain" in stages and not enc_path.is_file():
        t = time.time()
        res = pt.train(make_config(
            pt.PretrainConfig,
            model=dict(name="mae_deit_tiny_patch16", img_size=32, **size, decoder_embed_dim=128, decoder_depth=2,
                       decoder_num_heads=4),
            data=dict(train=str(train), batch_size=128, num_workers=a.workers, mean=list(MEAN), std=list(STD)),
            optim=dict(epochs=a.pretrain_epochs, base_lr=a.pretrain_lr, warmup_epochs=1),
            run=dict(dir=str(out / "pretrain"), log_every=10, ckpt_every=200, viz_every=0, progress=False, keep_last=1,
                     precision=a.precision)))
        save("pretrain", dict(loss=res.get("loss"), minutes=round((time.time() - t) / 60, 1),
                              images_per_sec=res.get("images_per_sec")))

    def common(fraction: float | None, epochs: int, name: str) -> dict[str, dict]:
        """The sections every fine-tune shares (merged under each run's own with maevit.config.merge)."""
        return dict(
            model=dict(img_size=32),
            data=dict(train=str(train), val=str(test), batch_size=64, num_workers=a.workers,
                      label_fraction=fraction or None, mean=list(MEAN), std=list(STD), mixup=0.8, cutmix=1.0,
                      smoothing=0.1, re_prob=0.25),
            optim=dict(epochs=epochs, warmup_epochs=2, weight_decay=0.05),
            # every run alike
            run=dict(dir=str(out / name), eval_every=epochs, log_every=20, progress=False, precision=a.precision,
                     seed=a.seed),
        )

    def record(name: str, res: dict, t: float) -> None:
        row = {k: res.get(k) for k in ("top1", "top5", "top1_cls", "top1_dist") if res.get(k) is not None}
        save(name, dict(row, minutes=round((time.time() - t) / 60, 1)))

    low = a.ft_epochs_low or 3 * a.ft_epochs
    plans = [(f, t, e) for f, t, e in ((0.1, "10", low), (None, "100", a.ft_epochs))  # the cheap pair first
             if t in a.fractions.split(",")]
    teacher_tag = {tag: ("100" if a.teacher_labels == "all" else tag) for _, tag, _ in plans}
    teacher_plans = [(f, t, e) for f, t, e in ((0.1, "10", low), (None, "100", a.ft_epochs))
                     if t in teacher_tag.values()]
    for frac, tag, epochs in teacher_plans:
        name = f"teacher_{tag}"
        if "teacher" in stages and name not in results:
            t = time.time()
            res = finetune(make_config(FinetuneConfig, **merge(common(frac, round(epochs * a.teacher_epochs), name), dict(
                model=dict(name=a.teacher, args=yaml.safe_load(a.teacher_args) or {}, drop_path=0.05),
                optim=dict(base_lr=a.teacher_lr, layer_decay=1.0)))))
            record(name, res, t)
    for frac, tag, epochs in plans:
        teacher = out / f"teacher_{teacher_tag[tag]}"
        runs = [("mae_distill", enc_path, teacher), ("mae", enc_path, None), ("scratch", None, None)]
        if a.scratch_distill:
            runs.append(("scratch_distill", None, teacher))
        if a.distill_unlabeled and frac is not None:
            runs.insert(1, ("mae_distill_unl", enc_path, teacher))
        for kind, pretrained, teach in runs:
            name = f"ft_{kind}_{tag}"
            if "student" not in stages or name in results or (a.students and kind not in a.students.split(",")):
                continue
            t = time.time()
            own = dict(
                model=dict(name="mae_deit_tiny_patch16", pretrained=str(pretrained) if pretrained else None,
                           drop_path=0.1, **({} if pretrained else size)),
                # layer decay only for a pretrained encoder (from scratch it would starve the lower blocks)
                optim=dict(base_lr=1.0e-3, layer_decay=0.75 if pretrained else 1.0),
                **({"distill": dict(teacher=str(teach), type=a.distill_type, alpha=a.alpha, tau=a.tau,
                                    unlabeled=str(train) if kind.endswith("_unl") else None)}
                   if teach is not None else {}))
            record(name, finetune(make_config(FinetuneConfig, **merge(common(frac, epochs, name), own))), t)

    if "diagnose" in stages:  # how far each student follows its teacher on the test set
        for tag in ("10", "100"):
            for kind in ("mae_distill", "mae_distill_unl", "mae", "scratch", "scratch_distill"):
                name, key = f"ft_{kind}_{tag}", f"agree_{kind}_{tag}"
                if key in results or not (out / name / "classifier.safetensors").is_file() or \
                        not (out / f"teacher_{teacher_tag.get(tag, tag)}" / "classifier.safetensors").is_file():
                    continue
                save(key, _agreement(out / name, out / f"teacher_{teacher_tag.get(tag, tag)}", test, a.workers))

    def cell(key: str, field: str = "top1") -> str:
        v = results.get(key, {}).get(field)
        return f"{v:.1f}%" if v is not None else "-"

    print("\n| CIFAR-10 top-1 (test) | 10% labels | 100% labels |\n|---|---|---|")
    print(f"| teacher {a.teacher} ({'same labels' if a.teacher_labels == 'same' else 'trained on all labels: both columns are its 100% figure'}) | {cell('teacher_10')} | {cell('teacher_100')} |")
    kinds = [("mae_distill", "DeiT MAE + hard distillation"), ("mae", "DeiT MAE, no teacher"),
             ("scratch", "DeiT from scratch, no teacher")]
    if a.distill_unlabeled:
        kinds.insert(1, ("mae_distill_unl", "DeiT MAE + hard distillation on every training image"))
    if a.scratch_distill:
        kinds.append(("scratch_distill", "DeiT from scratch + hard distillation"))
    for kind, label in kinds:
        print(f"| {label} | {cell(f'ft_{kind}_10')} | {cell(f'ft_{kind}_100')} |")
        for head in ("cls", "dist"):
            if any(f"top1_{head}" in results.get(f"ft_{kind}_{t}", {}) for t in ("10", "100")):
                print(f"| ... {head} head alone | {cell(f'ft_{kind}_10', 'top1_' + head)} | "
                      f"{cell(f'ft_{kind}_100', 'top1_' + head)} |")


def _agreement(student_dir: Path, teacher_dir: Path, test: Path, workers: int) -> dict[str, float]:
    """Test-set agreement (%) of the student's heads with the teacher's predictions, and where they differ,
    which one is right: is the distillation head learning the teacher, and is the teacher worth learning?"""
    import torch

    from maevit.data.stream import labeled_loader
    from maevit.train.evaluate import classifier_logits, load_classifier

    student, head = load_classifier(student_dir)
    teacher, _ = load_classifier(teacher_dir)
    student.eval(), teacher.eval()
    loader = labeled_loader(str(test), img_size=32, batch_size=250, train=False, num_workers=workers,
                            mean=tuple(head["mean"]), std=tuple(head["std"]))
    n = 0
    counts: dict[str, float] = {}
    with torch.no_grad():
        for x, y in loader:
            t = teacher(x).argmax(-1)
            logits, heads = classifier_logits(student, x)
            preds = {"avg": logits.argmax(-1), **{h: v.argmax(-1) for h, v in heads.items()}}
            for h, pr in preds.items():
                counts[f"{h}_agrees"] = counts.get(f"{h}_agrees", 0) + (pr == t).sum().item()
            s = preds["avg"]
            counts["differ_student_right"] = counts.get("differ_student_right", 0) + ((s != t) & (s == y)).sum().item()
            counts["differ_teacher_right"] = counts.get("differ_teacher_right", 0) + ((s != t) & (t == y)).sum().item()
            n += len(y)
    return {k: round(100.0 * v / n, 2) for k, v in counts.items()}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
