"""`maevit embed` / `maevit knn`: features of a whole source, written, resumed and read back."""
import re

import pytest
import torch

from maevit.cli import main as cli
from maevit.embeddings import read_embeddings
from maevit.models import create_classifier, create_mae, model_info
from maevit.models.weights import header_of, save_weights
from maevit.train import runs
from maevit.train.knn import patch_features
from maevit.train.pretrain import PretrainConfig, train
from maevit.config import load_config
from tiny_runs import TINY_PRETRAIN


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def mae_file(tmp_path_factory):
    mae = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2,
                     decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    return save_weights(mae.state_dict(), tmp_path_factory.mktemp("m") / "mae.safetensors", header_of(mae, "mae"))


@pytest.mark.slow
def test_embedded_knn_equals_the_online_probe(tmp_path, capsys):
    """A tiny pretraining run probes itself online (bank sample:train, queries sample:val); `maevit embed` of
    both sources from the run directory and `maevit knn` of the two files give the same top-1 / top-5."""
    run_dir = tmp_path / "run"
    cfg = load_config(PretrainConfig, None, [*TINY_PRETRAIN, f"run.dir={run_dir}", "data.batch_size=32",
                                             "optim.max_steps=2", "run.probe_every=2", "run.probe_train=sample:train",
                                             "run.probe_val=sample:val"])
    train(cfg)
    online = [r for r in runs.read_metrics(run_dir / "metrics.jsonl") if "knn_top1" in r][-1]
    assert online["step"] == 2
    for split in ("train", "val"):
        out = tmp_path / f"{split}.safetensors"
        assert cli(["embed", f"sample:{split}", "--model", str(run_dir), "--out", str(out), "--batch-size", "32",
                    "--num-workers", "0"]) == 0
    val = read_embeddings(tmp_path / "val.safetensors")
    assert val.features.shape == (1000, 32) and val.labels.shape == (1000,) and len(set(val.keys)) == 1000
    capsys.readouterr()
    assert cli(["knn", str(tmp_path / "train.safetensors"), str(tmp_path / "val.safetensors")]) == 0
    top1, top5 = map(float, re.search(r"top-1 ([\d.]+)%  top-5 ([\d.]+)%", capsys.readouterr().out).groups())
    assert (top1, top5) == (pytest.approx(online["knn_top1"], abs=0.005), pytest.approx(online["knn_top5"], abs=0.005))
    # the same run exported as a timm folder: its model card states what the run did and measured
    assert cli(["export", str(run_dir), str(tmp_path / "folder"), "--format", "timm"]) == 0
    card = (tmp_path / "folder" / "README.md").read_text()
    loss = [r for r in runs.read_metrics(run_dir / "metrics.jsonl") if "loss" in r][-1]["loss"]
    for line in ("| command | maevit pretrain |", "| data | bundled:train |", "| optimizer steps | 2 |",
                 "| images seen | 64 |", f"| final training loss | {loss:.4f} |",
                 f"| kNN top-1 (k=20) on sample:val, bank sample:train, step 2 | {online['knn_top1']:.2f} |",
                 "probe_train: sample:train"):
        assert line in card, line


def test_an_interrupted_embed_resumes_from_its_parts(mae_file, tmp_path, capsys, monkeypatch):
    import maevit.embed as embed

    ref = tmp_path / "ref.safetensors"
    args = ["--model", str(mae_file), "--batch-size", "64", "--part-size", "256", "--num-workers", "0"]
    assert cli(["embed", "sample:val", "--out", str(ref), *args]) == 0
    assert not (tmp_path / "ref.safetensors.parts").exists()  # joined, then removed
    out = tmp_path / "out.safetensors"
    written = []
    real = embed._write_part

    def stop_after_two(parts_dir, part, chunk, manifest, skipped):
        if len(written) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the third part is being computed
        real(parts_dir, part, chunk, manifest, skipped)
        written.append(part)

    monkeypatch.setattr(embed, "_write_part", stop_after_two)
    assert cli(["embed", "sample:val", "--out", str(out), *args]) == 130
    assert not out.exists() and len(list((tmp_path / "out.safetensors.parts").glob("part-*"))) == 2
    monkeypatch.setattr(embed, "_write_part", real)
    # other settings over the parts: refused, never mixed
    assert cli(["embed", "sample:val", "--out", str(out), *args, "--tokens"]) == 2
    assert "holds parts of another embedding (it differs in tokens)" in capsys.readouterr().err
    assert cli(["embed", "sample:val", "--out", str(out), *args]) == 0
    assert "resuming: 2 of 4 parts" in capsys.readouterr().err
    a, b = read_embeddings(ref), read_embeddings(out)
    assert torch.equal(a.features, b.features) and torch.equal(a.labels, b.labels) and a.keys == b.keys
    assert a.class_names == b.class_names and len(a.class_names) == 10
    # loader workers read interleaved stretches of the source: the file is in source order all the same
    workers = tmp_path / "workers.safetensors"
    assert cli(["embed", "sample:val", "--out", str(workers), *args[:-1], "2"]) == 0
    c = read_embeddings(workers)
    assert c.keys == a.keys and torch.equal(c.labels, a.labels)
    torch.testing.assert_close(c.features, a.features, atol=1e-5, rtol=1e-5)
    assert cli(["knn", str(mae_file), str(out)]) == 2  # weights are not embeddings: said, not a traceback
    assert "is not an embedding file written by `maevit embed`" in capsys.readouterr().err


def test_patch_grids_of_a_hierarchical_family_from_an_unlabeled_folder(tmp_path, capsys):
    from PIL import Image

    name = "mae_swin_tiny_patch4_window7_224"
    enc = create_classifier(name, 0, **model_info(name).smoke).eval()
    weights = save_weights(enc.state_dict(), tmp_path / "swin.safetensors", header_of(enc, "encoder"))
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(torch.randint(0, 255, (40 + i, 50, 3), dtype=torch.uint8).numpy()).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")  # counted and left out, never fatal
    out = tmp_path / "grid.npy"
    assert cli(["embed", str(folder), "--model", str(weights), "--out", str(out), "--tokens",
                "--num-workers", "0"]) == 0
    assert "1 unreadable samples skipped" in capsys.readouterr().out
    emb = read_embeddings(out)
    h, w = enc.img_size
    assert emb.labels is None and emb.keys == ["img0", "img1", "img2"] and emb.meta["skipped"] == {"corrupt_image": 1}
    assert emb.features.shape[0] == 3 and emb.features.shape[-1] == enc.num_features
    assert emb.features.shape[1:3] == patch_features(enc, torch.zeros(1, 3, h, w)).shape[1:3]
    assert cli(["knn", str(out), str(out)]) == 2  # no labels (and grids): said, not a wrong number
    assert "has no labels" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # an output format it cannot write: said before any work
        cli(["embed", str(folder), "--model", str(weights), "--out", str(tmp_path / "x.pt")])
    assert e.value.code == 2
