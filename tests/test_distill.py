"""Distillation pieces: hand-computed losses, the frozen teacher, teacher files (maevit.train.distill)."""
import json
import math

import pytest
import torch
from torch import nn

from maevit.config import ConfigError
from maevit.models import create_classifier, read_header
from maevit.models.weights import header_of, save_weights
from maevit.train.distill import (
    DistillConfig, Teacher, build_teacher, distillation_loss, hard_distillation_loss, soft_distillation_loss,
)

LN3 = math.log(3.0)


def test_hard_distillation_is_cross_entropy_with_the_teacher_argmax():
    student = torch.tensor([[0.0, LN3], [0.0, LN3]])  # softmax [1/4, 3/4] for both samples
    teacher = torch.tensor([[5.0, 1.0], [-1.0, 2.0]])  # argmax 0, then 1
    expect = (math.log(4.0) + math.log(4.0 / 3.0)) / 2  # -log(1/4), -log(3/4), averaged
    assert hard_distillation_loss(student, teacher).item() == pytest.approx(expect, abs=1e-6)
    assert hard_distillation_loss(student, teacher * 100).item() == pytest.approx(expect, abs=1e-6)  # argmax only


def test_soft_distillation_is_kl_at_temperature_times_tau_squared():
    tau = 2.0
    student = torch.tensor([[0.0, 2 * LN3]])  # / tau -> softmax [1/4, 3/4]
    teacher = torch.tensor([[2 * LN3, 0.0]])  # / tau -> softmax [3/4, 1/4]
    kl = 0.75 * math.log(0.75 / 0.25) + 0.25 * math.log(0.25 / 0.75)  # KL(teacher || student) = ln(3) / 2
    assert soft_distillation_loss(student, teacher, tau).item() == pytest.approx(kl * tau**2, abs=1e-6)
    two = torch.cat([student, teacher]), torch.cat([teacher, teacher])  # second sample: KL 0
    assert soft_distillation_loss(*two, tau).item() == pytest.approx(kl * tau**2 / 2, abs=1e-6)  # mean over samples


def test_total_loss_weights_label_and_distillation_terms():
    cls_logits, dist_logits = torch.tensor([[0.0, LN3]]), torch.tensor([[LN3, 0.0]])
    targets, teacher = torch.tensor([1]), torch.tensor([[0.0, 1.0]])  # teacher says class 1
    base = math.log(4.0 / 3.0)  # CE(cls head, label 1)
    dist = math.log(4.0)  # CE(dist head, teacher's class 1)
    out = distillation_loss((cls_logits, dist_logits), targets, teacher, nn.CrossEntropyLoss(), kind="hard", alpha=0.5)
    assert out.loss.item() == pytest.approx(0.5 * base + 0.5 * dist, abs=1e-6)
    assert (out.base.item(), out.distill.item()) == (pytest.approx(base, abs=1e-6), pytest.approx(dist, abs=1e-6))
    out = distillation_loss((cls_logits, dist_logits), targets, teacher, nn.CrossEntropyLoss(), kind="hard", alpha=0.1)
    assert out.loss.item() == pytest.approx(0.9 * base + 0.1 * dist, abs=1e-6)
    # one head (a plain ViT student): the same logits in both terms
    single = distillation_loss(cls_logits, targets, teacher, nn.CrossEntropyLoss(), kind="hard", alpha=0.5)
    assert single.loss.item() == pytest.approx(base, abs=1e-6)


def _cnn_teacher(tmp_path, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)):
    model = create_classifier("timm:test_resnet", 4)
    path = save_weights(model.state_dict(), tmp_path / "classifier.safetensors",
                        header_of(model, "classifier", mean=list(mean), std=list(std)))
    return model.eval(), path


