"""Data that is silently wrong or silently partial: 16-bit images, per-kind skip counts through
pretraining, interrupted shard writes, truncated shards, the pixel limit."""
import io
import json
import tarfile
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maevit.data.shards import check_shards, main as shards_main, write_shards
from maevit.data.stream import IncompleteDatasetError, labeled_loader, pretrain_loader
from maevit.train import runs
from tar_helpers import write_tar

RAW = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))  # loaders output 0..255 values


# ----------------------------------------------------------------------------- 16-bit images
def _picture(h: int = 24, w: int = 24) -> np.ndarray:
    """A smooth 8-bit RGB picture with a mean near the middle (~112), like a photo."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    r = 40 + 180 * xx
    g = 30 + 150 * yy
    b = 110 + 60 * np.sin(6 * xx) * np.cos(4 * yy)
    return np.stack([r, g, b], -1).round().astype(np.uint8)


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (grayscale [H, W] or RGB [H, W, 3] uint16), written by hand: Pillow cannot write 48-bit RGB."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0 if arr.ndim == 2 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _encoded(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, **kw).save(buf, format=fmt)
    return buf.getvalue()


def _high_depth(kind: str) -> tuple[bytes, str, np.ndarray]:
    """(file bytes, extension, the 8-bit twin as RGB) for each high-bit-depth kind."""
    rgb8 = _picture()
    gray8 = np.asarray(Image.fromarray(rgb8).convert("L"))
    gray_twin = np.repeat(gray8[:, :, None], 3, axis=2)
    wide = gray8.astype(np.uint16) * 257  # 0..255 -> 0..65535
    if kind == "gray16_png":
        return _png16(wide), "png", gray_twin
    if kind == "rgb16_png":
        return _png16(rgb8.astype(np.uint16) * 257), "png", rgb8
    if kind == "gray16_tiff":
        return _encoded(wide, "TIFF"), "tif", gray_twin
    if kind == "float_tiff":
        return _encoded(gray8.astype(np.float32) / 255.0, "TIFF", mode="F"), "tif", gray_twin
    raise ValueError(kind)


def _one_image_folder(root: Path, name: str, data: bytes) -> Path:
    (root / "c0").mkdir(parents=True)
    (root / "c0" / name).write_bytes(data)
    return root


@pytest.mark.parametrize("kind", ["gray16_png", "rgb16_png", "gray16_tiff", "float_tiff"])
def test_high_bit_depth_image_decodes_like_its_8bit_twin(tmp_path, kind):
    data, ext, twin = _high_depth(kind)
    deep = _one_image_folder(tmp_path / "deep", f"a.{ext}", data)
    flat = _one_image_folder(tmp_path / "flat", "a.png", _encoded(twin, "PNG"))
    assert abs(twin.mean() - 112) < 25  # a normal picture, not near-white
    for make in (
        # pretraining: crop-aware decode, full-image crop; the same seed gives the same crop and flip
        lambda src: next(iter(pretrain_loader(str(src), img_size=24, batch_size=1, num_workers=0, scale=(1.0, 1.0),
                                              **RAW))),
        # fine-tuning / evaluation: PIL + timm transforms
        lambda src: next(iter(labeled_loader(str(src), img_size=24, batch_size=1, train=False, num_workers=0,
                                             crop_pct=1.0, **RAW)))[0],
    ):
        a, b = make(deep), make(flat)  # [1, 3, 24, 24], 0..255
        assert abs(a.mean().item() - b.mean().item()) < 1.0, (a.mean(), b.mean())
        assert (a - b).abs().max().item() <= 2.0  # within a few levels, pixel by pixel
    report = check_shards(str(deep), progress=False)
    assert report["samples"] == 1 and not report["bad"]


# ----------------------------------------------------------------------------- skip counts
def _tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


@pytest.fixture
def planted(tmp_path):
    """48 samples in 6 shards of 8 (with dataset.json) and planted bad samples of each kind.

    Returns (shard dir, {kind: planted count})."""
    src = tmp_path / "images"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):
        size = 40 if i == 0 else 12  # one image over the pixel limit the test sets (1000 px)
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(src / f"{i:03d}.png")
    out = tmp_path / "shards"
    index = write_shards(str(src), out, samples_per_shard=8, progress=False)
    assert [s["count"] for s in index["shards"]] == [8] * 6
    shards = [out / s["name"] for s in index["shards"]]
    big = next(json.loads(d)["path"] for sh in shards for n, d in _tar_members(sh) if n.endswith(".json")
               and json.loads(d)["path"] == "000.png")
    assert big == "000.png"
    # shard 1: 3 corrupt images; shard 2: 2 samples without an image (their .json stays)
    m = _tar_members(shards[1])
    pngs = [n for n, _ in m if n.endswith(".png")]
    write_tar(shards[1], [(n, b"\x89PNG garbage" if n in pngs[:3] else d) for n, d in m])
    m = _tar_members(shards[2])
    pngs = [n for n, _ in m if n.endswith(".png")]
    write_tar(shards[2], [(n, d) for n, d in m if n not in pngs[2:4]])
    # shard 4: cut inside the image of its 6th sample: that sample and the 2 after it are lost
    with tarfile.open(shards[4]) as tf:
        sixth = [x for x in tf.getmembers() if x.name.endswith(".png")][5]
    shards[4].write_bytes(shards[4].read_bytes()[: sixth.offset_data + 10])
    return out, {"corrupt_image": 3, "oversized_image": 1, "missing_image": 2, "missing_label": 0,
                 "unreadable_shard": 3, "bad_member": 0}


def test_skip_counts_per_kind_in_metrics_tracker_and_summary_equal_the_planted_ones(planted, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from test_pretrain import _cfg
    from maevit.train.pretrain import train

    shards, expected = planted
    common = (f"data.train={shards}", "data.num_workers=2", "data.max_pixels=1000", "run.log_every=3",
              "run.ckpt_every=3")
    torch.set_num_threads(1)
    result = train(_cfg(tmp_path / "full", *common))  # 1 epoch: 48 samples / batch 8 = 6 steps, none left out
    assert result["step"] == 6 and result["skipped"] == expected
    rows = runs.read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 6] and rows[-1]["skipped"] == expected
    assert sum(rows[0]["skipped"].values()) <= sum(expected.values())  # running totals
    events = list((tmp_path / "full" / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[0].parent)).Reload()
    for kind, n in expected.items():
        assert [e.value for e in acc.Scalars(f"train/skipped_{kind}")][-1] == n
    # stopped after the first checkpoint and resumed: the same rows, counts included
    train(_cfg(tmp_path / "part", *common, "optim.max_steps=3"))
    assert train(_cfg(tmp_path / "part", *common))["skipped"] == expected

    def timeless(rows):
        return [{k: v for k, v in r.items() if k not in ("images_per_sec", "tflops", "mfu", "data_wait")} for r in rows]

    assert timeless(runs.read_metrics(tmp_path / "part" / "metrics.jsonl")) == timeless(rows)


def test_loader_counts_samples_not_rereads(planted):
    shards, expected = planted
    for workers in (0, 2):  # refills re-read bad samples of a worker's range: still counted once
        loader = pretrain_loader(str(shards), img_size=8, batch_size=8, num_workers=workers, max_pixels=1000)
        assert len(list(loader)) == 6 and loader.stats() == expected


# ----------------------------------------------------------------------------- shards check / write
def test_check_reports_a_truncated_shard_once_with_the_samples_lost(planted, capsys):
    shards, _ = planted
    assert shards_main(["check", str(shards), "--no-progress", "--max-pixels", "1000"]) == 1
    out = capsys.readouterr().out
    cut = [line for line in out.splitlines() if "shard-000004.tar" in line]
    assert len(cut) == 1 and "3 of 8 samples lost" in cut[0], out
    assert "39 samples OK, 9 bad (3 corrupt image, 1 oversized image, 2 missing image, 3 unreadable shard)" in out
    # a tar cut exactly between two samples reads without error: without an index, the missing end marker tells
    loose = shards.parent / "loose"
    loose.mkdir()
    with tarfile.open(shards / "shard-000000.tar") as tf:
        third = [x for x in tf.getmembers() if x.name.endswith(".png")][2]
    (loose / "a.tar").write_bytes((shards / "shard-000000.tar").read_bytes()[: third.offset])
    report = check_shards(str(loose), progress=False)
    assert report["samples"] == 2 and len(report["bad"]) == 1
    assert "damaged (truncated: no end-of-archive marker)" in report["bad"][0] and "number is unknown" in report["bad"][0]


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def test_interrupted_shard_write_is_reported_and_the_same_command_finishes_it(tmp_path, capsys, monkeypatch):
    from maevit.data import shards
    from maevit.train.pretrain import main as pretrain_main

    src = tmp_path / "images"
    src.mkdir()
    for i in range(23):
        Image.new("RGB", (10, 10), (i * 10, 50, 200 - i * 5)).save(src / f"{i:02d}.png")
    out = tmp_path / "shards"
    cmd = ["write", str(src), str(out), "--samples-per-shard", "5", "--no-progress"]
    real_add = shards._ShardSink.add

    def add(self, members):
        if len(self.shards) == 3 and self._count == 2:  # 2 shards done, the 3rd half written: killed
            raise _Killed()
        real_add(self, members)

    monkeypatch.setattr(shards._ShardSink, "add", add)
    monkeypatch.setattr(shards._ShardSink, "abort", lambda self: None)  # a kill cleans nothing up
    with pytest.raises(_Killed):
        shards_main(cmd)
    monkeypatch.undo()
    left = sorted(p.name for p in out.iterdir())
    assert "dataset.json" not in left and "shard-000001.tar" in left and "dataset.incomplete.json" in left
    assert any(n.startswith(".shard-000002.tar.tmp-") for n in left)  # a half-written shard

    # reported by `shards check`, by the loaders (also through a glob) and by `maevit pretrain`
    assert shards_main(["check", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "interrupted `maevit shards write`" in err and "2 shards with 10 samples of 23 inputs" in err
    with pytest.raises(IncompleteDatasetError, match="Run the same `maevit shards write` command again"):
        pretrain_loader(str(out / "*.tar"), img_size=8, batch_size=2)
    assert pretrain_main([f"data.train={out}", f"run.dir={tmp_path / 'run'}", "model.img_size=32",
                          "model.patch_size=8", "run.progress=false"]) == 2
    assert "interrupted `maevit shards write`" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    # other options: refused; the same command: continues, and the result is what an uninterrupted write gives
    assert shards_main([*cmd[:-1], "--samples-per-shard", "7"]) == 2
    assert "other options" in capsys.readouterr().err
    assert shards_main(cmd) == 0
    assert "continuing an interrupted write" in capsys.readouterr().err
    clean = tmp_path / "clean"
    write_shards(str(src), clean, samples_per_shard=5, progress=False)
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(p.name for p in clean.iterdir())
    assert "dataset.incomplete.json" not in files and not [f for f in files if ".tmp-" in f]
    for f in files:
        assert (out / f).read_bytes() == (clean / f).read_bytes(), f
    assert check_shards(str(out), progress=False)["samples"] == 23


def test_interrupted_write_of_an_older_version_is_detected(tmp_path):
    # older versions left only shards and a temporary file, without a progress file
    out = tmp_path / "shards"
    write_shards("bundled:val", out, samples_per_shard=200, progress=False)
    (out / "dataset.json").unlink()
    (out / ".shard-000003.tar.tmp-4242").write_bytes(b"partial")
    with pytest.raises(IncompleteDatasetError, match="--overwrite"):
        check_shards(str(out), progress=False)
    assert shards_main(["write", "bundled:val", str(out), "--samples-per-shard", "200", "--overwrite",
                        "--no-progress"]) == 0
    assert not (out / ".shard-000003.tar.tmp-4242").exists()
    assert check_shards(str(out), progress=False)["samples"] == 500
