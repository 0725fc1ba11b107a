"""Streaming: exact-epoch split across ranks and workers, determinism, resume, eval, label fractions."""
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maevit.data.stream import labeled_loader, pretrain_loader, resolve_source
from tar_helpers import write_tar

ID_NORM = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))  # outputs raw 0..255 values


def _id_png(i: int) -> bytes:
    """A flat 12x12 image whose colour encodes `i` (< 256); crops and flips keep the colour."""
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (i, 255 - i, 7)).save(buf, format="PNG")
    return buf.getvalue()


def _ids(batch: torch.Tensor) -> list[int]:
    red = batch[:, 0].flatten(1)  # [B, H*W]
    assert (red.max(1).values - red.min(1).values).max() < 1.5, "identity images must stay flat"
    return red.mean(1).round().long().tolist()


@pytest.fixture
def uneven_shards(tmp_path):
    """7 shards of uneven sizes holding samples 0..100, labeled `i % 4`."""
    sizes = [20, 3, 17, 11, 25, 9, 16]
    i = 0
    for s, n in enumerate(sizes):
        members = []
        for _ in range(n):
            members += [(f"{i:06d}.png", _id_png(i)), (f"{i:06d}.cls", str(i % 4).encode())]
            i += 1
        write_tar(tmp_path / f"part-{s:06d}.tar", members)
    assert i == 101
    return tmp_path


def _epoch_ids(loader) -> list[int]:
    out = []
    for b in loader:
        out += _ids(b[0] if isinstance(b, tuple) else b)
    return out


def test_exact_two_ranks_two_workers_cover_each_sample_once(uneven_shards):
    per_rank = []
    for rank in range(2):
        loader = pretrain_loader(
            str(uneven_shards), img_size=8, batch_size=5, num_workers=2, rank=rank, world_size=2,
            seed=3, shuffle_buffer=8, **ID_NORM,
        )
        assert len(loader) == 101 // (2 * 5)
        batches = list(loader)
        assert len(batches) == len(loader) == 10  # equal on both ranks despite uneven shards
        assert all(b.shape == (5, 3, 8, 8) for b in batches)
        per_rank.append([i for b in batches for i in _ids(b)])
    a, b = per_rank
    assert len(set(a)) == len(a) == 50 and len(set(b)) == len(b) == 50
    assert not set(a) & set(b)
    assert set(a) | set(b) <= set(range(101))  # 1 sample left out this epoch (drop_last rule)


def test_exact_wraparound_without_drop_last(uneven_shards):
    seen = []
    for rank in range(2):
        loader = pretrain_loader(
            str(uneven_shards), img_size=8, batch_size=5, num_workers=0, rank=rank, world_size=2,
            drop_last=False, shuffle_buffer=1, **ID_NORM,
        )
        assert len(loader) == 11  # ceil(101 / 10)
        seen += _epoch_ids(loader)
    assert len(seen) == 110 and set(seen) == set(range(101))  # all covered, 9 repeated


def test_same_seed_same_order_new_epoch_new_order(uneven_shards):
    def run(seed, epoch):
        loader = pretrain_loader(str(uneven_shards), img_size=8, batch_size=10, num_workers=0, seed=seed, **ID_NORM)
        loader.set_epoch(epoch)
        return _epoch_ids(loader)

    first = run(0, 0)
    assert first == run(0, 0)
    assert sorted(first) != first
    other_epoch = run(0, 1)
    assert other_epoch != first and len(set(other_epoch)) == 100
    assert run(1, 0) != first


def test_same_seed_same_pixels(uneven_shards, tmp_path):
    loader = pretrain_loader("bundled:val", img_size=16, batch_size=50, num_workers=0, seed=5)
    a, b = next(iter(loader)), next(iter(loader))
    assert torch.equal(a, b)
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader)), a)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_batches_resumes_exactly(uneven_shards, num_workers):
    loader = pretrain_loader(
        str(uneven_shards), img_size=8, batch_size=4, num_workers=num_workers, seed=1, shuffle_buffer=16
    )
    loader.set_epoch(2)
    full = list(loader)
    assert len(full) == 25
    loader.skip_batches(7)  # e.g. a checkpoint taken after 7 batches
    tail = list(loader)
    assert len(tail) == 18
    assert all(torch.equal(x, y) for x, y in zip(full[7:], tail))
    assert loader.state_dict() == {"epoch": 2, "batch": 25}
    assert len(list(loader)) == 25  # skip applies to one iteration only


