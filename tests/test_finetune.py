"""Fine-tuning, probing and evaluation: weight loading, layer decay, label
fractions, kNN / probe, exactly-once evaluation, exact resume, export."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from maevit.models import CheckpointError, create_classifier, create_mae, export_encoder, read_header
from maevit.models.hf_vitmae import to_hf_vitmae_keys
from maevit.train.knn import extract_features, knn_accuracy, knn_classify
from maevit.train.optim import param_groups_layer_decay, set_lr

TINY = dict(img_size=32, patch_size=4, depth=2)  # 8x8 patches, 2 blocks


@pytest.fixture(scope="module")
def mae():
    torch.manual_seed(1)
    m = create_mae("mae_vit_tiny_patch16", decoder_depth=1, **TINY).eval()
    # non-trivial norms / biases, so a skipped or misplaced tensor changes the output
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m


def _published_layout(mae) -> dict:
    """maevit MAE -> the published MAE checkpoint layout (timm encoder names + decoder_*)."""
    ren = {"decoder.mask_token": "mask_token", "decoder.pos_embed": "decoder_pos_embed"}
    out = {}
    for k, v in mae.state_dict().items():
        if k.startswith("encoder."):
            out[k[len("encoder."):]] = v
        elif k in ren:
            out[ren[k]] = v
        else:
            out["decoder_" + k[len("decoder."):]] = v
    return out


def _classifier(src, pool="token", **kw):
    # foreign files do not say their geometry: it is passed (for maevit files it repeats the header's)
    return create_classifier("mae_vit_tiny_patch16", 10, pretrained=src, global_pool=pool, **{**TINY, **kw}).eval()


@pytest.mark.parametrize("fmt", ["maevit_encoder", "maevit_mae", "published_pth", "hf_vitmae", "timm"])
def test_every_format_loads_with_identical_encoder_outputs(mae, tmp_path, fmt):
    if fmt == "maevit_encoder":
        src = export_encoder(mae, tmp_path / "encoder.safetensors")
    elif fmt == "maevit_mae":
        src = tmp_path / "mae.safetensors"
        save_file({k: v.contiguous() for k, v in mae.state_dict().items()}, src)
    elif fmt == "published_pth":
        src = tmp_path / "checkpoint-799.pth"
        torch.save({"model": _published_layout(mae), "epoch": 799, "args": argparse.Namespace(lr=1e-3)}, src)
    elif fmt == "hf_vitmae":
        src = tmp_path / "pytorch_model.bin"
        torch.save(to_hf_vitmae_keys(mae.state_dict()), src)
    else:
        t = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY)
        t.load_state_dict(mae.encoder.state_dict())
        src = tmp_path / "timm.pth"
        torch.save(t.state_dict(), src)
    clf = _classifier(src)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clf.forward_features(x), mae.encoder.forward_features(x), rtol=1e-5, atol=1e-5)
    rep = clf.load_report
    assert sorted(rep.new) == ["head.bias", "head.weight"] and not rep.missing
    # average pooling (MAE fine-tuning): fresh fc_norm, pretrained final norm unused
    avg = _classifier(src, pool="avg")
    assert sorted(avg.load_report.new) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert {"norm.weight", "norm.bias"} <= set(avg.load_report.unexpected)
    assert "initialised fresh" in str(avg.load_report)


def test_hf_layout_matches_transformers_model(mae):
    """The HF conversion is checked against transformers itself, not just our own inverse."""
    import transformers  # a test dependency: missing is an error (see conftest.py), not a skip
    cfg = transformers.ViTMAEConfig(hidden_size=192, num_hidden_layers=2, num_attention_heads=3,
                                    intermediate_size=768, image_size=32, patch_size=4, mask_ratio=0.0,
                                    layer_norm_eps=1e-6, qkv_bias=True)
    hf = transformers.ViTMAEForPreTraining(cfg).eval()
    layout = "transformers5" if any(".layers." in k for k in hf.state_dict()) else "hub"
    enc = {k: v for k, v in to_hf_vitmae_keys(mae.state_dict(), layout=layout).items() if k.startswith("vit.")}
    missing, unexpected = hf.load_state_dict(enc, strict=False)  # the decoder sizes differ: encoder only
    assert not unexpected and all(k.startswith("decoder.") for k in missing)
    clf = _classifier({k: v for k, v in hf.state_dict().items() if k.startswith("vit.")})  # HF's own names
    x = torch.randn(2, 3, 32, 32)
    noise = torch.arange(64.0).expand(2, -1)  # mask ratio 0 and sorted noise: original patch order
    with torch.no_grad():
        ref = hf.vit(pixel_values=x, noise=noise).last_hidden_state
        torch.testing.assert_close(clf.forward_features(x), ref, rtol=1e-4, atol=1e-4)


def test_resolution_change_resamples_position_table(mae, tmp_path):
    src = export_encoder(mae, tmp_path / "encoder.safetensors")
    clf = _classifier(src, img_size=48)  # 8x8 -> 12x12 patches
    assert clf.pos_embed.shape == (1, 1 + 144, 192)
    expected = timm.layers.resample_abs_pos_embed(mae.encoder.pos_embed.detach(), [12, 12], [8, 8], num_prefix_tokens=1)
    torch.testing.assert_close(clf.pos_embed.detach(), expected)
    assert clf.load_report.resized["pos_embed"] == "(1, 65, 192) -> (1, 145, 192)"
    assert clf(torch.randn(1, 3, 48, 48)).shape == (1, 10)


def test_missing_weights_are_an_error_unless_not_strict(mae):
    sd = {k: v for k, v in mae.encoder.state_dict().items() if not k.startswith("blocks.1.")}
    with pytest.raises(CheckpointError, match=r"lacks .*blocks\.1\..*The checkpoint has 1 blocks, the model 2"):
        _classifier(sd)
    clf = _classifier(sd, strict=False)
    assert any(k.startswith("blocks.1.") for k in clf.load_report.missing)
    with pytest.raises(CheckpointError, match="4x4 patches .* 8x8 .*patch_size"):  # wrong patch size names the fix
        _classifier(mae.encoder.state_dict(), patch_size=8)


def test_a_file_rebuilds_its_own_architecture(mae, tmp_path):
    src = export_encoder(mae, tmp_path / "encoder.safetensors")
    clf = create_classifier(None, 10, pretrained=src)  # no name, no geometry: the header says them
    assert clf.patch_size == 4 and len(clf.blocks) == 2 and clf.img_size == (32, 32)


def test_layer_decay_groups_follow_published_rule():
    depth, decay = 3, 0.5
    model = create_classifier("mae_vit_tiny_patch16", 7, img_size=32, patch_size=4, depth=depth)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=decay)
    num_layers = depth + 1

    def layer_id(name: str) -> int:  # MAE's util/lr_decay.py rule
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return num_layers

    by_param = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(by_param) == len(names)
    for name, p in names.items():
        g = by_param[id(p)]
        assert g["lr_scale"] == pytest.approx(decay ** (num_layers - layer_id(name))), name
        no_wd = p.ndim == 1 or name in ("cls_token", "pos_embed")
        assert g["weight_decay"] == (0.0 if no_wd else 0.05), name
    opt = torch.optim.AdamW(groups, lr=1.0)
    set_lr(opt, 1e-3)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([1e-3 * decay**i for i in range(4, -1, -1)])


def _hashes(loader) -> list[tuple[int, int]]:
    return [(hash(x.numpy().tobytes()), int(y)) for xb, yb in loader for x, y in zip(xb, yb)]


def test_label_fraction_is_balanced_and_fixed_by_seed():
    from maevit.data.stream import labeled_loader

    kw = dict(img_size=32, batch_size=50, train=False, num_workers=0)
    a = _hashes(labeled_loader("bundled:train", label_fraction=0.05, label_seed=0, **kw))
    b = _hashes(labeled_loader("bundled:train", label_fraction=0.05, label_seed=0, **kw))
    c = _hashes(labeled_loader("bundled:train", label_fraction=0.05, label_seed=1, **kw))
    counts = torch.bincount(torch.tensor([y for _, y in a]), minlength=10)
    assert counts.tolist() == [10] * 10  # 5% of 200 per class, every class
    assert a == b
    assert set(a) != set(c) and len(c) == len(a)


def _toy_images(n_per_class: int, classes: int = 4, seed: int = 0):
    """Trivially separable images: each class a constant colour, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])[:classes, :, None, None]  # [K,3,1,1]
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = colours[y].expand(-1, -1, 32, 32) + 0.05 * torch.randn(len(y), 3, 32, 32, generator=g)
    return list(zip(x.split(8), y.split(8)))


