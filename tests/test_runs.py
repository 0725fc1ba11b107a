"""Run directories under hostile conditions: kills during pruning and before the first checkpoint,
two processes on one run directory, a full disk, tampered checkpoint files."""
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from maevit.train import runs
from maevit.train.pretrain import main, train
from test_pretrain import TINY, _cfg, _losses, _weights

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (no `except Exception` catches it)."""


def _assert_every_listed_checkpoint_is_complete(run_dir: Path) -> list[Path]:
    ckpts = runs.RunDir(run_dir).checkpoints()
    for ckpt in ckpts:
        assert set(_weights(ckpt)), ckpt
        assert torch.load(ckpt / "optimizer.bin", weights_only=True)["state"], ckpt
        assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "generators_0.safetensors").is_file(), ckpt
    return ckpts


def test_kill_during_pruning_leaves_no_listed_incomplete_checkpoint(tmp_path, monkeypatch):
    real_rmtree = shutil.rmtree

    def dies_halfway(path, *args, **kwargs):
        path = Path(path)
        if (path / "trainer_state.json").is_file():  # deleting a checkpoint: die with it half gone
            for f in path.iterdir():
                if f.name != "trainer_state.json":
                    f.unlink()
            raise _Killed()
        return real_rmtree(path, *args, **kwargs)

    run_dir = tmp_path / "run"
    common = ("run.log_every=1", "run.ckpt_every=2", "run.keep_last=1")
    monkeypatch.setattr(shutil, "rmtree", dies_halfway)
    with pytest.raises(_Killed):  # step 4 is published, then pruning step 2 is killed
        train(_cfg(run_dir, *common, "optim.max_steps=4"))
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)

    ckpts = _assert_every_listed_checkpoint_is_complete(run_dir)
    assert [c.name for c in ckpts] == ["step-00000004"]
    names = lambda: sorted(p.name for p in (run_dir / "checkpoints").iterdir())  # noqa: E731
    assert names() == [".trash-step-00000002", "latest", "step-00000004"]  # renamed away before deletion
    # the next start removes the half-deleted leftover and resumes exactly
    result = train(_cfg(run_dir, *common, "optim.max_steps=6"))
    assert result["resumed_from"].endswith("step-00000004")
    assert names() == ["latest", "step-00000006"]
    train(_cfg(tmp_path / "ref", *common, "optim.max_steps=6"))
    assert _losses(run_dir) == _losses(tmp_path / "ref")


def test_a_checkpoint_missing_a_listed_file_is_not_complete(tmp_path):
    run_dir = tmp_path / "run"
    train(_cfg(run_dir, "optim.max_steps=2", "run.ckpt_every=1", "run.keep_last=2"))
    ckpts = runs.RunDir(run_dir).checkpoints()
    assert [c.name for c in ckpts] == ["step-00000001", "step-00000002"]
    (ckpts[-1] / "optimizer.bin").unlink()  # e.g. half deleted by an older version
    assert not runs.is_complete_checkpoint(ckpts[-1])
    assert runs.RunDir(run_dir).checkpoints() == ckpts[:1]
    assert runs.RunDir(run_dir).latest_checkpoint() == ckpts[0]  # `latest` names the broken one: not used


def test_no_duplicate_metric_rows_after_kill_before_first_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    common = ("run.log_every=1", "run.ckpt_every=4")

    def killed(*args, **kwargs):
        raise _Killed()

    monkeypatch.setattr(runs, "save_checkpoint", killed)
    with pytest.raises(_Killed):
        train(_cfg(run_dir, *common, "optim.max_steps=6"))
    assert [s for s, _ in _losses(run_dir)] == [1, 2, 3, 4]  # logged, then killed at the first checkpoint
    monkeypatch.undo()

    result = train(_cfg(run_dir, *common, "optim.max_steps=6"))
    assert result["resumed_from"] is None
    assert [s for s, _ in _losses(run_dir)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_second_process_on_a_locked_run_dir_refuses_while_the_first_finishes(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    common = ("run.log_every=1", "run.ckpt_every=2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    seen = {}
    real_log = runs.MetricsLogger.log

    def log(self, step, **metrics):  # the first run (this process) at step 2 starts the second and waits for it
        real_log(self, step, **metrics)
        if step == 2 and not seen:
            seen["config"] = (run_dir / "config.yaml").read_text()
            seen["second"] = subprocess.run(  # with run.fresh=true: it must not move the first run aside either
                [sys.executable, "-m", "maevit.cli", "pretrain", *TINY, f"run.dir={run_dir}", *common,
                 "optim.max_steps=9", "run.fresh=true"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    monkeypatch.setattr(runs.MetricsLogger, "log", log)
    assert train(_cfg(run_dir, *common, "optim.max_steps=5"))["step"] == 5
    monkeypatch.undo()

    second = seen["second"]
    assert second.returncode == 2
    assert f"maevit pretrain: error: run directory {run_dir} is in use by process {os.getpid()} on host" in second.stderr
    assert "run.dir" in second.stderr and "Traceback" not in second.stderr, second.stderr[-3000:]
    # the first run finished intact: nothing moved aside, its config, rows and checkpoints untouched
    assert not list(run_dir.glob("previous-*"))
    assert (run_dir / "config.yaml").read_text() == seen["config"] and "max_steps: 5" in seen["config"]
    assert [s for s, _ in _losses(run_dir)] == [1, 2, 3, 4, 5]
    assert [c.name for c in _assert_every_listed_checkpoint_is_complete(run_dir)][-1] == "step-00000005"
    assert (run_dir / ".lock").read_text() == ""  # released and emptied at the end
    # (two ranks: tests/test_pretrain_dist.py; a killed holder blocks nothing: test_kill9_then_resume_loses_nothing)


def _can_mount_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], capture_output=True).returncode == 0
    return ok


def test_disk_full_says_so_and_the_last_checkpoint_resumes(tmp_path, monkeypatch):
    """A real 4 MB tmpfs where the platform allows mounting one, else a simulated full disk."""
    disk = tmp_path / "disk"
    real = _can_mount_tmpfs(disk)
    try:
        run_dir = disk / "run"
        common = ("run.log_every=1", "run.ckpt_every=2", "run.keep_last=1")
        train(_cfg(run_dir, *common, "optim.max_steps=2"))
        need = sum(f.stat().st_size for f in (run_dir / "checkpoints" / "step-00000002").iterdir())
        if real:  # leave room for less than half a checkpoint
            free = shutil.disk_usage(disk).free
            (disk / "filler").write_bytes(b"\0" * (free - need // 2))
        else:
            import accelerate

            def full(self, output_dir, **kwargs):  # what torch says on a full disk: no errno in sight
                (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 1000)
                raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed "
                                   "writing file data/0: file write failed")

            real_usage = shutil.disk_usage
            monkeypatch.setattr(accelerate.Accelerator, "save_state", full)
            monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=need // 3))
        with pytest.raises(runs.DiskFullError) as err:
            train(_cfg(run_dir, *common, "optim.max_steps=4"))
        msg = str(err.value)
        assert msg.startswith("the disk is full: checkpoint step-00000004 could not be written to "
                              f"{run_dir / 'checkpoints'}")
        assert "needs about" in msg and "step-00000002, is intact" in msg and "run the same command again" in msg
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-00000002"]
        assert [c.name for c in _assert_every_listed_checkpoint_is_complete(run_dir)] == ["step-00000002"]

        monkeypatch.undo()
        (disk / "filler").unlink(missing_ok=True)  # space freed: the same command resumes exactly
        result = train(_cfg(run_dir, *common, "optim.max_steps=4"))
        assert result["resumed_from"].endswith("step-00000002") and result["step"] == 4
        train(_cfg(tmp_path / "ref", *common, "optim.max_steps=4"))
        assert _losses(run_dir) == _losses(tmp_path / "ref")
    finally:
        if real:
            subprocess.run(["umount", "-l", str(disk)], check=False)


def test_disk_full_through_the_cli_is_one_paragraph(tmp_path, monkeypatch, capsys):
    import accelerate

    def full(self, output_dir, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir) / "optimizer.bin"))

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full)
    assert main([*TINY, f"run.dir={tmp_path / 'run'}", "optim.max_steps=2", "run.ckpt_every=2"]) == 1
    err = capsys.readouterr().err
    assert "maevit pretrain: error: the disk is full: checkpoint step-00000002" in err and "Traceback" not in err
    assert "there is no earlier checkpoint" in err
    assert not (tmp_path / "run" / "checkpoints" / ".tmp-step-00000002").exists()


class _Evil:
    """Unpickling this creates a file: proof that a file was (or was not) unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _tamper(path: Path, marker: Path, fix_size: bool = True) -> None:
    """Replace a checkpoint file by a pickle that runs code; like a careful attacker, also fix the
    size and digest recorded in trainer_state.json (else the resume stops at the content check already)."""
    import hashlib

    with open(path, "wb") as f:
        pickle.dump({"state": {}, "param_groups": [], "payload": _Evil(str(marker))}, f, protocol=2)
    state_file = path.parent / "trainer_state.json"
    state = json.loads(state_file.read_text())
    if fix_size and "files" in state:
        state["files"][path.name] = {"size": path.stat().st_size,
                                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        state_file.write_text(json.dumps(state))


def test_tampered_optimizer_file_is_refused_on_resume(tmp_path, capsys):
    run_dir, marker = tmp_path / "run", tmp_path / f"PWNED-{uuid.uuid4().hex}"
    args = [*TINY, f"run.dir={run_dir}", "run.ckpt_every=2"]
    assert main([*args, "optim.max_steps=2"]) == 0
    _tamper(run_dir / "checkpoints" / "step-00000002" / "optimizer.bin", marker)
    capsys.readouterr()
    assert main([*args, "optim.max_steps=4"]) == 2
    err = capsys.readouterr().err
    assert "maevit pretrain: error: cannot resume from" in err and "optimizer.bin was refused by safe loading" in err
    assert "Nothing in it was run" in err and "run.fresh=true" in err and "Traceback" not in err
    assert not marker.exists()
    # a file whose size changed since it was written is refused before anything is loaded
    _tamper(run_dir / "checkpoints" / "step-00000002" / "model.safetensors", marker, fix_size=False)
    assert main([*args, "optim.max_steps=4"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors is" in err and "Nothing was loaded, changed or deleted" in err and not marker.exists()
    assert (run_dir / "checkpoints" / "step-00000002").is_dir()  # the evidence stays where it was


def test_tampered_rng_state_is_refused_and_the_resume_says_it_is_not_exact(tmp_path, caplog):
    run_dir, marker = tmp_path / "run", tmp_path / f"PWNED-{uuid.uuid4().hex}"
    train(_cfg(run_dir, "optim.max_steps=2", "run.ckpt_every=2"))
    _tamper(run_dir / "checkpoints" / "step-00000002" / "random_states_0.pkl", marker)
    with caplog.at_level("WARNING", logger="maevit.train.runs"):
        result = train(_cfg(run_dir, "optim.max_steps=3", "run.ckpt_every=2"))
    assert result["step"] == 3 and not marker.exists()
    warning = " ".join(r.getMessage() for r in caplog.records if "random_states_0.pkl" in r.getMessage())
    assert "refused by safe loading" in warning and "not an exact resume" in warning
