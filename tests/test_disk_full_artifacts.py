"""A full disk while writing run artefacts (issue 20): metrics rows end the run with the one-paragraph
disk-full message (exit 1, no traceback); a curve picture that cannot be drawn never stops a run."""
import builtins
import errno

import pytest

from maevit.train import curves, metrics
from maevit.train.pretrain import main
from tiny_runs import TINY_PRETRAIN as TINY


pytestmark = pytest.mark.usefixtures("one_thread")  # as the reference runs: one thread


class _FullAfter:
    """A line-buffered append file whose writes fail with ENOSPC after ``n`` of them."""

    def __init__(self, f, n):
        self.f, self.n = f, n

    def write(self, text):
        self.n -= 1
        if self.n < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(text)

    def close(self):
        self.f.close()


def test_disk_full_while_appending_metrics_is_one_paragraph(tmp_path, monkeypatch, capsys):
    def fake_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return _FullAfter(f, 2) if str(path).endswith("metrics.jsonl") and mode == "a" else f

    monkeypatch.setattr(metrics, "open", fake_open, raising=False)
    rc = main([*TINY, f"run.dir={tmp_path / 'run'}", "optim.max_steps=5", "run.log_every=1"])
    err = capsys.readouterr().err
    assert rc == 1 and "the disk is full: a metrics row of step 3" in err and "Traceback" not in err


def test_a_curve_that_cannot_be_drawn_never_stops_the_run(tmp_path, monkeypatch, capsys, caplog):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(curves, "save_curves", full)
    run_dir = tmp_path / "run"
    with caplog.at_level("WARNING"):
        rc = main([*TINY, f"run.dir={run_dir}", "optim.max_steps=3", "run.ckpt_every=2"])
    assert rc == 0 and (run_dir / "encoder.safetensors").is_file()
    assert "could not draw" in caplog.text and "training goes on" in caplog.text


def test_a_reconstruction_grid_that_cannot_be_written_never_stops_the_run(tmp_path, monkeypatch, caplog):
    import maevit.viz as viz

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(viz, "save_reconstruction_grid", full)
    run_dir = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("run.viz_every")]
    with caplog.at_level("WARNING"):
        rc = main([*args, f"run.dir={run_dir}", "optim.max_steps=2", "run.viz_every=1", "run.viz_images=2"])
    assert rc == 0 and (run_dir / "encoder.safetensors").is_file()
    assert "recon-00000001.png" in caplog.text and "training goes on" in caplog.text
