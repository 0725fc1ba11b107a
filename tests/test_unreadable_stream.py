"""A stream in which every sample is unreadable stops after one pass with the skip reasons
(issues 20 and 21), in training and in evaluation, instead of spinning through empty epochs."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from maevit.data.shards import write_shards
from maevit.data.stream import DataSourceError, labeled_loader
from maevit.train.pretrain import main
from tiny_runs import TINY_PRETRAIN


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("ant", "bee"):
        (tmp_path / "tree" / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "tree" / c / f"{i}.png")
    out = tmp_path / "shards"
    write_shards(str(tmp_path / "tree"), out, samples_per_shard=4, progress=False)
    return out


def _garble(folder):
    for tar in folder.glob("*.tar"):
        size = tar.stat().st_size
        tar.write_bytes(os.urandom(size))


def test_every_shard_unreadable_mid_run_stops_pretraining(shards, tmp_path, capsys):
    args = [*[a for a in TINY_PRETRAIN if not a.startswith("data.train=")], f"data.train={shards}",
            "data.batch_size=4", f"run.dir={tmp_path / 'run'}", "run.log_every=1", "optim.epochs=20"]
    torch.set_num_threads(1)
    assert main([*args, "optim.max_steps=4"]) == 0  # one epoch of 16 images
    _garble(shards)
    capsys.readouterr()
    assert main([*args, "optim.max_steps=40"]) == 2
    err = capsys.readouterr().err
    assert "found no readable sample" in err and "unreadable shard" in err and "Traceback" not in err


def test_every_sample_unreadable_stops_evaluation(shards):
    _garble(shards)
    loader = labeled_loader(str(shards), img_size=32, batch_size=4, train=False, num_workers=0)
    with pytest.raises(DataSourceError, match="found no readable sample"):
        list(loader)
