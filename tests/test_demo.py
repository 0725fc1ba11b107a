"""The shipped photo sample (`sample:train|val`) and `maevit demo` with tiny settings."""
import json
import tarfile
from collections import Counter

import pytest
import torch
from safetensors import safe_open

from maevit.data.sample import CLASSES, resolve_sample
from maevit.data.stream import labeled_loader, resolve_source, select_fraction
from maevit.demo import main


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: faster, and far faster on a shared CPU
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("split,per_class", [("train", 500), ("val", 100)])
def test_sample_counts_and_classes(split, per_class):
    src = resolve_source(f"sample:{split}")
    assert src.class_names == list(CLASSES)
    assert src.num_samples == 10 * per_class
    labels = Counter()  # read the .cls members of the shards directly
    for shard in sorted(resolve_sample(f"sample:{split}").glob("*.tar.gz")):
        with tarfile.open(shard) as tar:
            labels.update(int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls"))
    assert labels == {c: per_class for c in range(10)}
    assert resolve_source("sample").num_samples == 5000  # "sample" = "sample:train"
    with pytest.raises(ValueError, match="unknown sample split"):
        resolve_source("sample:test")


def test_sample_streams_photos_and_label_fractions():
    x, y = next(iter(labeled_loader("sample:val", img_size=32, batch_size=50, train=False, num_workers=0)))
    assert x.shape == (50, 3, 32, 32) and x.std() > 0.3  # decoded photos, not blanks
    tenth = select_fraction(resolve_source("sample:train"), 0.1, seed=0)
    assert tenth.num_samples == 500


def _shapes(path):
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_demo_tiny_prints_the_comparison_and_reruns_cleanly(tmp_path, capsys):
    out = tmp_path / "demo"
    tiny = ["pretrain.model.embed_dim=32", "pretrain.model.depth=2", "pretrain.model.num_heads=2",
            "pretrain.model.decoder_embed_dim=32", "pretrain.model.decoder_depth=1", "pretrain.model.decoder_num_heads=2"]
    args = ["--out", str(out), *tiny, "pretrain.optim.max_steps=2", "pretrain.data.batch_size=16",
            "pretrain.data.num_workers=0", "pretrain.run.progress=false", "pretrain.run.probe_train=bundled:val",
            "pretrain.run.probe_val=bundled:val", "finetune.optim.max_steps=2", "finetune.data.batch_size=16",
            "finetune.data.num_workers=0"]
    assert main(args) == 0
    text = capsys.readouterr().out
    for line in ("pretrained", "scratch", "gain", "images/s", "kNN (k=20)", "fine-tune, 10% labels (500)",
                 "MAE pretraining", "demo total", "written:", "next:"):
        assert line in text, line
    stages = json.loads((out / "demo.json").read_text())["stages"]
    for name in ("finetune-10-pretrained", "finetune-10-scratch"):
        assert stages[name]["steps"] == 2 and 0 <= stages[name]["top1"] <= 100
    # pretrained and scratch are the same architecture: the pretraining's (patch 4, 32 wide, 2 blocks)
    a, b = (_shapes(out / f"finetune-10-{k}" / "classifier.safetensors") for k in ("pretrained", "scratch"))
    assert a == b and a["patch_embed.proj.weight"] == (32, 3, 4, 4) and "blocks.1.mlp.fc2.weight" in a
    assert "blocks.2.mlp.fc2.weight" not in a
    assert sorted(p.name for p in (out / "pretrain" / "images").glob("recon-*.png")) == ["recon-00000002.png"]

    # a second run shows the results again without training anything
    mtime = (out / "pretrain" / "metrics.jsonl").stat().st_mtime
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "this demo is complete" in again and "fine-tune, 10% labels (500)" in again and "nan" not in again
    assert (out / "pretrain" / "metrics.jsonl").stat().st_mtime == mtime
    # other settings on the same folder: refused, with the way out
    assert main([*args, "--seed", "1"]) == 2
    assert "--fresh" in capsys.readouterr().err


HIERA_PRETRAIN = """model:
  name: mae_hiera_tiny_224
  img_size: 64
  embed_dim: 16
  args: {stages: [1, 1, 1, 1]}
  decoder_embed_dim: 32
  decoder_depth: 1
  decoder_num_heads: 2
"""
HIERA_FINETUNE = """model:
  name: mae_hiera_tiny_224
  img_size: 64
  args: {embed_dim: 16, stages: [1, 1, 1, 1]}
"""


def test_demo_runs_another_family_from_its_small_image_recipe(tmp_path, capsys, monkeypatch):
    """`maevit demo --model FAMILY`: the family's cifar10 recipes give the model, the demo recipes the budget;
    the architecture is read from the model (no ViT attributes), and both fine-tunes rebuild it."""
    import shutil

    from maevit import demo

    repo = tmp_path / "repo"
    for kind, text in (("pretrain", HIERA_PRETRAIN), ("finetune", HIERA_FINETUNE)):
        (repo / kind).mkdir(parents=True)
        shutil.copy(demo.RECIPES / kind / "demo.yaml", repo / kind / "demo.yaml")
        (repo / kind / "cifar10_hiera.yaml").write_text(text)
    monkeypatch.setattr(demo, "RECIPES", repo)
    out = tmp_path / "demo"
    args = ["--out", str(out), "--model", "hiera", "pretrain.optim.max_steps=2", "pretrain.data.batch_size=16",
            "pretrain.data.num_workers=0", "pretrain.run.progress=false", "pretrain.run.probe_train=bundled:val",
            "pretrain.run.probe_val=bundled:val", "finetune.optim.max_steps=2", "finetune.data.batch_size=16",
            "finetune.data.num_workers=0"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "same encoder (mae_hiera_tiny_224" in text and "fine-tune, 10% labels (500)" in text
    a, b = (_shapes(out / f"finetune-10-{k}" / "classifier.safetensors") for k in ("pretrained", "scratch"))
    assert a == b and any(k.startswith("blocks.") for k in a)

    # a family without small-image recipes: a clear error naming what is missing and what exists
    assert main(["--out", str(tmp_path / "other"), "--model", "mae_sret_tiny"]) == 2
    err = capsys.readouterr().err
    assert "pretrain/cifar10_sret.yaml" in err and "hiera" in err and "vit" in err
    assert main(["--out", str(tmp_path / "other"), "--model", "nonsense"]) == 2
    assert "not a registered model or family" in capsys.readouterr().err
