"""End-to-end pretraining on CPU with the bundled data: tiny model, few steps."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from maevit.config import ConfigError, fill_unset, load_config
from maevit.models import family_defaults
from maevit.train import runs
from maevit.train.pretrain import NonFiniteLossError, PretrainConfig, main, train
from tiny_runs import TINY_PRETRAIN as TINY

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _cfg(run_dir: Path, *overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, [*TINY, f"run.dir={run_dir}", *overrides])


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in runs.read_metrics(run_dir / "metrics.jsonl")]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def test_end_to_end_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir, "optim.max_steps=6", "run.log_every=2", "run.ckpt_every=3", "run.keep_last=1",
               "run.viz_every=3", "run.viz_images=4")
    result = train(cfg)

    assert result["step"] == 6 and result["resumed_from"] is None and result["num_processes"] == 1
    rows = runs.read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert all(r["nonfinite_steps"] == 0 and r["lr"] > 0 for r in rows)
    # the resolved config round-trips, with the model's own settings where the config left them unset
    saved = load_config(PretrainConfig, run_dir / "config.yaml")
    assert saved == fill_unset(cfg, family_defaults(cfg.model.name, "pretrain"))
    assert cfg.model.mask_ratio is None and saved.model.mask_ratio == 0.75 and saved.model.norm_pix_loss is True
    # keep_last=1: only the newest checkpoint, and `latest` names it
    ckpts = runs.RunDir(run_dir).checkpoints()
    assert [c.name for c in ckpts] == ["step-00000006"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["epoch"] == 0 and state["batch"] == 6
    # the exported encoder loads strictly into a timm ViT of the same shape
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            embed_dim=32, depth=1, num_heads=2)
    vit.load_state_dict(load_file(str(run_dir / "encoder.safetensors")), strict=True)
    trained = _weights(ckpts[0])
    assert torch.equal(vit.blocks[0].attn.qkv.weight, trained["encoder.blocks.0.attn.qkv.weight"])
    # reconstruction grids at steps 3 and 6: 4 rows x 4 columns of 32 px tiles shown at 128 px
    # (4 px gaps), with column titles above and the norm-pix note below
    from PIL import Image

    grids = sorted(p.name for p in (run_dir / "images").iterdir())
    assert grids == ["recon-00000003.png", "recon-00000006.png"]
    with Image.open(run_dir / "images" / grids[-1]) as im:
        assert im.size[0] == 4 * 132 + 4 and im.size[1] > 4 * 132 + 4
    # `maevit visualize RUN_DIR` rebuilds the model from config.yaml and the latest checkpoint
    from maevit.visualize import main as visualize

    out = tmp_path / "grid.png"
    assert visualize([str(run_dir), "--data", "bundled:val", "--out", str(out), "--num-images", "2"]) == 0
    with Image.open(out) as im:
        assert im.size[0] == 4 * 132 + 4 and im.size[1] > 2 * 132 + 4


def test_exact_resume_matches_uninterrupted_run(tmp_path):
    common = ("run.log_every=1", "run.ckpt_every=3", "optim.accum_steps=2")
    train(_cfg(tmp_path / "full", *common, "optim.max_steps=7"))
    first = train(_cfg(tmp_path / "part", *common, "optim.max_steps=3"))
    assert first["step"] == 3
    resumed = train(_cfg(tmp_path / "part", *common, "optim.max_steps=7"))

    assert resumed["resumed_from"].endswith("step-00000003")
    full, part = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert [s for s, _ in part] == list(range(1, 8))  # no duplicated or missing rows
    assert part == full  # bitwise-identical losses
    a = _weights(tmp_path / "full" / "checkpoints" / "step-00000007")
    b = _weights(tmp_path / "part" / "checkpoints" / "step-00000007")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fresh_moves_old_run_aside(tmp_path):
    run_dir = tmp_path / "run"
    train(_cfg(run_dir, "optim.max_steps=2", "run.ckpt_every=2"))
    again = train(_cfg(run_dir, "optim.max_steps=2", "run.ckpt_every=2"))
    assert again["resumed_from"] is not None  # same command: resumes (nothing left to do)
    result = train(_cfg(run_dir, "optim.max_steps=2", "run.ckpt_every=2", "run.fresh=true"))
    assert result["resumed_from"] is None
    previous = [p for p in run_dir.iterdir() if p.name.startswith("previous-")]
    assert len(previous) == 1
    assert (previous[0] / "checkpoints" / "step-00000002" / "model.safetensors").is_file()
    assert (previous[0] / "encoder.safetensors").is_file()
    # TensorBoard logs stay with their run: two sessions in the old one, one in the new one
    # (top level only: Accelerate writes the config as hparams into a subfolder of its own)
    assert len(list((previous[0] / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1


class _NaNAfter:
    """Wraps the real loader; batches number >= `start` (counted per iteration) become NaN."""

    def __init__(self, loader, start, stop=None):
        self.loader, self.start, self.stop = loader, start, stop

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, imgs in enumerate(self.loader):
            if self.start <= i and (self.stop is None or i < self.stop):
                imgs = torch.full_like(imgs, float("nan"))
            yield imgs


def _patch_loader(monkeypatch, start, stop=None):
    import maevit.data.stream as stream

    real = stream.pretrain_loader
    monkeypatch.setattr(stream, "pretrain_loader", lambda *a, **k: _NaNAfter(real(*a, **k), start, stop))


def test_nonfinite_step_is_skipped_and_counted(tmp_path, monkeypatch):
    _patch_loader(monkeypatch, start=2, stop=3)  # exactly one bad batch
    result = train(_cfg(tmp_path / "run", "optim.max_steps=5", "run.log_every=5"))
    assert result["step"] == 5 and result["nonfinite_steps"] == 1
    assert math.isfinite(result["loss"])  # mean over the finite steps only
    weights = _weights(tmp_path / "run" / "checkpoints" / "step-00000005")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nonfinite_steps_in_a_row_stop_with_advice(tmp_path, monkeypatch):
    _patch_loader(monkeypatch, start=2)  # every batch from the third on
    cfg = _cfg(tmp_path / "run", "optim.max_steps=50", "run.log_every=1", "run.max_nonfinite=3", "run.ckpt_every=2")
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    msg = str(err.value)
    assert "3 optimizer steps in a row" in msg and "optim.base_lr" in msg and "fp32" in msg and "clip_grad" in msg
    # no checkpoint is written while the streak is open; the one written just before it (step 2) may hold
    # weights that fail, so it is set aside (not deleted: here the data was at fault) and the message says so
    assert runs.RunDir(tmp_path / "run").latest_checkpoint() is None
    aside = tmp_path / "run" / "checkpoints" / "damaged-step-00000002"
    assert str(aside) in msg and all(torch.isfinite(w).all() for w in _weights(aside).values())


def test_unknown_key_and_missing_data_are_named(tmp_path, capsys):
    assert main(["model.nmae=x", f"run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "nmae" in err and "name" in err
    assert main([str(REPO / "pretrain" / "demo.yaml"), "optim.lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "'optim.lr'" in err and "Did you mean 'base_lr'" in err  # not min_lr
    with pytest.raises(ConfigError, match="data.train"):
        train(load_config(PretrainConfig, None, [f"run.dir={tmp_path}"]))


@pytest.mark.parametrize("recipe", sorted((REPO / "pretrain").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_load(recipe):
    import yaml

    from maevit.config import to_dict
    from maevit.models import create_mae

    cfg = load_config(PretrainConfig, recipe)
    loaded, stated = to_dict(cfg), yaml.safe_load(recipe.read_text()) or {}
    for section, values in stated.items():  # every key the recipe states is read as stated
        for key, value in values.items():
            assert loaded[section][key] == value, f"{recipe.name}: {section}.{key}"
    with torch.device("meta"):  # every override is a valid model argument (no memory for ViT-H)
        mae = create_mae(cfg.model.name, **cfg.model.overrides())
    assert tuple(mae.encoder.img_size) == (cfg.model.img_size, cfg.model.img_size)
    if cfg.model.patch_size is not None:
        assert mae.patch_size == cfg.model.patch_size
    assert mae.encoder.model_name == cfg.model.name


@pytest.mark.slow
def test_kill9_then_resume_loses_nothing(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, f"run.dir={run_dir}", "run.log_every=1", "run.ckpt_every=2", "optim.max_steps=400"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "maevit.cli", "pretrain", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not (run_dir / "checkpoints" / "latest").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint within 60 s"
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 1.5))  # a random moment: maybe mid-save
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()

    run = runs.RunDir(run_dir)
    ckpts = run.checkpoints()
    assert ckpts, "no complete checkpoint survived"
    for ckpt in ckpts:  # every published checkpoint is complete and readable
        assert set(_weights(ckpt)) and json.loads((ckpt / "trainer_state.json").read_text())["step"] == runs.checkpoint_step(ckpt)
        assert torch.load(ckpt / "optimizer.bin", weights_only=True)["state"]
    last = run.latest_checkpoint()
    assert last == ckpts[-1]
    k = runs.checkpoint_step(last)
    logged = [s for s, _ in _losses(run_dir)]
    assert logged[:k] == list(range(1, k + 1))  # everything up to the checkpoint was logged

    n = k + 3
    result = train(_cfg(run_dir, "run.log_every=1", "run.ckpt_every=2", f"optim.max_steps={n}"))
    assert result["resumed_from"] == str(last)
    train(_cfg(tmp_path / "ref", "run.log_every=1", "run.ckpt_every=2", f"optim.max_steps={n}"))
    got, ref = _losses(run_dir), _losses(tmp_path / "ref")
    assert [s for s, _ in got] == list(range(1, n + 1))
    assert [l for _, l in got] == pytest.approx([l for _, l in ref], rel=1e-5)


def test_online_knn_probe_logs_accuracy_of_every_val_sample(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="maevit")
    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir, "optim.max_steps=4", "run.log_every=2", "run.ckpt_every=4", "run.viz_every=0",
               "run.probe_every=2", "run.probe_train=bundled:val", "run.probe_val=bundled:val")
    train(cfg)
    probes = [r for r in runs.read_metrics(run_dir / "metrics.jsonl") if "knn_top1" in r]
    assert [r["step"] for r in probes] == [0, 2, 4]  # step 0: the random encoder's baseline
    for step in (0, 2, 4):  # and printed when it runs
        assert f"kNN probe at step {step}: top-1" in caplog.text
    assert "step 2/4  epoch" in caplog.text  # run.progress=false: the metrics as log lines
    for r in probes:
        assert r["knn_samples"] == 500  # bundled val: 10 classes x 50, each counted once
        # memory bank == queries: each query finds itself, so top-1 is far above chance (10%)
        assert 50.0 < r["knn_top1"] <= r["knn_top5"] <= 100.0


def test_probe_without_sources_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="run.probe_train"):
        _cfg(tmp_path / "run", "run.probe_every=10")


def test_tensorboard_gets_the_logged_metrics(tmp_path):
    # tensorboard is in the test extras: when it is installed, Accelerate's tracker gets every metrics row
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    train(_cfg(run_dir, "optim.max_steps=4", "run.log_every=2", "run.ckpt_every=4",
               "run.probe_every=4", "run.probe_train=bundled:val", "run.probe_val=bundled:val"))
    events = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, f"no event file under {run_dir / 'tensorboard'}"
    acc = EventAccumulator(str(events[0].parent)).Reload()
    rows = runs.read_metrics(run_dir / "metrics.jsonl")
    for tag, key in (("train/loss", "loss"), ("train/mfu", "mfu"), ("probe/knn_top1", "knn_top1")):
        logged = [r for r in rows if key in r]
        scalars = acc.Scalars(tag)
        assert [e.step for e in scalars] == [r["step"] for r in logged] and len(logged) >= 1
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in logged], rel=1e-6)