def test_knn_classify_weighted_votes():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    scores = knn_classify(train, labels, torch.tensor([[0.1, 1.0], [1.0, 0.05]]), num_classes=2, k=3, T=0.07)
    assert scores.argmax(-1).tolist() == [1, 0]
    # k=3 counts all three: the lone class-1 neighbour still wins for the first query by weight
    assert scores[0, 1] > scores[0, 0] > 0


def test_knn_and_linear_probe_perfect_on_separable_toy_set():
    from maevit.train.probe import LinearProbe, build_lars

    torch.manual_seed(0)
    enc = create_classifier("mae_vit_tiny_patch16", 0, img_size=32, patch_size=8, depth=1, global_pool="token")
    train, val = _toy_images(16), _toy_images(8, seed=1)
    res = knn_accuracy(enc, train, val, num_classes=4, k=5)
    assert res["knn_top1"] == 100.0 and res["knn_samples"] == 32
    probe = LinearProbe(enc, 4)
    f, y = extract_features(enc, train)
    opt, hist = build_lars(probe.head, lr=4.0), []  # ~ 0.1 x batch 16k / 256
    for _ in range(100):
        loss = torch.nn.functional.cross_entropy(probe.head(f), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(loss.item())
    assert hist[-1] < hist[0]
    probe.eval()
    with torch.no_grad():
        pred = torch.cat([probe(x).argmax(-1) for x, _ in val])
    assert (pred == torch.cat([y for _, y in val])).all()
    assert not any(p.requires_grad for p in probe.encoder.parameters())


def test_evaluation_metrics_and_png(tmp_path):
    from PIL import Image

    from maevit.train.evaluate import count_predictions, format_report, save_confusion_png, ClassificationResult

    logits = torch.tensor([[5.0, 1, 0], [0, 5, 1], [0, 5, 1], [1, 0, 5]])
    conf, top5 = count_predictions(logits, torch.tensor([0, 1, 2, 2]), 3)
    assert conf.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]] and int(top5) == 4
    res = ClassificationResult(conf, int(top5), 0.0)
    assert res.top1 == 75.0 and res.per_class.tolist() == [100.0, 100.0, 50.0]
    assert "50.00%" in format_report(res, ["a", "b", "c"])
    png = save_confusion_png(conf, tmp_path / "c.png", ["a", "b", "c"])
    assert Image.open(png).size[0] > 60