def test_teacher_is_frozen_in_eval_mode_and_gets_no_gradient(tmp_path):
    model, path = _cnn_teacher(tmp_path)
    teacher = build_teacher(DistillConfig(teacher=str(tmp_path)), num_classes=4,  # a run dir works too
                            student_mean=(0.5, 0.5, 0.5), student_std=(0.25, 0.25, 0.25))
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    teacher.train()  # a parent's .train() must not wake batch norm / dropout
    assert not teacher.training and not teacher.model.training
    student = create_classifier("mae_deit_tiny_patch16", 4, img_size=32, patch_size=8, depth=1).train()
    student.set_distilled_training(True)
    x = torch.randn(2, 3, 32, 32)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    logits = teacher(x)
    assert logits.grad_fn is None
    torch.testing.assert_close(logits, model(x))  # same normalisation: the images pass unchanged
    loss = distillation_loss(student(x), torch.tensor([0, 1]), logits, nn.CrossEntropyLoss()).loss
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.head_dist.weight.grad.abs().sum() > 0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # BN statistics untouched


def test_teacher_converts_the_students_normalisation_to_its_own(tmp_path):
    model, path = _cnn_teacher(tmp_path, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    teacher = build_teacher(DistillConfig(teacher=str(path)), num_classes=4, student_mean=(0.5, 0.5, 0.5),
                            student_std=(0.25, 0.25, 0.25))
    pixels = torch.rand(2, 3, 32, 32)
    as_student = (pixels - 0.5) / 0.25
    as_teacher = (pixels - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)
    torch.testing.assert_close(teacher(as_student), model(as_teacher), atol=1e-5, rtol=1e-5)


def test_teacher_errors_are_clear(tmp_path):
    _, path = _cnn_teacher(tmp_path)
    with pytest.raises(ValueError, match="predicts 4 classes, the student 10"):
        build_teacher(DistillConfig(teacher=str(path)), num_classes=10, student_mean=(0,) * 3, student_std=(1,) * 3)
    with pytest.raises(ConfigError, match="downloads nothing"):
        DistillConfig(teacher="timm:resnet18").validate()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_teacher(DistillConfig(teacher=str(tmp_path / "nope")), num_classes=4, student_mean=(0,) * 3,
                      student_std=(1,) * 3)
    encoder = create_classifier("timm:test_resnet", 0)
    enc_file = save_weights(encoder.state_dict(), tmp_path / "enc.safetensors", header_of(encoder, "encoder"))
    with pytest.raises(ValueError, match="not a classifier"):
        build_teacher(DistillConfig(teacher=str(enc_file)), num_classes=4, student_mean=(0,) * 3, student_std=(1,) * 3)


def test_timm_name_with_a_weights_file_is_a_teacher(tmp_path):
    model = create_classifier("timm:test_resnet", 4).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pth")  # plain timm weights, no maevit header
    cfg = DistillConfig(teacher="timm:test_resnet", weights=str(tmp_path / "weights.pth"))
    cfg.validate()
    teacher = build_teacher(cfg, num_classes=4, student_mean=model.pretrained_cfg["mean"],
                            student_std=model.pretrained_cfg["std"])
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(teacher(x), model(x))
    assert isinstance(teacher, Teacher)


def test_timm_cnn_classifier_file_rebuilds_from_its_header_and_loads_into_timm(tmp_path):
    import timm
    from safetensors.torch import load_file

    model = create_classifier("timm:test_resnet", 4, img_size=32, drop_path_rate=0.1).eval()
    head = header_of(model, "classifier")
    assert head["model_name"] == "timm:test_resnet" and head["build_args"]["img_size"] == 32
    assert "img_size" not in head["timm_kwargs"]  # a CNN has no such argument
    path = save_weights(model.state_dict(), tmp_path / "classifier.safetensors", head)
    again = create_classifier(None, 4, pretrained=path, global_pool=None).eval()
    ref = timm.create_model(head["timm_model"], pretrained=False, **head["timm_kwargs"]).eval()
    ref.load_state_dict(load_file(str(path)), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), model(x)) and torch.equal(ref(x), model(x))
    with pytest.raises(KeyError, match="unknown timm model 'resnet19'"):
        create_classifier("timm:resnet19", 4)


