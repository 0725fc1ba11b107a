"""Preemption (issue 20): SIGTERM and SIGUSR1, to the process or to its whole group, go through the same
save-and-stop path as Ctrl-C: a checkpoint, an exit code that names the signal, the command to resume,
and a resume that matches an uninterrupted run."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maevit.config import load_config
from maevit.train import runs
from maevit.train.pretrain import PretrainConfig, train
from tiny_runs import TINY_PRETRAIN as TINY

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # as the reference runs: one thread


def _run_until_step(args, run_dir, sig, *, group: bool, at_step: int = 3, launcher=None, env=None):
    """Run `maevit ARGS run.dir=RUN_DIR` (or ``launcher + ARGS ...``), send ``sig`` when step ``at_step`` is logged
    (to the whole process group with ``group``); returns (exit code, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [*(launcher or [sys.executable, "-m", "maevit.cli"]), *args, f"run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith(f"step {at_step}/"):
                os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
                break
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, "".join(seen) + err


@pytest.mark.parametrize("sig,group", [(signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGUSR1, True)])
def test_pretraining_preempted_saves_and_resumes_exactly(tmp_path, sig, group):
    run_dir = tmp_path / "run"
    args = ["pretrain", *TINY, "data.num_workers=1", "run.log_every=1", "run.ckpt_every=1000"]
    rc, err = _run_until_step([*args, "optim.max_steps=200"], run_dir, sig, group=group)
    assert rc == 128 + sig, err[-3000:]
    assert "Traceback" not in err and f"preempted ({signal.Signals(sig).name})" in err
    assert "Resume with the same command" in err
    ckpt = runs.RunDir(run_dir).latest_checkpoint()
    k = runs.checkpoint_step(ckpt)
    assert k >= 3

    n = k + 2
    cfg = lambda d: load_config(PretrainConfig, None, [*args[1:], f"run.dir={d}", f"optim.max_steps={n}"])  # noqa
    assert train(cfg(run_dir))["resumed_from"] == str(ckpt)
    train(cfg(tmp_path / "ref"))
    a = load_file(run_dir / "checkpoints" / f"step-{n:08d}" / "model.safetensors")
    b = load_file(tmp_path / "ref" / "checkpoints" / f"step-{n:08d}" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a)


def test_finetuning_sigterm_saves_a_checkpoint(tmp_path):
    run_dir = tmp_path / "ft"
    args = ["finetune", "model.name=mae_vit_tiny_patch16", "model.img_size=32", "model.patch_size=8",
            "model.args={embed_dim: 32, depth: 1, num_heads: 2}", "data.train=bundled:train", "data.batch_size=8",
            "data.num_workers=1", "optim.epochs=50", "run.log_every=1", "run.progress=false", "run.precision=fp32"]
    rc, err = _run_until_step(args, run_dir, signal.SIGTERM, group=True)
    assert rc == 143, err[-3000:]
    assert "Traceback" not in err and "preempted (SIGTERM)" in err
    assert runs.checkpoint_step(runs.RunDir(run_dir).latest_checkpoint()) >= 3