# ----------------------------------------------------------------------------- end to end
def _ft_overrides(run_dir, **extra) -> list[str]:
    base = {
        "model.name": "mae_vit_tiny_patch16", "model.img_size": 32, "model.patch_size": 8,
        "model.args": "{depth: 1, embed_dim: 64, num_heads: 2}", "model.drop_path": 0.1,
        "data.train": "bundled:train", "data.val": "null", "data.batch_size": 8, "data.num_workers": 0,
        "data.label_fraction": 0.05, "optim.epochs": 2, "optim.warmup_epochs": 1, "optim.base_lr": 1e-3,
        "optim.layer_decay": 0.75, "optim.accum_steps": 2, "run.dir": str(run_dir), "run.log_every": 1,
        "run.ckpt_every": 0, "run.precision": "fp32",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.mark.slow
def test_finetune_resume_is_exact(tmp_path):
    """Stop mid-epoch inside an accumulation-aligned step, resume: same losses and weights.

    Mixup / cutmix, RandAugment, random erasing, drop path and EMA are all on."""
    from maevit.config import load_config
    from maevit.train.finetune import FinetuneConfig, finetune

    # 100 samples / batch 8 = 12 batches = 6 steps per epoch (accum 2): 12 steps in 2 epochs
    full = finetune(load_config(FinetuneConfig, None, _ft_overrides(tmp_path / "a", **{"run.ema": 0.9})))
    assert full["step"] == 12 and len(full["losses"]) == 12  # run.log_every=1: one mean loss per step
    part1 = finetune(load_config(FinetuneConfig, None, _ft_overrides(tmp_path / "b", **{"run.ema": 0.9, "optim.max_steps": 4})))
    assert part1["step"] == 4
    part2 = finetune(load_config(FinetuneConfig, None, _ft_overrides(tmp_path / "b", **{"run.ema": 0.9})))
    assert part2["resumed_from"] and part2["step"] == 12
    torch.testing.assert_close(torch.tensor(part1["losses"] + part2["losses"]), torch.tensor(full["losses"]),
                               rtol=0, atol=0)
    for name in ("classifier.safetensors", "classifier_ema.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{name}:{k}")


@pytest.mark.slow
def test_finetune_end_to_end_exports_timm_loadable_classifier(tmp_path, capsys):
    from maevit.train.evaluate import main_eval
    from maevit.train.finetune import main_finetune
    from maevit.train.probe import main_probe

    small = dict(img_size=32, patch_size=8, depth=1, embed_dim=64, num_heads=2)
    enc = export_encoder(create_mae("mae_vit_tiny_patch16", decoder_depth=1, **small), tmp_path / "encoder.safetensors")
    run = tmp_path / "ft"
    # no architecture in the command: the encoder file says it
    args = _ft_overrides(run, **{"model.pretrained": enc, "model.name": "null", "model.patch_size": "null",
                                 "model.args": "{}", "optim.epochs": 1, "data.val": "bundled:val"})
    assert main_finetune([a for a in args if not a.startswith("data.label_fraction")] + ["--label-fraction", "0.05"]) == 0
    meta = read_header(run / "classifier.safetensors")
    assert meta["num_classes"] == 10 and meta["build_args"]["patch_size"] == 8 and len(meta["class_names"]) == 10
    clf = timm.create_model(meta["timm_model"], pretrained=False, **meta["timm_kwargs"])
    clf.load_state_dict(load_file(run / "classifier.safetensors"), strict=True)
    assert "timm.create_model('vit_tiny_patch16_224'" in capsys.readouterr().out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_top1" in r for r in rows) and all(r["loss"] > 0 for r in rows if "loss" in r)
    assert all(r["tflops"] > 0 and 0 < r["mfu"] < 1 for r in rows if "loss" in r)  # FLOPs / MFU columns

    assert main_eval([str(run), "--data", "bundled:val", "--num-workers", "0", "--batch-size", "100"]) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["samples"] == 500 and len(report["per_class"]) == 10
    assert (run / "confusion.png").stat().st_size > 0
    assert "per-class accuracy" in capsys.readouterr().out

    probe_dir = tmp_path / "probe"
    assert main_probe([f"model.pretrained={enc}", "model.img_size=32", "data.train=bundled:train",
                       "data.val=bundled:val", "data.num_workers=0", "data.batch_size=32", "optim.epochs=2",
                       "optim.warmup_epochs=0", f"run.dir={probe_dir}", "--label-fraction", "0.05"]) == 0
    assert (probe_dir / "probe_head.safetensors").is_file()


_EVAL_2PROC = r"""
import json, sys, torch
from pathlib import Path
from accelerate import Accelerator
from maevit.train.evaluate import evaluate_classifier
from maevit.train.inputs import labeled_for_rank
from tests.test_finetune import _eval_model
acc = Accelerator(cpu=True)
loader = labeled_for_rank("bundled:val", acc, img_size=32, batch_size=7, train=False, num_workers=0, seed=0)
res = evaluate_classifier(_eval_model(), loader, 10, accelerator=acc)
local = sum(len(y) for _, y in loader)
if acc.is_main_process:
    json.dump({"n": acc.num_processes, "conf": res.confusion.tolist(), "top5": res.top5_correct}, open(sys.argv[1], "w"))
# one file per rank: two processes' lines on one shared stdout can be lost or interleaved
Path(sys.argv[1]).with_name(f"rank{acc.process_index}.json").write_text(json.dumps({"samples": local}))
"""


def _eval_model():
    torch.manual_seed(0)
    model = create_classifier("mae_vit_tiny_patch16", 10, img_size=32, patch_size=8, depth=1, embed_dim=64,
                              num_heads=2)
    with torch.no_grad():
        model.head.weight.normal_()  # a head that spreads predictions over classes
    return model.eval()


@pytest.mark.slow
def test_evaluation_counts_each_sample_once_across_two_processes(tmp_path):
    from maevit.data.stream import labeled_loader
    from maevit.train.evaluate import evaluate_classifier

    script = tmp_path / "ev.py"
    script.write_text(_EVAL_2PROC)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    two = tmp_path / "two.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), str(two)], check=True, env=env, timeout=120, capture_output=True, text=True)
    ref = evaluate_classifier(_eval_model(), labeled_loader("bundled:val", img_size=32, batch_size=7, train=False,
                                                            num_workers=0), 10)
    b = json.loads(two.read_text())
    assert b["n"] == 2
    per_rank = sorted(json.loads((tmp_path / f"rank{r}.json").read_text())["samples"] for r in range(2))
    assert sum(per_rank) == 500 and per_rank[0] < 500  # each rank saw a part, together everything once
    assert sum(map(sum, b["conf"])) == 500 and ref.num_samples == 500
    assert b["conf"] == ref.confusion.tolist() and b["top5"] == ref.top5_correct
