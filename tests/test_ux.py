"""What a user sees: one-line errors with the right advice and exit 2 for every everyday mistake,
schedules that warn instead of silently not training, Ctrl-C that saves and resumes exactly,
curves, --help / --print-config / --version, memory estimates, automatic loader workers."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from maevit.cli import main as cli
from maevit.config import config_keys, load_config, to_dict
from maevit.train import runs
from maevit.train.inputs import describe_data, resolve_num_workers
from maevit.train.schedule import clip_warmup, plan_schedule
from maevit.train.pretrain import PretrainConfig, train
from tiny_runs import TINY_PRETRAIN as TINY

REPO = Path(__file__).resolve().parents[1]
FT = ["model.img_size=32", "data.train=bundled:train", "data.val=null", "data.batch_size=8", "data.num_workers=0",
      "data.mixup=0", "data.cutmix=0", "optim.epochs=1", "optim.warmup_epochs=0", "run.progress=false"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 2-step pretraining run, a 2-step fine-tuning run from it, and bad inputs."""
    from maevit.train.finetune import FinetuneConfig, finetune

    root = tmp_path_factory.mktemp("ux")
    pre, ft = root / "pre", root / "ft"
    train(load_config(PretrainConfig, None, [*TINY, f"run.dir={pre}", "optim.max_steps=2", "run.log_every=1"]))
    finetune(load_config(FinetuneConfig, None, [*FT, f"model.pretrained={pre}", f"run.dir={ft}",
                                                "optim.max_steps=2", "run.log_every=1"]))
    (root / "empty").mkdir()
    (root / "notes.pt").write_text("these are my notes, not weights\n")
    (root / "tags.yaml").write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    return {"pre": pre, "ft": ft, "empty": root / "empty", "text": root / "notes.pt", "tags": root / "tags.yaml"}


# ----------------------------------------------------------------------------- everyday mistakes


def _pre(f, *extra):
    return ["pretrain", *TINY, f"run.dir={f['pre'].parent / 'new'}", *extra]


def _ft(f, *extra):
    return ["finetune", *FT, f"model.pretrained={f['pre']}", f"run.dir={f['pre'].parent / 'ft-new'}", *extra]