# ----------------------------------------------------------------------------- through the fine-tune loop
def _student(run_dir, teacher, **extra) -> list[str]:
    base = {
        "model.name": "mae_deit_tiny_patch16", "model.img_size": 32, "model.patch_size": 8,
        "model.args": "{depth: 1, embed_dim: 64, num_heads: 2}", "data.train": "bundled:train", "data.val": "null",
        "data.batch_size": 8, "data.num_workers": 0, "data.label_fraction": 0.05, "optim.epochs": 1,
        "optim.warmup_epochs": 0, "optim.accum_steps": 2, "run.dir": str(run_dir), "run.log_every": 1,
        "run.progress": "false", "distill.teacher": str(teacher),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.mark.slow
def test_two_finetune_steps_with_a_cnn_teacher_through_the_cli(tmp_path, capsys, one_thread):
    import timm
    from safetensors.torch import load_file

    from maevit.train.evaluate import main_eval
    from maevit.train.finetune import main_finetune

    common = ["data.train=bundled:train", "data.val=bundled:val", "data.batch_size=8", "data.num_workers=0",
              "optim.max_steps=2", "optim.warmup_epochs=0", "run.progress=false", "model.img_size=32"]
    teacher = tmp_path / "teacher"
    assert main_finetune(["model.name=timm:test_resnet", *common, f"run.dir={teacher}"]) == 0
    student = tmp_path / "student"
    assert main_finetune(["model.name=mae_deit_tiny_patch16", "model.patch_size=8", "model.args={depth: 1}",
                          *common, f"run.dir={student}", f"distill.teacher={teacher}", "distill.type=soft",
                          "distill.tau=2.0"]) == 0
    out = capsys.readouterr().out
    assert "fine-tuning done at step 2" in out and "cls head" in out and "dist head" in out
    # the classifier loads strictly into timm's distilled DeiT; the teacher is nowhere in the student's files
    meta = read_header(student / "classifier.safetensors")
    assert meta["timm_model"] == "deit_tiny_distilled_patch16_224"
    ref = timm.create_model(meta["timm_model"], pretrained=False, **meta["timm_kwargs"])
    ref.load_state_dict(load_file(student / "classifier.safetensors"), strict=True)
    ckpt = student / "checkpoints" / "step-00000002"
    saved = load_file(ckpt / "model.safetensors")
    assert set(saved) == set(ref.state_dict())  # student weights only
    opt = torch.load(ckpt / "optimizer.bin", weights_only=True)
    assert sum(len(g["params"]) for g in opt["param_groups"]) == sum(1 for p in ref.parameters() if p.requires_grad)
    # maevit eval reports each head too, and evaluates the CNN teacher's file
    assert main_eval([str(student), "--data", "bundled:val", "--num-workers", "0", "--batch-size", "100"]) == 0
    assert "each head alone" in capsys.readouterr().out
    assert {"top1_cls", "top1_dist"} <= set(json.loads((student / "eval.json").read_text()))
    assert main_eval([str(teacher), "--data", "bundled:val", "--num-workers", "0", "--batch-size", "100"]) == 0


@pytest.mark.slow
def test_resume_with_a_teacher_is_exact(tmp_path, one_thread):
    """Stop mid-epoch, resume: the same losses and weights as one straight run (mixup, cutmix,
    RandAugment, random erasing and drop path on; the teacher sees the same mixed images)."""
    from safetensors.torch import load_file

    from maevit.config import load_config
    from maevit.train.finetune import FinetuneConfig, finetune

    torch.manual_seed(0)
    t = create_classifier("timm:test_resnet", 10)  # a teacher for the bundled data's 10 classes
    teacher = save_weights(t.state_dict(), tmp_path / "t10.safetensors", header_of(t, "classifier"))
    # 100 samples / batch 8 = 12 batches = 6 steps (accum 2)
    full = finetune(load_config(FinetuneConfig, None, _student(tmp_path / "a", teacher)))
    assert full["step"] == 6 and len(full["losses"]) == 6
    part1 = finetune(load_config(FinetuneConfig, None, _student(tmp_path / "b", teacher, **{"optim.max_steps": 2})))
    part2 = finetune(load_config(FinetuneConfig, None, _student(tmp_path / "b", teacher)))
    assert part1["step"] == 2 and part2["resumed_from"] and part2["step"] == 6
    torch.testing.assert_close(torch.tensor(part1["losses"] + part2["losses"]), torch.tensor(full["losses"]),
                               rtol=0, atol=0)
    a, b = load_file(tmp_path / "a" / "classifier.safetensors"), load_file(tmp_path / "b" / "classifier.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the teacher mattered: without it the same run ends elsewhere
    alone = finetune(load_config(FinetuneConfig, None, _student(tmp_path / "c", teacher, **{"distill.teacher": "null"})))
    assert alone["losses"] != full["losses"]


def test_the_label_term_reads_the_labeled_rows_and_the_distillation_term_every_row():
    """distill.unlabeled: the first rows have labels, the rest only the teacher's answers."""
    cls_logits = torch.tensor([[0.0, LN3], [5.0, -5.0]])  # row 2 is unlabeled: its class head is ignored
    dist_logits = torch.tensor([[LN3, 0.0], [0.0, LN3]])
    teacher = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # says class 1 for both
    out = distillation_loss((cls_logits, dist_logits), torch.tensor([1]), teacher, nn.CrossEntropyLoss(),
                            kind="hard", alpha=0.5, labeled=1)
    base = math.log(4.0 / 3.0)  # CE(row 1's class head, label 1)
    dist = (math.log(4.0) + math.log(4.0 / 3.0)) / 2  # CE(both rows' distillation heads, the teacher's class 1)
    assert (out.base.item(), out.distill.item()) == (pytest.approx(base, abs=1e-6), pytest.approx(dist, abs=1e-6))
    assert out.loss.item() == pytest.approx(0.5 * base + 0.5 * dist, abs=1e-6)


def test_unlabeled_images_without_a_teacher_or_too_few_of_them_are_clear_errors(tmp_path, capsys):
    from maevit.train.finetune import main_finetune

    with pytest.raises(ConfigError, match="needs a teacher"):
        DistillConfig(unlabeled="bundled:train").validate()
    common = ["model.name=mae_deit_tiny_patch16", "model.img_size=32", "model.patch_size=8", "model.args={depth: 1}",
              "data.train=bundled:train", "data.val=null", "data.num_workers=0", "run.progress=false"]
    assert main_finetune([*common, f"run.dir={tmp_path / 'a'}", "distill.unlabeled=bundled:val"]) == 2
    assert "needs a teacher" in capsys.readouterr().err
    model = create_classifier("timm:test_resnet", 10)
    teacher = save_weights(model.state_dict(), tmp_path / "t10.safetensors", header_of(model, "classifier"))
    few = tmp_path / "few" / "cat"
    few.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(few / "one.png")
    assert main_finetune([*common, f"run.dir={tmp_path / 'b'}", f"distill.teacher={teacher}", "data.batch_size=8",
                          f"distill.unlabeled={few.parent}"]) == 2
    assert "fewer than one batch" in capsys.readouterr().err
    assert main_finetune([*common, f"run.dir={tmp_path / 'b'}", f"distill.teacher={teacher}",
                          f"distill.unlabeled={tmp_path / 'nope'}"]) == 2
    assert f"distill.unlabeled={tmp_path / 'nope'}: data source" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # nothing written


@pytest.mark.slow
def test_unlabeled_images_reach_the_teacher_and_resume_is_exact(tmp_path, one_thread, monkeypatch):
    """One batch of distill.unlabeled beside each labeled batch: the teacher labels twice the images, the
    run ends elsewhere than without them, and a stop + resume draws the same unlabeled batches."""
    from safetensors.torch import load_file

    import maevit.train.finetune as ft
    from maevit.config import load_config

    torch.manual_seed(0)
    t = create_classifier("timm:test_resnet", 10)
    teacher = save_weights(t.state_dict(), tmp_path / "t10.safetensors", header_of(t, "classifier"))
    seen = []  # images per teacher call

    def counting_teacher(*args, **kwargs):
        model = build_teacher(*args, **kwargs)
        model.register_forward_hook(lambda m, inputs, out: seen.append(len(inputs[0])))
        return model

    monkeypatch.setattr(ft, "build_teacher", counting_teacher)
    from PIL import Image

    folder = tmp_path / "unlabeled"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(20):  # 2 batches of 8 per epoch: the 12 micro-batches wrap it 6 times, the stop at step 2 too
        pixels = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    unl = {"distill.unlabeled": str(folder)}

    def run(name, **extra):
        return ft.finetune(load_config(ft.FinetuneConfig, None, _student(tmp_path / name, teacher, **extra)))

    full = run("a", **unl)
    assert full["step"] == 6 and set(seen) == {16}  # 8 labeled + 8 unlabeled images per micro-batch
    part1 = run("b", **unl, **{"optim.max_steps": 2})
    part2 = run("b", **unl)
    without = run("c")
    assert part2["resumed_from"] and part2["step"] == 6
    torch.testing.assert_close(torch.tensor(part1["losses"] + part2["losses"]), torch.tensor(full["losses"]),
                               rtol=0, atol=0)
    a, b = load_file(tmp_path / "a" / "classifier.safetensors"), load_file(tmp_path / "b" / "classifier.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without["losses"] != full["losses"]


def test_teacher_and_student_recipes_load():
    from pathlib import Path

    from maevit.config import load_config
    from maevit.train.finetune import FinetuneConfig

    root = Path(__file__).resolve().parents[1] / "finetune"
    teacher = load_config(FinetuneConfig, root / "cifar10_resnet_teacher.yaml")
    student = load_config(FinetuneConfig, root / "cifar10_deit_tiny_distill.yaml")
    assert teacher.model.name.startswith("timm:") and not teacher.distill.enabled
    assert student.distill.teacher == teacher.run.dir and student.distill.type == "hard"
    assert (student.data.mean, student.data.std) == (teacher.data.mean, teacher.data.std)


# ----------------------------------------------------------------------------- during pretraining (DMAE)
def _student_mae():
    from maevit.models import create_mae

    return create_mae("mae_deit_tiny_patch16", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2,
                      decoder_depth=1, decoder_embed_dim=32, decoder_num_heads=2)


def _teacher_encoder(tmp_path, patch_size=8):
    from maevit.models import create_mae, export_encoder

    mae = create_mae("mae_vit_small_patch16", img_size=32, patch_size=patch_size, depth=1, decoder_depth=1)
    return mae.encoder.eval(), export_encoder(mae, tmp_path / f"teacher{patch_size}.safetensors")


def test_feature_teacher_encodes_the_students_visible_units(tmp_path):
    from maevit.train.distill import FeatureDistillConfig, StudentTokens, build_feature_teacher, feature_distill_loss

    student = _student_mae().train()
    enc, path = _teacher_encoder(tmp_path)
    teacher = build_feature_teacher(FeatureDistillConfig(teacher=str(path)), student.encoder,
                                    student_mean=(0.5,) * 3, student_std=(0.25,) * 3)
    x = torch.randn(2, 3, 32, 32)
    mask = student.random_mask(2, generator=torch.Generator().manual_seed(0))
    feats = teacher(x, mask)
    assert feats.shape == (2, 4, 384) and feats.grad_fn is None  # 4 visible of 16 patches, no prefix
    with torch.no_grad():
        torch.testing.assert_close(feats, enc.forward_masked(x, mask)[:, 1:])
    tokens = StudentTokens(student.encoder, 0)  # block 0's output, by a hook
    out = student(x, mask=mask)
    assert tokens(out.latent).shape == (2, 4, 64)
    proj = torch.nn.Linear(64, 384)
    loss = out.loss + feature_distill_loss(tokens(out.latent), feats, proj)
    loss.backward()
    assert proj.weight.grad is not None and student.encoder.blocks[0].attn.qkv.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    assert torch.equal(StudentTokens(student.encoder, None)(out.latent), out.latent[:, 2:])
    _, other = _teacher_encoder(tmp_path, patch_size=4)
    with pytest.raises(ValueError, match="same patches and mask units"):
        build_feature_teacher(FeatureDistillConfig(teacher=str(other)), student.encoder, student_mean=(0.5,) * 3,
                              student_std=(0.25,) * 3)
    with pytest.raises(ConfigError, match="student_block=7"):
        StudentTokens(student.encoder, 7)


@pytest.mark.slow
def test_pretraining_with_a_feature_teacher_resumes_exactly(tmp_path, one_thread):
    from safetensors.torch import load_file

    from maevit.config import load_config
    from maevit.train.pretrain import PretrainConfig, train

    _, teacher = _teacher_encoder(tmp_path)
    args = ["model.name=mae_deit_tiny_patch16", "model.img_size=32", "model.patch_size=8", "model.embed_dim=64",
            "model.depth=2", "model.num_heads=2", "model.decoder_embed_dim=32", "model.decoder_depth=1",
            "model.decoder_num_heads=2", "data.train=bundled:train", "data.batch_size=8", "data.num_workers=0",
            "data.shuffle_buffer=64", "optim.epochs=1", "optim.warmup_epochs=0.05", "run.progress=false",
            "run.viz_every=0", "run.log_every=1", "run.ckpt_every=2", "optim.accum_steps=2",
            f"distill.teacher={teacher}", "distill.student_block=-1", "distill.weight=0.5"]
    cfg = lambda run, *more: load_config(PretrainConfig, None, [*args, f"run.dir={run}", *more])  # noqa: E731
    train(cfg(tmp_path / "full", "optim.max_steps=4"))
    assert train(cfg(tmp_path / "part", "optim.max_steps=2"))["step"] == 2
    assert train(cfg(tmp_path / "part", "optim.max_steps=4"))["resumed_from"].endswith("step-00000002")
    rows = lambda run: [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    assert rows(tmp_path / "part") == rows(tmp_path / "full") and len(rows(tmp_path / "full")) == 4
    # the loss's parts are logged beside it (means over the same micro-batches): loss = pixel + weight x feature
    for r in map(json.loads, (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()):
        assert r["loss"] == pytest.approx(r["loss_pixel"] + 0.5 * r["loss_distill"], rel=1e-5)
    a, b = tmp_path / "full" / "checkpoints" / "step-00000004", tmp_path / "part" / "checkpoints" / "step-00000004"
    for name in ("model.safetensors", "model_1.safetensors"):  # the MAE, then the projection
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the checkpoint holds the MAE and the projection, never the teacher; the optimizer the same
    assert set(load_file(a / "model_1.safetensors")) == {"weight", "bias"}
    mae_keys = set(_student_mae().state_dict())
    assert set(load_file(a / "model.safetensors")) == mae_keys
    opt = torch.load(a / "optimizer.bin", weights_only=True)
    n_trainable = sum(1 for p in _student_mae().parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt["param_groups"]) == n_trainable + 2
    # off by default: the same command without a teacher has no projection
    train(cfg(tmp_path / "plain", "optim.max_steps=2", "distill.teacher=null"))
    assert not (tmp_path / "plain" / "checkpoints" / "step-00000002" / "model_1.safetensors").exists()
