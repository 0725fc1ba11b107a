"""The shipped launcher configs as users run them (`accelerate launch --config_file launch/...`, 2 and 4
CPU processes over gloo), preemption of every rank and an exact resume, and elastic resumes
(2 -> 1 and 1 -> 2 processes) that keep the effective batch and lr and repeat no sample in the epoch."""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maevit.train import runs
from test_elastic import keyed_shards

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "launch_worker.py"
N_IMAGES = 96  # batch 4: 12 steps per epoch on 2 processes, 24 on 1 (or 12 with accumulation 2)
TINY = [
    "model.name=mae_vit_tiny_patch16", "model.img_size=32", "model.patch_size=8", "model.embed_dim=32",
    "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=32", "model.decoder_depth=1",
    "model.decoder_num_heads=2", "data.batch_size=4", "data.num_workers=1", "data.shuffle_buffer=16",
    "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", "optim.epochs=2", "optim.warmup_epochs=0.5",
    "optim.base_lr=1.0e-2", "run.log_every=1", "run.ckpt_every=1000", "run.viz_every=0", "run.progress=false",
    "run.precision=fp32",
]



@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return keyed_shards(tmp_path_factory.mktemp("launch"), N_IMAGES)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(n: int) -> tuple[list[str], dict[str, str]]:
    """`accelerate launch` with the shipped one-node DDP config on ``n`` CPU processes (gloo)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/ddp-1node.yaml"),
           "--num_processes", str(n), "--main_process_port", str(_port()), "--mixed_precision", "no"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return cmd, env


def _pretrain(n: int, out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd, env = _launch(n)
    proc = subprocess.run([*cmd, str(WORKER), str(out), *TINY, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _in_process(out: Path, *args: str) -> dict:
    """A one-process run in this process (the same recording of sample ids as the worker)."""
    import runpy

    argv = sys.argv
    sys.argv = [str(WORKER), str(out), *TINY, *args]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(WORKER), run_name="__main__")
        assert done.value.code == 0
    finally:
        sys.argv = argv


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_the_shipped_ddp_config_runs_on_cpu_processes(shards, tmp_path, n):
    run = tmp_path / "run"
    proc = _pretrain(n, tmp_path / "ids", f"data.train={shards}", f"run.dir={run}", "optim.max_steps=3")
    assert f"pretraining on {n} process(es)" in proc.stderr
    ckpt = runs.RunDir(run).latest_checkpoint()
    assert runs.checkpoint_step(ckpt) == 3 and (ckpt / f"random_states_{n - 1}.pkl").is_file()
    ids = [json.loads((tmp_path / "ids" / f"ids-{n}-{r}.json").read_text()) for r in range(n)]
    assert all(len(x) == 3 * 4 for x in ids)
    assert len({i for x in ids for i in x}) == 3 * 4 * n  # the ranks read disjoint samples


@pytest.mark.slow
def test_every_rank_preempted_at_a_random_step_resumes_exactly(shards, tmp_path):
    from test_preemption import _run_until_step

    cmd, env = _launch(2)
    args = [*TINY, f"data.train={shards}"]
    at = random.Random().randint(2, 6)
    rc, err = _run_until_step([str(tmp_path / "ids"), *args, "optim.max_steps=200"], tmp_path / "run",
                              signal.SIGTERM, group=True, at_step=at, launcher=[*cmd, str(WORKER)], env=env)
    assert rc != 0 and "preempted (SIGTERM)" in err and "Traceback" not in err, err[-3000:]
    ckpt = runs.RunDir(tmp_path / "run").latest_checkpoint()
    k = runs.checkpoint_step(ckpt)
    assert k >= at and (ckpt / "random_states_1.pkl").is_file()
    n = k + 2
    _pretrain(2, tmp_path / "ids", *args, f"run.dir={tmp_path / 'run'}", f"optim.max_steps={n}")
    _pretrain(2, tmp_path / "ids-ref", *args, f"run.dir={tmp_path / 'ref'}", f"optim.max_steps={n}")
    a = load_file(tmp_path / "run" / "checkpoints" / f"step-{n:08d}" / "model.safetensors")
    b = load_file(tmp_path / "ref" / "checkpoints" / f"step-{n:08d}" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a)


def _rows(run: Path) -> list[dict]:
    return [r for r in runs.read_metrics(run / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("world, new_world", [(2, 1), (1, 2)])
def test_resumed_on_another_number_of_processes_it_stays_the_same_run(shards, tmp_path, caplog, world, new_world):
    """Stopped at step 3 of 12 (epoch 0), resumed on ``new_world`` processes until step 14 (inside epoch 1)."""
    args = [f"data.train={shards}", f"run.dir={tmp_path / 'run'}"]
    accum = 2 // world  # effective batch 8 in every run
    first = [*args, f"optim.accum_steps={accum}", "optim.max_steps=3"]
    rest = [*args, f"optim.accum_steps={accum}", "optim.max_steps=14"]  # the same command, on other processes
    (_pretrain(world, tmp_path / "a", *first) if world > 1 else _in_process(tmp_path / "a", *first))
    if new_world > 1:
        err = _pretrain(new_world, tmp_path / "b", *rest).stderr
    else:
        caplog.set_level(logging.INFO, logger="maevit.engine")
        _in_process(tmp_path / "b", *rest)
        err = caplog.text
    new_accum = 2 // new_world
    assert (f"resuming on {new_world} process(es) a checkpoint of {world}: optim.accum_steps {accum} -> {new_accum} "
            f"keeps the effective batch (8 samples)") in err

    # the whole of epoch 0 exactly once: 24 samples before the stop, 72 after it (9 steps x 8)
    seen = [i for r in range(world) for i in json.loads((tmp_path / "a" / f"ids-{world}-{r}.json").read_text())]
    after = [json.loads((tmp_path / "b" / f"ids-{new_world}-{r}.json").read_text()) for r in range(new_world)]
    per_rank = 9 * 8 // new_world
    rest_of_epoch = [i for x in after for i in x[:per_rank]]
    assert len(seen) == 24 and sorted(seen + rest_of_epoch) == list(range(N_IMAGES))
    assert all(len(x) == (14 - 3) * 8 // new_world for x in after)  # 2 steps of epoch 1 follow

    # the same schedule as an uninterrupted run with that effective batch: the lr of every step, 12 steps/epoch
    _in_process(tmp_path / "ref", f"data.train={shards}", f"run.dir={tmp_path / 'ref'}", "optim.accum_steps=2",
                "optim.max_steps=14")
    rows, ref = _rows(tmp_path / "run"), _rows(tmp_path / "ref")
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(1, 15))
    assert [r["lr"] for r in rows] == pytest.approx([r["lr"] for r in ref], rel=1e-9)
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in ref]
    # and the loss goes on from where it stopped, not from a fresh start
    resumed, fresh = [r["loss"] for r in rows[3:]], [r["loss"] for r in ref]
    assert max(resumed) < fresh[0] and abs(sum(resumed) / len(resumed) - sum(fresh[3:]) / 11) < 0.25 * fresh[3]


def test_the_shipped_launcher_files_are_valid_and_name_real_wrap_classes():
    import re

    from accelerate.commands.config.config_args import load_config_from_file

    from maevit.models import create_mae
    from maevit.models.registry import _REGISTRY

    configs = {p.stem: load_config_from_file(str(p)) for p in (REPO / "launch").glob("*.yaml")}  # unknown keys raise
    assert sorted(configs) == ["ddp-1node", "ddp-multinode", "fsdp"]
    assert configs["ddp-multinode"].num_machines == 2 and configs["fsdp"].fsdp_config["fsdp_version"] == 2
    text = (REPO / "launch" / "fsdp.yaml").read_text()
    wraps = dict(re.findall(r"#\s+(\w+)\s+--fsdp_transformer_layer_cls_to_wrap (\S+)", text))
    wraps.update({f: configs["fsdp"].fsdp_config["fsdp_transformer_layer_cls_to_wrap"] for f in ("vit", "deit", "hybrid")})
    families = {e.family: n for n, e in sorted(_REGISTRY.items())}
    assert set(families) == set(wraps)  # every family has its wrap classes in the file
    for family, name in families.items():  # Accelerate looks each class up by its exact name in the model
        classes = {type(m).__name__ for m in create_mae(name, **_REGISTRY[name].smoke).modules()}
        assert set(wraps[family].split(",")) <= classes, (family, wraps[family])
    assert subprocess.run(["bash", "-n", str(REPO / "launch" / "slurm.sbatch")]).returncode == 0
    sbatch = (REPO / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@120" in sbatch and "#SBATCH --requeue" in sbatch and "accelerate launch" in sbatch
