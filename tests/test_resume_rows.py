"""No duplicated metric rows after any resume point (issue 20): a fine-tune resumed from the checkpoint
at an epoch's last step evaluates that epoch again, and its validation row is written once."""
import pytest

from maevit.config import load_config
from maevit.train import runs
from maevit.train.finetune import FinetuneConfig, finetune

ARGS = ["model.name=mae_vit_tiny_patch16", "model.img_size=32", "model.patch_size=8",
        "model.args={embed_dim: 32, depth: 1, num_heads: 2}", "data.train=bundled:train", "data.val=bundled:val",
        "data.batch_size=32", "data.num_workers=0", "run.progress=false", "run.precision=fp32", "run.log_every=1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # as the reference runs: one thread


def test_resume_at_an_epochs_last_step_writes_its_validation_row_once(tmp_path):
    run_dir = tmp_path / "ft"
    first = finetune(load_config(FinetuneConfig, None, [*ARGS, f"run.dir={run_dir}", "optim.epochs=1"]))
    steps = first["step"]  # one epoch: the checkpoint is at the epoch's last step, the evaluation after it
    second = finetune(load_config(FinetuneConfig, None, [*ARGS, f"run.dir={run_dir}", "optim.epochs=2"]))
    assert second["resumed_from"].endswith(f"step-{steps:08d}")
    rows = runs.read_metrics(run_dir / "metrics.jsonl")
    val_steps = [r["step"] for r in rows if "val_top1" in r]
    assert val_steps == sorted(set(val_steps)) and len(val_steps) == 2, val_steps
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == list(range(1, second["step"] + 1))
