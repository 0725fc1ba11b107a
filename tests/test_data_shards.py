"""Shards: write -> read round trip, reproducibility, CLI, foreign layouts, bad samples, safety."""
import io
import json
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maevit.data.shards import check_shards, main, write_shards
from maevit.data.stream import labeled_loader, pretrain_loader, resolve_source
from tar_helpers import write_tar


def _jpeg(rng: np.random.Generator, size=(20, 14)) -> bytes:
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def class_tree(tmp_path):
    """3 classes x 7 JPEGs (+ one PNG) in a class-per-folder tree."""
    rng = np.random.default_rng(0)
    root = tmp_path / "tree"
    for c in ("ant", "bee", "cat"):
        (root / c).mkdir(parents=True)
        for i in range(7):
            (root / c / f"img{i}.jpg").write_bytes(_jpeg(rng))
    Image.new("RGB", (9, 11), (1, 2, 3)).save(root / "bee" / "extra.png")
    return root


def test_round_trip_images_and_labels_identical(class_tree, tmp_path):
    out = tmp_path / "shards"
    index = write_shards(str(class_tree), out, samples_per_shard=6, progress=False)
    assert index["total"] == 22 and index["classes"] == ["ant", "bee", "cat"]
    assert [s["count"] for s in index["shards"]] == [6, 6, 6, 4]
    # Original bytes stored unchanged (no re-encoding) and labels match the folders.
    seen = {}
    for shard in index["shards"]:
        with tarfile.open(out / shard["name"]) as tf:
            names = tf.getnames()
            for name in names:
                if name.endswith(".json"):
                    key = name[:-5]
                    meta = json.loads(tf.extractfile(name).read())
                    img_name = next(n for n in names if n.startswith(key + ".") and n.rsplit(".")[-1] in ("jpg", "png"))
                    assert tf.extractfile(img_name).read() == (class_tree / meta["path"]).read_bytes()
                    assert int(tf.extractfile(key + ".cls").read()) == ["ant", "bee", "cat"].index(meta["class"])
                    seen[meta["path"]] = key
    assert len(seen) == 22 and sorted(seen.values()) == [f"{i:09d}" for i in range(22)]
    # Streaming the shards gives exactly the same images and labels as the folder.
    kw = dict(img_size=12, batch_size=64, train=False, num_workers=0, crop_pct=1.0)
    (xs, ys), = list(labeled_loader(str(out), **kw))
    (xf, yf), = list(labeled_loader(str(class_tree), **kw))
    order_s = sorted(range(22), key=lambda i: (ys[i].item(), xs[i].sum().item()))
    order_f = sorted(range(22), key=lambda i: (yf[i].item(), xf[i].sum().item()))
    assert torch.equal(xs[order_s], xf[order_f]) and torch.equal(ys[order_s], yf[order_f])


