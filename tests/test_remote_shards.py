"""Shards behind a URL, read without shell pipes: a real HTTP server on loopback (cut connections,
500s that recover, unreachable shards) and fsspec's memory:// object store (written by
`maevit shards write`), streamed by pretraining and fine-tuning."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from http_shards import ShardServer
from maevit.data import remote
from maevit.data.shards import main as shards_main, write_shards
from maevit.data.stream import DataSourceError, labeled_loader, pretrain_loader


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    """Back-off of milliseconds: the tests check what is retried and counted, not how long it waits."""
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    monkeypatch.setattr(remote, "RETRIES", 2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """48 labeled samples (2 classes) in 6 shards of 8, with dataset.json."""
    root = tmp_path_factory.mktemp("remote")
    rng = np.random.default_rng(0)
    for i in range(48):
        folder = root / "images" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    write_shards(str(root / "images"), root / "shards", samples_per_shard=8, progress=False)
    return root / "shards"


def _pretrain(src: str, workers: int = 0) -> tuple[list[torch.Tensor], dict[str, int]]:
    loader = pretrain_loader(src, img_size=8, batch_size=8, num_workers=workers, shuffle_buffer=16)
    return list(loader), loader.stats()


def _cut_inside_sample(shard: Path, k: int) -> int:
    """A byte offset inside the image of the k-th sample of ``shard``."""
    import tarfile

    with tarfile.open(shard) as tf:
        return [m for m in tf.getmembers() if m.name.endswith(".png")][k].offset_data + 10


def test_http_shards_stream_the_same_batches_as_local_ones(shards):
    with ShardServer(shards) as server:
        for workers in (0, 2):  # in this process, and in forked DataLoader workers
            local, local_stats = _pretrain(str(shards), workers)
            got, stats = _pretrain(f"{server.url}/dataset.json", workers)
            assert len(got) == len(local) == 6 and stats == local_stats and not any(stats.values())
            for a, b in zip(got, local):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_connection_cut_mid_shard_counts_exactly_like_a_truncated_local_tar(shards, tmp_path):
    name = "shard-000003.tar"
    cut = _cut_inside_sample(shards / name, 5)
    truncated = tmp_path / "truncated"
    shutil.copytree(shards, truncated)
    (truncated / name).write_bytes((shards / name).read_bytes()[:cut])
    local, local_stats = _pretrain(str(truncated))
    assert local_stats["unreadable_shard"] == 3  # the cut sample and the two after it
    with ShardServer(shards, cut={name: cut}) as server:
        got, stats = _pretrain(f"{server.url}/dataset.json")
        assert stats == local_stats
        for a, b in zip(got, local):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        # every try resumed at the byte where the connection was cut
        assert [r for n, r, _ in server.requests if n == name] == ["", f"bytes={cut}-", f"bytes={cut}-"]


@pytest.mark.parametrize("ranges", [True, False])
def test_a_cut_that_a_resumed_read_repairs_loses_nothing(shards, ranges):
    name = "shard-000002.tar"
    cut = _cut_inside_sample(shards / name, 3)
    local, _ = _pretrain(str(shards))
    with ShardServer(shards, cut_once={name: cut}, ranges=ranges) as server:
        got, stats = _pretrain(f"{server.url}/dataset.json")
        assert not any(stats.values())
        for a, b in zip(got, local):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        # resumed at the byte where it was cut (a server without Range support sends it all again)
        assert [(r, s) for n, r, s in server.requests if n == name] == (
            [("", 200), (f"bytes={cut}-", 206)] if ranges else [("", 200), ("", 200)])


def test_server_errors_that_recover_are_retried(shards):
    with ShardServer(shards, fail_first={"dataset.json": 2, "shard-000001.tar": 2}) as server:
        got, stats = _pretrain(f"{server.url}/dataset.json")
        assert len(got) == 6 and not any(stats.values())
        assert [s for n, _, s in server.requests if n == "shard-000001.tar"] == [500, 500, 200]


def test_a_stalled_response_times_out_and_is_retried(shards, monkeypatch):
    monkeypatch.setattr(remote, "TIMEOUT_S", 0.3)
    with ShardServer(shards, stall_first={"shard-000005.tar": 1}, stall_s=3.0) as server:
        got, stats = _pretrain(f"{server.url}/dataset.json")
        assert len(got) == 6 and not any(stats.values())
        assert [s for n, _, s in server.requests if n == "shard-000005.tar"] == [200, 200]


def test_an_unreachable_shard_is_counted_and_named_with_its_cause(shards, caplog):
    with ShardServer(shards, fail_first={"shard-000004.tar": 99}) as server:
        got, stats = _pretrain(f"{server.url}/dataset.json?v=SECRET")
    assert len(got) == 6 and stats["unreadable_shard"] == 8  # refilled from the rest of the range
    text = caplog.text
    assert "shard-000004.tar" in text and "unreachable after 3 tries (HTTP 500" in text and "SECRET" not in text


def test_an_unreadable_index_url_is_one_clear_error(shards, capsys):
    from maevit.train.pretrain import main

    with ShardServer(shards) as server:
        with pytest.raises(DataSourceError, match=r"cannot read the shard index .*/nope/dataset.json: .*HTTP 404"):
            pretrain_loader(f"{server.url}/nope/dataset.json", img_size=8, batch_size=8, num_workers=0)
        assert main([f"data.train={server.url}/nope/dataset.json?v=SECRET", "model.img_size=32",
                     "run.progress=false"]) == 2
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "SECRET" not in err and "Traceback" not in err


@pytest.mark.parametrize("url", ["https://alice:hunter2@example.com/ds/dataset.json",
                                 "https://example.com/ds/dataset.json?X-Amz-Signature=hunter2&X-Amz-Date=1",
                                 "https://example.com/ds/dataset.json?access_token=hunter2"])
def test_credentials_in_a_url_are_refused_and_never_printed(url):
    with pytest.raises(DataSourceError, match="it holds credentials") as info:
        pretrain_loader(url, img_size=8, batch_size=8)
    assert "hunter2" not in str(info.value)
    assert remote.redact("see s3://k:s@b/x.tar?X-Amz-Signature=abc&a=1") == "see s3://***@b/x.tar?X-Amz-Signature=***&a=***"


def test_a_missing_cloud_backend_names_the_extra_to_install(monkeypatch):
    import fsspec

    def missing(url, **kw):  # what fsspec raises when gcsfs is not installed
        raise ImportError("Install gcsfs to access Google Storage")

    monkeypatch.setattr(fsspec.core, "url_to_fs", missing)
    with pytest.raises(DataSourceError, match=r"needs an fsspec back-end .*pip install 'maevit\[gcs\]'"):
        pretrain_loader("gs://bucket/ds/dataset.json", img_size=8, batch_size=8)


# ----------------------------------------------------------------------------- S3 (a local moto server)
@pytest.fixture
def s3(monkeypatch):
    """A real S3 API on loopback (moto's server); credentials and endpoint from the environment, as s3fs reads them."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(key, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("maevit-test")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_s3_shards_written_and_streamed_through_a_local_s3_server(shards, s3, capsys):
    url = "s3://maevit-test/in/train"
    assert shards_main(["write", str(shards.parent / "images"), url, "--samples-per-shard", "8", "--no-progress"]) == 0
    assert sorted(p.rsplit("/", 1)[1] for p in s3.ls("maevit-test/in/train")) == sorted(
        p.name for p in shards.iterdir() if not p.name.startswith("."))
    for workers in (0, 2):
        local, _ = _pretrain(str(shards), workers)
        got, stats = _pretrain(url, workers)
        assert len(got) == 6 and not any(stats.values())
        for a, b in zip(got, local):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert "testing" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- object store (fsspec memory://)
@pytest.fixture
def memory_store():
    import fsspec

    fs = fsspec.filesystem("memory")
    yield "memory://maevit-test"
    if fs.exists("/maevit-test"):
        fs.rm("/maevit-test", recursive=True)


def test_shards_write_to_an_object_store_and_stream_back(shards, memory_store, capsys):
    images = shards.parent / "images"
    url = f"{memory_store}/ds"
    assert shards_main(["write", str(images), url, "--samples-per-shard", "8", "--no-progress"]) == 0
    assert "wrote 48 samples in 6 shards" in capsys.readouterr().out
    import fsspec

    fs = fsspec.filesystem("memory")
    written = [p for p in shards.iterdir() if not p.name.startswith(".")]  # not the local writer's .lock
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls("/maevit-test/ds", detail=False)) == sorted(
        p.name for p in written)
    for p in written:  # the same bytes as a local write
        assert fs.cat(f"/maevit-test/ds/{p.name}") == p.read_bytes()
    assert shards_main(["check", url, "--no-progress"]) == 0 and "48 samples OK, 0 bad" in capsys.readouterr().out
    # a second write to the same prefix is refused, --overwrite replaces it
    assert shards_main(["write", str(images), url, "--samples-per-shard", "8", "--no-progress"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert shards_main(["write", str(images), url, "--samples-per-shard", "16", "--no-progress", "--overwrite"]) == 0
    assert len(fs.ls("/maevit-test/ds")) == 3 + 1  # 3 shards of 16 + dataset.json: none of the 6 old shards left
    assert shards_main(["write", str(images), url, "--samples-per-shard", "8", "--no-progress", "--overwrite"]) == 0
    capsys.readouterr()
    local, _ = _pretrain(str(shards))
    got, stats = _pretrain(f"{url}/dataset.json")
    assert not any(stats.values())
    for a, b in zip(got, local):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    x, y = next(iter(labeled_loader(url, img_size=8, batch_size=8, train=False, num_workers=0)))
    assert x.shape == (8, 3, 8, 8) and set(y.tolist()) <= {0, 1}


# ----------------------------------------------------------------------------- training streams from both
@pytest.mark.slow
def test_pretraining_and_finetuning_stream_from_http_and_the_object_store(shards, memory_store, tmp_path):
    import fsspec

    from maevit.config import load_config
    from maevit.train.finetune import FinetuneConfig, finetune
    from maevit.train.pretrain import PretrainConfig, train
    from tiny_runs import TINY_PRETRAIN

    fs = fsspec.filesystem("memory")
    for p in shards.glob("*[rn]"):  # the shards and dataset.json
        fs.pipe_file(f"/maevit-test/ds/{p.name}", p.read_bytes())
    name = "shard-000003.tar"
    with ShardServer(shards, cut={name: _cut_inside_sample(shards / name, 5)}) as server:
        for src, lost in ((f"{server.url}/dataset.json", 3), (f"{memory_store}/ds/dataset.json", 0)):
            run = tmp_path / f"pre-{lost}"
            result = train(load_config(PretrainConfig, None, [*TINY_PRETRAIN, f"data.train={src}", f"run.dir={run}",
                                                              "data.num_workers=2", "optim.max_steps=6"]))
            assert result["step"] == 6 and result["skipped"]["unreadable_shard"] == lost
            ft = finetune(load_config(FinetuneConfig, None, [
                "model.name=mae_vit_tiny_patch16", "model.img_size=32", "model.patch_size=8",
                "model.args={depth: 1, embed_dim: 32, num_heads: 2}", f"data.train={src}", "data.val=null",
                "data.batch_size=8", "data.num_workers=0", "optim.epochs=1", "optim.warmup_epochs=0",
                f"run.dir={tmp_path / f'ft-{lost}'}", "run.log_every=1", "run.ckpt_every=0", "run.precision=fp32",
                "run.progress=false"]))
            assert ft["step"] == 6 and all(np.isfinite(ft["losses"])) and ft["skipped"]["unreadable_shard"] == lost
        assert not any(r.startswith("pipe:") for _, r, _ in server.requests)
