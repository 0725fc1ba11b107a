"""Checkpoints verified by content (issue 20): same-size corruption is caught before anything loads,
resume falls back to the newest good checkpoint, and when none is good nothing is changed."""
import os
from pathlib import Path

import pytest

from maevit.train import runs
from maevit.train.pretrain import main, train
from test_pretrain import TINY, _cfg, _losses

COMMON = ("run.log_every=1", "run.ckpt_every=2", "run.keep_last=3")


pytestmark = pytest.mark.usefixtures("one_thread")  # as the reference runs: one thread


def _zero_second_half(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\0" * (size - size // 2))
    assert path.stat().st_size == size


def _random_bytes(path: Path, n: int = 4096) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(max(0, size // 2 - n // 2))
        f.write(os.urandom(min(n, size)))
    assert path.stat().st_size == size


@pytest.mark.parametrize("name,damage", [("model.safetensors", _zero_second_half), ("optimizer.bin", _random_bytes),
                                         ("generators_0.safetensors", _random_bytes)])
def test_same_size_corruption_falls_back_to_the_newest_good_checkpoint(tmp_path, name, damage, caplog):
    run_dir = tmp_path / "run"
    train(_cfg(run_dir, *COMMON, "optim.max_steps=4"))
    newest = run_dir / "checkpoints" / "step-00000004"
    damage(newest / name)
    assert runs.checkpoint_problem(newest) is not None and name in runs.checkpoint_problem(newest)
    with caplog.at_level("WARNING", logger="maevit.train.runs"):
        result = train(_cfg(run_dir, *COMMON, "optim.max_steps=6"))
    assert result["resumed_from"].endswith("step-00000002")
    assert name in caplog.text and "damaged" in caplog.text
    assert (run_dir / "checkpoints" / "damaged-step-00000004" / name).is_file()  # moved aside, not deleted
    train(_cfg(tmp_path / "ref", *COMMON, "optim.max_steps=6"))
    assert _losses(run_dir) == _losses(tmp_path / "ref")  # still exact: steps 3-4 simply ran again
    replaced = runs.read_metrics(run_dir / "metrics-replaced.jsonl")
    assert [r["step"] for r in replaced] == [3, 4]  # the rows of the steps that ran again are kept


def test_every_checkpoint_damaged_stops_with_exit_2_and_changes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [*TINY, f"run.dir={run_dir}", *COMMON]
    assert main([*args, "optim.max_steps=4"]) == 0
    for ckpt in runs.RunDir(run_dir).checkpoints():
        (ckpt / "optimizer.bin").unlink()
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    rows = (run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main([*args, "optim.max_steps=6"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint passes its content check" in err and "optimizer.bin is missing" in err
    assert "Traceback" not in err and "run.fresh=true" in err
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before and (run_dir / "metrics.jsonl").read_text() == rows
    # run.fresh=true starts over and keeps the old run
    assert main([*args, "optim.max_steps=2", "run.fresh=true"]) == 0
    previous = [p for p in run_dir.iterdir() if p.name.startswith("previous-")]
    assert len(previous) == 1 and (previous[0] / "checkpoints" / "step-00000004" / "model.safetensors").is_file()


def test_stale_temporary_files_are_removed_on_start(tmp_path):
    run_dir = tmp_path / "run"
    train(_cfg(run_dir, *COMMON, "optim.max_steps=2"))
    stale = [run_dir / "checkpoints" / "latest.tmp-99999", run_dir / "metrics.jsonl.tmp-99999"]
    for p in stale:
        p.write_text("left by a kill")
    train(_cfg(run_dir, *COMMON, "optim.max_steps=3"))
    assert not any(p.exists() for p in stale)
