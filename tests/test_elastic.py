"""Resuming on a different number of processes: the rest of the epoch streams without repeats, the
effective batch, lr and schedule are kept, or the command says why it cannot."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maevit.data.elastic import ElasticResume
from maevit.data.shards import write_shards
from maevit.data.stream import pretrain_loader

RAW = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))  # loaders output 0..255 values


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def keyed_shards(root: Path, n: int) -> Path:
    """``n`` flat-colour images whose colour is their sample id (red = id % 256, green = id // 256): any crop,
    resize or flip keeps it, so a batch says which samples it holds."""
    images = root / "images"
    images.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (12, 12), (i % 256, i // 256, 7)).save(images / f"{i:04d}.png")
    write_shards(str(images), root / "shards", samples_per_shard=10, progress=False, shuffle_seed=None)
    return root / "shards"


def sample_ids(images: torch.Tensor) -> list[int]:
    """The ids of a batch of keyed images ``[B, 3, H, W]`` (0..255 values)."""
    rgb = images.mean(dim=(2, 3)).round().long()  # [B, 3]
    return (rgb[:, 0] + 256 * rgb[:, 1]).tolist()


def _ids(world: int, rank: int, shards: Path, *, skip: int = 0, take: int | None = None,
         elastic: ElasticResume | None = None) -> list[int]:
    loader = pretrain_loader(str(shards), img_size=8, batch_size=4, num_workers=2, shuffle_buffer=16, rank=rank,
                             world_size=world, **RAW)
    if elastic is not None:
        loader.set_elastic(elastic)
    loader.skip_batches(skip)
    out = []
    for k, x in enumerate(loader):
        if take is not None and k == take:
            break
        out += sample_ids(x)
    return out


@pytest.mark.parametrize("world, new_world", [(2, 1), (1, 2)])
def test_the_rest_of_an_epoch_on_another_number_of_processes_repeats_no_sample(tmp_path, world, new_world):
    shards = keyed_shards(tmp_path, 96)  # batch 4: 24 batches on 1 rank, 12 per rank on 2
    batch = 6 // world  # 24 samples seen before the stop
    seen = [i for r in range(world) for i in _ids(world, r, shards, take=batch)]
    assert len(seen) == len(set(seen)) == 24
    offset = batch * world // new_world
    resume = ElasticResume(epoch=0, world=world, batch=batch, offset=offset)
    rest = [i for r in range(new_world) for i in _ids(new_world, r, shards, skip=offset, elastic=resume)]
    assert len(rest) == len(set(rest)) == 72 and not set(rest) & set(seen)  # the whole epoch, once
    assert sorted(seen + rest) == list(range(96))
    # a second stop inside the rest of the epoch, resumed on the same processes: the same samples follow
    again = [i for r in range(new_world) for i in _ids(new_world, r, shards, skip=offset + 2, elastic=resume)]
    assert sorted(again) == sorted(set(rest) - {i for r in range(new_world)
                                                for i in _ids(new_world, r, shards, skip=offset, take=2,
                                                              elastic=resume)})
    # the next epoch is whole again
    nxt = pretrain_loader(str(shards), img_size=8, batch_size=4, num_workers=0, world_size=1, **RAW)
    nxt.set_elastic(resume)
    nxt.set_epoch(1)
    assert sorted(i for x in nxt for i in sample_ids(x)) == list(range(96))


def test_a_resume_that_cannot_keep_the_effective_batch_stops_with_exit_2(tmp_path, monkeypatch, capsys):
    from maevit.train.pretrain import main
    from tiny_runs import TINY_PRETRAIN

    args = [*TINY_PRETRAIN, f"run.dir={tmp_path / 'run'}", "optim.max_steps=2", "optim.accum_steps=3"]
    assert main(args) == 0  # 1 process x 3 micro-batches per step
    monkeypatch.setenv("WORLD_SIZE", "2")  # what the launcher sets: the same run on 2 processes
    assert main([*args[:-2], "optim.max_steps=4", "optim.accum_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "3 micro-batches per step cannot be split evenly over 2" in err and "Resume on 1, 3 process(es)" in err
    assert "Traceback" not in err


def test_the_stopped_run_may_have_had_another_number_of_loader_workers(tmp_path):
    """Fewer processes on a node get more CPUs each (data.num_workers=null adapts): the replay uses the old count."""
    shards = keyed_shards(tmp_path, 96)
    seen = []
    for r in range(2):
        loader = pretrain_loader(str(shards), img_size=8, batch_size=4, num_workers=1, shuffle_buffer=16, rank=r,
                                 world_size=2, **RAW)
        seen += [i for k, x in zip(range(3), loader) for i in sample_ids(x)]
    rest = _ids(1, 0, shards, skip=6, elastic=ElasticResume(epoch=0, world=2, batch=3, offset=6, workers=1))
    assert sorted(seen + rest) == list(range(96))  # _ids streams with 2 workers now