def test_eval_exactly_once_across_ranks(uneven_shards):
    labels, ids = [], []
    counts = []
    for rank in range(2):
        loader = labeled_loader(
            str(uneven_shards), img_size=8, batch_size=8, train=False, num_workers=0, rank=rank, world_size=2,
            crop_pct=1.0, **ID_NORM,
        )
        n = 0
        for x, y in loader:
            ids += _ids(x)
            labels += y.tolist()
            n += 1
        assert n == len(loader)
        counts.append(n)
    assert sorted(ids) == list(range(101))  # every sample once, no padding duplicates
    assert labels == [i % 4 for i in ids]
    assert counts == [7, 7]  # 50 and 51 samples, batch 8


def test_label_fraction_balanced_and_fixed(uneven_shards, tmp_path):
    def subset(label_seed, src=str(uneven_shards)):
        loader = labeled_loader(
            src, img_size=8, batch_size=4, train=False, num_workers=0, label_fraction=0.2,
            label_seed=label_seed, crop_pct=1.0, **ID_NORM,
        )
        ids, labels = [], []
        for x, y in loader:
            ids += _ids(x)
            labels += y.tolist()
        return ids, labels

    ids, labels = subset(0)
    # classes of sizes 26, 25, 25, 25 -> round(0.2 * n) each
    assert Counter(labels) == {0: 5, 1: 5, 2: 5, 3: 5}
    assert all(i % 4 == y for i, y in zip(ids, labels))
    assert subset(0)[0] == ids
    assert set(subset(1)[0]) != set(ids)
    # The same rule on an image folder.
    folder = tmp_path / "folder"
    for i in range(40):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"c{i % 2}" / f"{i:03d}.png").write_bytes(_id_png(i))
    loader = labeled_loader(str(folder), img_size=8, batch_size=64, train=True, num_workers=0,
                            label_fraction=0.25, drop_last=False)
    assert loader.num_samples == 10 and loader.class_names == ["c0", "c1"]
    (x, y), = list(loader)
    assert sorted(Counter(y.tolist()).values())[0] >= 5


def test_labeled_train_is_deterministic_with_timm_augmentation():
    loader = labeled_loader("bundled:val", img_size=16, batch_size=32, train=True, num_workers=0, seed=0)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    (x1, y1), (x2, y2) = next(iter(loader)), next(iter(loader))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(state, torch.get_rng_state())  # data loading does not touch the training RNG
    assert loader.num_classes == 10 and x1.shape == (32, 3, 16, 16)


def test_resampled_mode_epoch_length(uneven_shards):
    loader = pretrain_loader(str(uneven_shards), img_size=8, batch_size=4, num_workers=0, mode="resampled",
                             samples_per_epoch=64, world_size=2, **ID_NORM)
    assert len(loader) == 8
    ids = _epoch_ids(loader)
    assert len(ids) == 32 and set(ids) <= set(range(101))
    assert ids == _epoch_ids(loader)


def test_sources_and_errors(uneven_shards, tmp_path):
    pattern = str(uneven_shards / "part-{000000..000006}.tar")
    assert resolve_source(pattern).num_samples == 101
    assert resolve_source([str(p) for p in sorted(uneven_shards.glob("*.tar"))]).num_samples == 101
    assert resolve_source("bundled:val").num_samples == 500
    unlabeled = tmp_path / "flat"
    unlabeled.mkdir()
    for i in range(3):
        (unlabeled / f"{i}.png").write_bytes(_id_png(i))
    with pytest.raises(ValueError, match="class-per-folder"):
        labeled_loader(str(unlabeled), img_size=8, batch_size=2, train=True)
    with pytest.raises(ValueError, match="fewer than one batch"):
        pretrain_loader(str(unlabeled), img_size=8, batch_size=4, num_workers=0)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        pretrain_loader(str(tmp_path / "nope-{0..3}.tar"), img_size=8, batch_size=4)
    with pytest.raises(ValueError, match="allow_pipe=True"):
        pretrain_loader("pipe:cat " + pattern, img_size=8, batch_size=4)
    with pytest.raises(ValueError, match="allow_pipe=True"):
        pretrain_loader(["pipe:curl -s http://example.com/a.tar"], img_size=8, batch_size=4)


def test_a_failing_transform_is_raised_not_counted_as_corrupt(monkeypatch):
    # bad data is skipped and counted; an augmentation bug on a good image must surface, with the sample named
    import maevit.data.stream as stream

    def broken(transform, img, seed):
        raise ValueError("bits must be between or equal to 1 and 8")

    import maevit.data.split as split  # the worker dataset applies the transforms

    monkeypatch.setattr(split, "apply_seeded", broken)
    loader = stream.labeled_loader("bundled:val", img_size=32, batch_size=4, train=True, num_workers=0)
    with pytest.raises(stream.TransformError, match=r"decoded fine: ValueError: bits must be"):
        next(iter(loader))