CASES = {
    # pretrain
    "pretrain-missing-data": (lambda f: _pre(f, "data.train=/no/such/dir"), "do not exist"),
    "pretrain-empty-folder": (lambda f: _pre(f, f"data.train={f['empty']}"), "no images"),
    "pretrain-model-name": (lambda f: _pre(f, "model.name=mae_vit_tiny_patch61"), "Did you mean 'mae_vit_tiny_patch16'"),
    "pretrain-img-size": (lambda f: _pre(f, "model.img_size=65"), "not divisible by patch size 8"),
    "pretrain-pipe": (lambda f: _pre(f, "data.train=pipe:cat shard.tar"), "data.allow_pipe=true"),
    "pretrain-python-tags": (lambda f: ["pretrain", str(f["tags"])], "not plain YAML"),
    "pretrain-one-batch": (lambda f: _pre(f, "data.batch_size=4000"), "(data.batch_size) to at most 2000"),
    "pretrain-lr-key": (lambda f: _pre(f, "optim.lr=1e-3"), "'optim.lr'. Did you mean 'base_lr'"),
    # finetune
    "finetune-missing-data": (lambda f: _ft(f, "data.train=/no/such/dir"), "do not exist"),
    "finetune-empty-folder": (lambda f: _ft(f, f"data.train={f['empty']}"), "no images"),
    "finetune-model-name": (lambda f: _ft(f, "model.pretrained=null", "model.name=mae_vit_tiny_patch61"),
                            "Did you mean 'mae_vit_tiny_patch16'"),
    "finetune-img-size": (lambda f: _ft(f, "model.img_size=65"), "not divisible by patch size 8"),
    "finetune-text-checkpoint": (lambda f: _ft(f, f"model.pretrained={f['text']}"), "neither a zip archive nor a pickle"),
    "finetune-other-size": (lambda f: _ft(f, "model.name=mae_vit_small_patch16", f"model.pretrained={f['pre']}"),
                            "different architecture"),
    "finetune-depth": (lambda f: _ft(f, "model.args={depth: 2}"), "The checkpoint has 1 blocks, the model 2"),
    "finetune-pipe": (lambda f: _ft(f, "data.train=pipe:cat shard.tar"), "data.allow_pipe=true"),
    "finetune-python-tags": (lambda f: ["finetune", str(f["tags"])], "not plain YAML"),
    "finetune-one-batch": (lambda f: _ft(f, "data.batch_size=4000"), "(data.batch_size) to at most 2000"),
    # eval
    "eval-missing-data": (lambda f: ["eval", str(f["ft"]), "--data", "/no/such/dir"], "do not exist"),
    "eval-empty-folder": (lambda f: ["eval", str(f["ft"]), "--data", str(f["empty"])], "no images"),
    "eval-missing-checkpoint": (lambda f: ["eval", "/no/such/run", "--data", "bundled:val"], "checkpoint not found"),
    "eval-text-checkpoint": (lambda f: ["eval", str(f["text"]), "--data", "bundled:val"], "neither a zip archive"),
    "eval-model-name": (lambda f: ["eval", str(f["ft"]), "--data", "bundled:val", "--model", "mae_vit_tiny_patch61"],
                        "Did you mean 'mae_vit_tiny_patch16'"),
    "eval-img-size": (lambda f: ["eval", str(f["ft"]), "--data", "bundled:val", "--img-size", "65"],
                      "not divisible by patch size 8"),
    "eval-other-size": (lambda f: ["eval", str(f["ft"]), "--data", "bundled:val", "--model", "mae_vit_small_patch16"],
                        "different architecture"),
    "eval-pipe": (lambda f: ["eval", str(f["ft"]), "--data", "pipe:cat shard.tar"], "data.allow_pipe=true"),
    "eval-pretraining-run": (lambda f: ["eval", str(f["pre"]), "--data", "bundled:val"], "fine-tune it first"),
    # visualize
    "visualize-missing-checkpoint": (lambda f: ["visualize", "/no/such/run"], "checkpoint not found"),
    "visualize-finetune-run": (lambda f: ["visualize", str(f["ft"])], "no decoder"),
    "visualize-text-checkpoint": (lambda f: ["visualize", str(f["text"])], "neither a zip archive"),
    "visualize-missing-data": (lambda f: ["visualize", str(f["pre"]), "--data", "/no/such/dir"], "do not exist"),
    "visualize-empty-folder": (lambda f: ["visualize", str(f["pre"]), "--data", str(f["empty"])], "no images"),
    "visualize-img-size": (lambda f: ["visualize", str(f["pre"]), "--img-size", "65"], "not divisible by patch size 8"),
    "visualize-model-name": (lambda f: ["visualize", str(f["pre"] / "encoder.safetensors"), "--model",
                                        "mae_vit_tiny_patch61"], "Did you mean 'mae_vit_tiny_patch16'"),
    "visualize-other-size": (lambda f: ["visualize", str(f["pre"]), "--model", "mae_vit_small_patch16"],
                             "different architecture"),
    "visualize-pipe": (lambda f: ["visualize", str(f["pre"]), "--data", "pipe:cat shard.tar"], "data.allow_pipe=true"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_everyday_mistake_is_one_line_and_exit_2(case, files, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # visualize's default --out
    args, expected = CASES[case]
    argv = args(files)
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    prefix = f"maevit {argv[0]}: error: "
    assert sum(line.startswith(prefix) for line in lines) == 1 and lines[-1].startswith(prefix), err
    assert expected in lines[-1]
    if case == "finetune-depth":  # a different architecture: loading it partially is not the fix
        assert "strict" not in lines[-1] and "allow_missing" not in lines[-1]
    if case == "visualize-missing-checkpoint":  # said first, not after asking for --model and --data
        assert "--model" not in lines[-1] and "--data" not in lines[-1]
    for new in ("new", "ft-new"):  # a usage error writes no run directory
        assert not (files["pre"].parent / new).exists()


def test_resume_with_another_img_size_is_refused_before_anything_changes(files, capsys):
    for cmd, run_dir, args in (("pretrain", files["pre"], TINY), ("finetune", files["ft"],
                                                                  [*FT, f"model.pretrained={files['pre']}"])):
        before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        assert cli([cmd, *args, f"run.dir={run_dir}", "model.img_size=48", "optim.max_steps=4"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"maevit {cmd}: error:" in err and "model.img_size: 32 -> 48" in err and "run.fresh=true" in err
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # nothing changed


def test_out_of_memory_is_a_message_not_a_traceback(tmp_path, capsys, monkeypatch):
    import maevit.train.pretrain as pretrain

    real = pretrain.create_mae

    def failing(*a, **k):
        model = real(*a, **k)

        def forward(*a, **k):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: "
                               "you tried to allocate 7516192768 bytes.")
        model.forward = forward
        return model

    monkeypatch.setattr(pretrain, "create_mae", failing)
    assert cli(["pretrain", *TINY, f"run.dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "out of memory" in err and "data.batch_size (now 8)" in err
    assert "optim.accum_steps" in err


# ----------------------------------------------------------------------------- schedules


def test_short_schedule_clips_the_warmup_and_reaches_the_peak(caplog):
    caplog.set_level(logging.WARNING, logger="maevit")
    sched = plan_schedule(epochs=2, batches_per_epoch=50, accum_steps=1, warmup_epochs=40, base_lr=1.5e-4,
                          effective_batch=256)
    assert sched.total_steps == 100 and sched.warmup_steps == 10
    assert max(sched.lr(s) for s in range(sched.last_step)) == pytest.approx(1.5e-4)
    assert "warm-up clipped to 10 steps" in caplog.text and "optim.warmup_epochs=40" in caplog.text
    caplog.clear()
    assert clip_warmup(5, 100, 1, 20) == 5 and not caplog.text  # a warm-up that fits is left alone


def test_max_steps_inside_the_warmup_warns_with_the_lr_reached(caplog):
    caplog.set_level(logging.WARNING, logger="maevit")
    sched = plan_schedule(epochs=800, batches_per_epoch=100, accum_steps=1, warmup_epochs=40, base_lr=1.5e-4,
                          effective_batch=256, max_steps=40)
    assert sched.warmup_steps == 4000 and sched.last_step == 40
    assert "inside the 4000-step warm-up" in caplog.text and "peaks at 1.5e-06, not 0.00015" in caplog.text
    caplog.clear()
    plan_schedule(epochs=10, batches_per_epoch=100, accum_steps=1, warmup_epochs=1, base_lr=1.5e-4,
                  effective_batch=256, max_steps=500)
    assert not caplog.text  # the peak is reached: nothing to say


def test_probe_warmup_longer_than_the_probe_is_clipped(caplog, tmp_path):
    from maevit.train.probe import main_probe

    caplog.set_level(logging.WARNING, logger="maevit")
    assert main_probe(["model.name=mae_vit_tiny_patch16", "model.img_size=32",
                       "model.args={patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}", "data.train=bundled:val",
                       "data.num_workers=0", "data.batch_size=64", "optim.epochs=3", "optim.warmup_epochs=10",
                       f"run.dir={tmp_path / 'probe'}"]) == 0
    assert "warm-up clipped to 2 steps" in caplog.text  # 3 epochs x 7 steps: a tenth


# ----------------------------------------------------------------------------- Ctrl-C


def test_sigint_saves_a_checkpoint_that_resumes_exactly(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it, loader worker included)
    mid-run: exit 130, no traceback, the command to resume; resuming matches an uninterrupted run."""
    run_dir = tmp_path / "run"
    args = [*TINY, "data.num_workers=1", "run.log_every=1", "run.ckpt_every=1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "maevit.cli", "pretrain", *args, f"run.dir={run_dir}",
                             "optim.max_steps=200"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen = []
    try:
        for line in proc.stderr:  # the marker: the metrics line of step 3
            seen.append(line)
            if line.startswith("step 3/"):
                os.killpg(proc.pid, signal.SIGINT)
                break
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = "".join(seen) + err
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "Resume with the same command" in err and "maevit pretrain" in err
    ckpt = runs.RunDir(run_dir).latest_checkpoint()
    k = runs.checkpoint_step(ckpt)
    assert k >= 3 and f"interrupted at step {k}" in err

    n = k + 3
    cfg = lambda d: load_config(PretrainConfig, None, [*args, f"run.dir={d}", f"optim.max_steps={n}"])  # noqa: E731
    assert train(cfg(run_dir))["resumed_from"] == str(ckpt)
    train(cfg(tmp_path / "ref"))
    got = [(r["step"], r["loss"]) for r in runs.read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    ref = [(r["step"], r["loss"]) for r in runs.read_metrics(tmp_path / "ref" / "metrics.jsonl") if "loss" in r]
    assert [s for s, _ in got] == list(range(1, n + 1)) and got == ref
    a = load_file(run_dir / "checkpoints" / f"step-{n:08d}" / "model.safetensors")
    b = load_file(tmp_path / "ref" / "checkpoints" / f"step-{n:08d}" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a)


def test_finetune_sigint_checkpoints_and_resumes(files, tmp_path, monkeypatch, capsys):
    import maevit.train.finetune as ft

    real = ft.labeled_for_rank

    class Interrupting:  # the training stream; SIGINT arrives while batch 3 is being trained on
        def __init__(self, loader):
            self.loader = loader

        def __getattr__(self, name):
            return getattr(self.loader, name)

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for i, item in enumerate(self.loader):
                if i == 2:
                    signal.raise_signal(signal.SIGINT)
                yield item

    monkeypatch.setattr(ft, "labeled_for_rank", lambda *a, train, **k: (
        Interrupting(real(*a, train=train, **k)) if train else real(*a, train=train, **k)))
    args = [*FT, f"model.pretrained={files['pre']}", "run.log_every=1", "optim.max_steps=6"]
    assert cli(["finetune", *args, f"run.dir={tmp_path / 'run'}"]) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 3" in err and "Resume with the same command" in err
    assert runs.RunDir(tmp_path / "run").latest_checkpoint().name == "step-00000003"
    assert not (tmp_path / "run" / "classifier.safetensors").exists()  # an interrupted run exports nothing

    monkeypatch.setattr(ft, "labeled_for_rank", real)
    assert cli(["finetune", *args, f"run.dir={tmp_path / 'run'}"]) == 0
    assert cli(["finetune", *args, f"run.dir={tmp_path / 'ref'}"]) == 0
    losses = lambda d: [r["loss"] for r in runs.read_metrics(d / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert len(losses(tmp_path / "run")) == 6 and losses(tmp_path / "run") == losses(tmp_path / "ref")


# ----------------------------------------------------------------------------- what there is to watch


def test_probe_sigint_stops_with_130_and_writes_no_head(tmp_path, monkeypatch, capsys):
    """The probe has no checkpoints: Ctrl-C stops it after the step (exit 130, "interrupted"), nothing exported."""
    import maevit.train.probe as pr

    real = pr.FeatureBatches.__iter__

    def interrupting(self):
        for i, item in enumerate(real(self)):
            if i == 1:
                signal.raise_signal(signal.SIGINT)
            yield item

    monkeypatch.setattr(pr.FeatureBatches, "__iter__", interrupting)
    assert cli(["probe", "model.name=mae_vit_tiny_patch16", "model.img_size=32",
                "model.args={patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}", "data.train=bundled:val",
                "data.num_workers=0", "data.batch_size=32", "optim.epochs=5", f"run.dir={tmp_path / 'probe'}"]) == 130
    assert "maevit probe: interrupted" in capsys.readouterr().err
    assert not (tmp_path / "probe" / "probe_head.safetensors").exists()
    steps = [r["step"] for r in runs.read_metrics(tmp_path / "probe" / "metrics.jsonl")]
    assert steps == []  # stopped at step 2, before the first row (one per epoch)


def test_curves_written_for_pretraining_and_finetuning(files):
    from PIL import Image

    for run in (files["pre"], files["ft"]):  # loss and lr (kNN / validation panels when there are values)
        with Image.open(run / "curves.png") as im:
            assert im.size == (2 * 440, 250)


def test_curves_panels_follow_the_metrics(tmp_path):
    from PIL import Image

    from maevit.train.curves import FINETUNE_PANELS, PRETRAIN_PANELS, save_curves

    from maevit.train.curves import _COLORS, _T

    def line(im, panel, color):
        """Mean height (pixel row) of a series' pixels in the left and the right third of a panel's plot."""
        px = im.load()
        pts = [(x, y) for x in range(panel * 440, (panel + 1) * 440) for y in range(_T, 250) if px[x, y] == color]
        assert pts, f"no line of colour {color} in panel {panel}"
        xs = sorted(x for x, _ in pts)
        lo, hi = xs[len(xs) // 3], xs[2 * len(xs) // 3]
        left, right = [y for x, y in pts if x <= lo], [y for x, y in pts if x >= hi]
        return sum(left) / len(left), sum(right) / len(right)

    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-3 * s} for s in range(1, 20)]
    with Image.open(save_curves(rows, tmp_path / "a.png", PRETRAIN_PANELS)) as im:
        assert im.size == (2 * 440, 250)  # no kNN rows: no kNN panel
        im = im.convert("RGB")
        left, right = line(im, 0, _COLORS[0])
        assert left < right  # the loss falls: its line ends lower (larger row) than it starts
        left, right = line(im, 1, _COLORS[0])
        assert left > right  # the lr rises
    rows += [{"step": 0, "knn_top1": 10.0, "knn_top5": 50.0}, {"step": 19, "knn_top1": 40.0, "knn_top5": 80.0}]
    with Image.open(save_curves(rows, tmp_path / "b.png", PRETRAIN_PANELS)) as im:
        assert im.size == (3 * 440, 250)
        im = im.convert("RGB")
        top1, top5 = line(im, 2, _COLORS[0]), line(im, 2, _COLORS[1])  # two series, two colours
        assert top5[0] < top1[0] and top5[1] < top1[1]  # top-5 above top-1 all along
        assert top1[0] > top1[1]  # rising
    assert save_curves([{"step": 1}], tmp_path / "c.png", FINETUNE_PANELS) is None


def test_confusion_png_labels_both_axes_with_class_names(tmp_path):
    from PIL import Image

    from maevit.train.evaluate import save_confusion_png

    conf = torch.eye(3, dtype=torch.long) * 5
    with Image.open(save_confusion_png(conf, tmp_path / "s.png", ["a", "b", "c"])) as short, \
            Image.open(save_confusion_png(conf, tmp_path / "l.png", ["airplane", "automobile", "bird"])) as long:
        assert long.size[0] > short.size[0]  # the names take the room, on both axes
        # the column names are drawn above the columns: dark pixels in the top band of the long one
        top = long.convert("L").crop((long.size[0] - 3 * 40 - 4, 20, long.size[0], 60))
        assert min(top.getdata()) < 128


def test_label_fraction_and_dropped_samples_are_reported():
    class Loader:
        num_samples = 200

        def __len__(self):
            return 3

    line = describe_data(Loader(), 64, 1, label_fraction=0.1, label_seed=0)
    assert "200 labeled samples" in line and "data.label_fraction=0.1" in line
    assert "3 batches of 64" in line and "the 8 that do not fill a batch are left out" in line


# ----------------------------------------------------------------------------- command-line conventions


def test_bare_maevit_exits_non_zero_and_version(capsys):
    assert cli([]) == 2 and "usage: maevit COMMAND" in capsys.readouterr().err
    assert cli(["--version"]) == 0 and capsys.readouterr().out.startswith("maevit ")


@pytest.mark.parametrize("cmd", ["pretrain", "finetune", "probe"])
def test_help_lists_every_config_key_with_default_and_comment(cmd, capsys):
    from maevit.train.finetune import FinetuneConfig
    from maevit.train.probe import ProbeConfig

    cls = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "probe": ProbeConfig}[cmd]
    with pytest.raises(SystemExit) as exit_:
        cli([cmd, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    for key, _, _, comment in config_keys(cls):
        assert key in lines, key
        assert comment in lines[key]
    if cmd == "pretrain":
        assert "0.00015" in lines["optim.base_lr"] and "lr = base_lr x effective batch / 256" in lines["optim.base_lr"]


def test_print_config_prints_the_resolved_config(capsys):
    recipe = REPO / "pretrain" / "demo.yaml"
    assert cli(["pretrain", str(recipe), "optim.epochs=2", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(load_config(PretrainConfig, recipe, ["optim.epochs=2"]))
    assert printed["optim"]["epochs"] == 2


def test_memory_estimate_and_fit_warning():
    from maevit.models import create_mae
    from maevit.train.memory import estimate_step_memory, fit_warning

    model = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=2)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # not the fixed sin-cos tables
    state = torch.get_rng_state()
    e8, e16 = estimate_step_memory(model, (8, 3, 32, 32)), estimate_step_memory(model, (16, 3, 32, 32))
    assert torch.equal(state, torch.get_rng_state())  # a dry run on meta tensors: no randomness used
    assert e8.weights == 4 * params and e8.grads == 4 * trainable and e8.optimizer == 8 * trainable
    assert e16.activations > 1.5 * e8.activations
    assert estimate_step_memory(model, (8, 3, 32, 32), precision="bf16").activations < e8.activations
    assert "activations" in e8.describe() and "(batch 8)" in e8.describe()
    assert fit_warning(e8, torch.device("cpu"), free=10 * e8.total) is None
    warning = fit_warning(e8, torch.device("cpu"), free=e8.total // 2)
    assert "data.batch_size (e.g. 4)" in warning and "optim.accum_steps" in warning


def test_num_workers_auto_fits_the_machine(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="maevit")
    assert resolve_num_workers(3) == 3 and not caplog.text
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cpus, expected in ((1, 0), (2, 1), (16, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)), raising=False)
        assert resolve_num_workers(None) == expected
    assert "4 loader worker(s) per process (auto, 16 CPU(s) here)" in caplog.text
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 processes share the 16 CPUs
    assert resolve_num_workers(None) == 1