def test_rewrite_is_byte_identical_and_never_silently_overwrites(class_tree, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_shards(str(class_tree), a, samples_per_shard=5, progress=False)
    write_shards(str(class_tree), b, samples_per_shard=5, progress=False)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and "dataset.json" in files
    assert not [f for f in files if "tmp" in f]
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_shards(str(class_tree), a, progress=False)
    index = write_shards(str(class_tree), a, samples_per_shard=100, overwrite=True, progress=False)
    assert sorted(p.name for p in a.glob("*.tar")) == ["shard-000000.tar"] and index["total"] == 22


def test_resize_reencodes_to_jpeg_shorter_side(tmp_path):
    src = tmp_path / "big"
    src.mkdir()
    Image.new("RGB", (300, 200), (200, 10, 10)).save(src / "a.png")
    Image.new("RGB", (40, 60), (10, 200, 10)).save(src / "b.jpg")
    out = tmp_path / "out"
    index = write_shards(str(src), out, resize_shorter=100, quality=80, workers=1, progress=False)
    assert index["classes"] is None and index["made_with"]["resize_shorter"] == 100
    with tarfile.open(out / "shard-000000.tar") as tf:
        imgs = [Image.open(io.BytesIO(tf.extractfile(n).read())) for n in tf.getnames() if n.endswith(".jpg")]
    assert sorted(im.size for im in imgs) == [(40, 60), (150, 100)]  # never upscaled
    assert all(im.format == "JPEG" for im in imgs)


def test_cli_write_info_check(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bund"
    assert main(["write", "bundled:val", str(out), "--samples-per-shard", "200", "--no-progress"]) == 0
    assert "wrote 500 samples in 3 shards" in capsys.readouterr().out
    assert main(["write", "bundled:val", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "samples: 500" in info and "shards:  3" in info and "circle" in info
    assert main(["check", str(out), "--no-progress"]) == 0
    assert "500 samples OK, 0 bad" in capsys.readouterr().out
    # Damage one sample: check reports it and goes on.
    shard = out / "shard-000001.tar"
    with tarfile.open(shard) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    name0 = next(n for n, _ in members if n.endswith(".png"))
    members = [(n, b"\x89PNG garbage" if n == name0 else d) for n, d in members]
    write_tar(shard, members)
    assert main(["check", str(out), "--no-progress"]) == 1
    report = capsys.readouterr().out
    assert f"BAD {shard}:{name0[:-4]}" in report and "499 samples OK, 1 bad" in report
    assert main(["info", str(out / "shard-{000000..000002}.tar")]) == 0
    assert "samples: 500" in capsys.readouterr().out


def test_img2dataset_and_imagenet_style_shards(tmp_path):
    rng = np.random.default_rng(1)
    # img2dataset: {key}.jpg / .txt / .json, no index; ImageNet-style: .jpg + .cls
    write_tar(tmp_path / "00000.tar", [
        m for i in range(6) for m in (
            (f"0000{i:05d}.jpg", _jpeg(rng)), (f"0000{i:05d}.txt", b"a caption"),
            (f"0000{i:05d}.json", json.dumps({"url": "http://x", "key": f"{i}"}).encode()),
        )
    ])
    loader = pretrain_loader(str(tmp_path), img_size=8, batch_size=3, num_workers=0)
    assert loader.num_samples == 6 and sum(len(b) for b in loader) == 6
    inet = tmp_path / "inet"
    inet.mkdir()
    write_tar(inet / "train-0.tar", [
        m for i in range(4) for m in ((f"n01/{i}.JPEG", _jpeg(rng)), (f"n01/{i}.cls", str(i % 2).encode()))
    ])
    (x, y), = list(labeled_loader(str(inet / "train-0.tar"), img_size=8, batch_size=4, train=False, num_workers=0))
    assert y.tolist() == [0, 1, 0, 1]


@pytest.fixture
def damaged_shards(tmp_path):
    """20 good samples + a corrupt JPEG + a sample without image + a truncated shard."""
    rng = np.random.default_rng(2)
    good = [m for i in range(20) for m in ((f"g{i:03d}.jpg", _jpeg(rng)), (f"g{i:03d}.cls", b"1"))]
    write_tar(tmp_path / "d-000000.tar", good[:20] + [("bad.jpg", b"\xff\xd8\xff\xe0 not a jpeg"), ("bad.cls", b"0")]
               + [("noimg.json", b"{}"), ("noimg.cls", b"0")] + good[20:])
    write_tar(tmp_path / "d-000001.tar", [
        m for i in range(6) for m in ((f"t{i:03d}.jpg", _jpeg(rng, (64, 64))), (f"t{i:03d}.cls", b"2"))
    ])
    full = (tmp_path / "d-000001.tar").read_bytes()
    (tmp_path / "d-000001.tar").write_bytes(full[: len(full) // 2])  # truncated mid-member
    return tmp_path


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_skipped_counted_never_sleep(damaged_shards, num_workers):
    loader = pretrain_loader(str(damaged_shards), img_size=8, batch_size=4, num_workers=num_workers,
                             shuffle_buffer=4, drop_last=False)  # every sample is in the epoch
    t0 = time.perf_counter()
    batches = list(loader)
    assert len(batches) == len(loader) and all(b.shape == (4, 3, 8, 8) for b in batches)
    assert torch.isfinite(torch.stack(batches)).all()
    stats = loader.stats()
    assert stats["corrupt_image"] == 1 and stats["missing_image"] == 1, stats
    # the truncated shard has no index: its cut sample counts, the samples after the cut cannot be known
    assert stats["unreadable_shard"] == 1 and stats["bad_member"] == 0, stats
    if num_workers == 0:
        assert time.perf_counter() - t0 < 2.0  # no 0.5 s sleeps per bad sample


def test_eval_skips_bad_samples_without_duplicates(damaged_shards):
    loader = labeled_loader(str(damaged_shards), img_size=8, batch_size=64, train=False, num_workers=0)
    ys = torch.cat([y for _, y in loader])
    assert (ys == 1).sum() == 20 and loader.stats()["corrupt_image"] == 1
    assert check_shards(str(damaged_shards), progress=False)["samples"] == len(ys)


class _Evil:
    """Unpickling this creates a file: proof that a member was (or was not) unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_and_torch_members_never_loaded(tmp_path):
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Evil(str(marker)))
    pickle.loads(payload)  # the payload works ...
    assert marker.exists()
    marker.unlink()
    rng = np.random.default_rng(3)
    members = []
    for i in range(4):
        members += [(f"{i}.jpg", _jpeg(rng)), (f"{i}.cls", b"0"), (f"{i}.pyd", payload),
                    (f"{i}.pth", payload), (f"{i}.pickle", payload)]
    write_tar(tmp_path / "evil.tar", members)
    assert len(list(pretrain_loader(str(tmp_path / "evil.tar"), img_size=8, batch_size=2, num_workers=0))) == 2
    assert len(list(labeled_loader(str(tmp_path / "evil.tar"), img_size=8, batch_size=2, train=True,
                                   num_workers=0))) == 2
    assert check_shards(str(tmp_path / "evil.tar"), progress=False)["samples"] == 4
    assert not marker.exists()  # ... and was never executed


def test_remote_shards_need_an_index(tmp_path):
    with pytest.raises(ValueError, match="dataset.json"):
        resolve_source(["https://example.com/a-{0..3}.tar"])
