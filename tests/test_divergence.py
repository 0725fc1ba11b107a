"""Divergence never overwrites good state (issue 20): while the loss blows up (finite or not) no
checkpoint is written or pruned, a run that ends inside it exports nothing and exits non-zero, and the
message names the checkpoint from before it."""
import pytest
import torch
from safetensors.torch import load_file

from maevit.train import runs, schedule
from maevit.train.pretrain import main
from maevit.train.step import SETTLE
from tiny_runs import TINY_PRETRAIN as TINY

BLOW_UP_AT = SETTLE + 6  # after the running loss has settled and two healthy checkpoints exist


pytestmark = pytest.mark.usefixtures("one_thread")  # as the reference runs: one thread


@pytest.fixture
def blow_up(monkeypatch):
    """From step BLOW_UP_AT on, an absurd learning rate: the weights explode within a few steps."""
    real = schedule.Schedule.lr
    monkeypatch.setattr(schedule.Schedule, "lr", lambda self, step: 1e4 if step >= BLOW_UP_AT else real(self, step))


def _args(run_dir, *more):
    return [*TINY, f"run.dir={run_dir}", "optim.epochs=40", "run.ckpt_every=3", "run.log_every=50",
            "run.keep_last=1", "run.max_nonfinite=1000", *more]


def test_a_diverging_run_keeps_its_last_healthy_checkpoint_and_exports_nothing(tmp_path, blow_up, capsys):
    run_dir = tmp_path / "run"
    rc = main(_args(run_dir, f"optim.max_steps={BLOW_UP_AT + 15}"))
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    last_healthy = (BLOW_UP_AT // 3) * 3  # ckpt_every=3: the last checkpoint before the blow-up (26 -> 24)
    kept = runs.RunDir(run_dir).checkpoints()
    assert [runs.checkpoint_step(c) for c in kept] == [last_healthy]  # nothing newer kept, nothing pruned
    suspect = run_dir / "checkpoints" / f"damaged-step-{last_healthy + 3:08d}"
    assert suspect.is_dir()  # the checkpoint written on the blow-up step: set aside, not deleted
    assert runs.RunDir(run_dir).latest_checkpoint() == kept[0]
    weights = load_file(kept[0] / "model.safetensors")
    assert all(torch.isfinite(w).all() and w.abs().max() < 10 for w in weights.values())
    assert not (run_dir / "encoder.safetensors").exists()
    assert f"step-{last_healthy:08d}" in err and "neither checkpointed nor exported" in err


def test_non_finite_streak_advice_names_the_checkpoint_before_it(tmp_path, blow_up, capsys):
    run_dir = tmp_path / "run"
    rc = main(_args(run_dir, "run.max_nonfinite=2", "run.log_every=1", f"optim.max_steps={BLOW_UP_AT + 30}"))
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    kept = runs.RunDir(run_dir).checkpoints()
    assert kept and all(runs.checkpoint_step(c) <= BLOW_UP_AT for c in kept)
    assert str(kept[-1]) in err and not (run_dir / "encoder.safetensors").exists()


def test_healthy_runs_are_not_held_back(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_args(run_dir, f"optim.max_steps={BLOW_UP_AT + 15}")) == 0
    assert (run_dir / "encoder.safetensors").is_file()
    assert runs.checkpoint_step(runs.RunDir(run_dir).checkpoints()[-1]) == BLOW_UP_AT + 15
