"""A label-fraction subset of small local shards is read once and kept (each epoch would otherwise read
every shard to its end to use a tenth of it): the same batches and skip counts as streaming it; corrupt
images are still found when decoded, and a shard cut short gives the same subset either way."""
import io
import tarfile

import pytest
import torch
from PIL import Image

from maevit.data import labeled_loader
from maevit.data import split


def _jpeg(i):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 7 % 256, i * 13 % 256, i * 29 % 256)).save(buf, format="JPEG")
    return buf.getvalue()


def _shard(path, n, bad=()):
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for ext, data in (("jpg", b"not a jpeg" if i in bad else _jpeg(i)), ("cls", str(i % 4).encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _batches(src, epochs=2):
    loader = labeled_loader(src, img_size=8, batch_size=4, train=True, num_workers=0, label_fraction=0.25,
                            shuffle_buffer=8, auto_augment=None, re_prob=0.0)
    out = []
    for e in range(epochs):
        loader.set_epoch(e)
        out += [(x.clone(), y.clone()) for x, y in loader]
    return out, loader


@pytest.mark.parametrize("damage", ["none", "corrupt", "truncated"])
def test_a_cached_subset_gives_the_batches_of_the_stream(tmp_path, monkeypatch, damage):
    for s in range(2):
        _shard(tmp_path / f"shard-{s}.tar", 32, bad=range(0, 32, 3) if damage == "corrupt" and s == 0 else ())
    if damage == "truncated":
        first = tmp_path / "shard-0.tar"
        first.write_bytes(first.read_bytes()[:-9000])
    cached, loader = _batches(str(tmp_path))
    units = loader._source.units
    assert units[1].cached is not None  # small, all readable: kept
    monkeypatch.setattr(split, "SUBSET_CACHE_BYTES", 0)
    streamed, plain = _batches(str(tmp_path))
    assert all(u.cached is None for u in plain._source.units)
    assert len(cached) == len(streamed) > 0
    for (xa, ya), (xb, yb) in zip(cached, streamed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert loader.stats() == plain.stats()
    if damage == "corrupt":
        assert loader.stats()["corrupt_image"] > 0
