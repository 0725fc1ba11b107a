"""The weights file is the default (issue 21): a fine-tune or probe that names only model.pretrained
takes the image size and mean / std that the pretraining used, and says where each came from."""
import logging

import pytest
import torch

from maevit.config import load_config
from maevit.train.file_defaults import fill_from_weights
from maevit.train.finetune import FinetuneConfig
from maevit.train.pretrain import train
from maevit.train.probe import ProbeConfig
from tiny_runs import TINY_PRETRAIN

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pre") / "run"
    torch.set_num_threads(1)
    from maevit.train.pretrain import PretrainConfig

    cfg = load_config(PretrainConfig, None, [*TINY_PRETRAIN, f"run.dir={run_dir}", "optim.max_steps=1",
                                              f"data.mean={MEAN}", f"data.std={STD}"])
    train(cfg)
    return run_dir


@pytest.mark.parametrize("cls", [FinetuneConfig, ProbeConfig])
@pytest.mark.parametrize("which", ["run_dir", "encoder_file"])
def test_size_and_normalisation_come_from_the_weights_file(pretrained, cls, which, caplog):
    src = pretrained if which == "run_dir" else pretrained / "encoder.safetensors"
    cfg = load_config(cls, None, [f"model.pretrained={src}", "data.train=x"])
    assert cfg.model.img_size is None and cfg.data.mean is None  # left open until the file is read
    with caplog.at_level(logging.INFO, logger="maevit.defaults"):
        fill_from_weights(cfg)
    assert cfg.model.img_size == 32
    assert list(cfg.data.mean) == pytest.approx(MEAN) and list(cfg.data.std) == pytest.approx(STD)
    assert f"model.img_size=32 (from {src})" in caplog.text


def test_the_command_line_wins_and_scratch_gets_the_imagenet_defaults(pretrained):
    cfg = fill_from_weights(load_config(FinetuneConfig, None, [f"model.pretrained={pretrained}", "model.img_size=64",
                                                               "data.mean=[0.1, 0.1, 0.1]", "data.train=x"]))
    assert cfg.model.img_size == 64 and list(cfg.data.mean) == [0.1, 0.1, 0.1]
    assert list(cfg.data.std) == pytest.approx(STD)
    scratch = fill_from_weights(load_config(FinetuneConfig, None, ["model.name=mae_vit_tiny_patch16", "data.train=x"]))
    assert scratch.model.img_size == 224 and list(scratch.data.mean) == pytest.approx([0.485, 0.456, 0.406])


def test_a_finetune_naming_only_the_run_trains_at_its_size(pretrained, tmp_path):
    from maevit.train.finetune import finetune

    run_dir = tmp_path / "ft"
    cfg = load_config(FinetuneConfig, None, [f"model.pretrained={pretrained}", "data.train=bundled:train",
                                             "data.batch_size=8", "data.num_workers=0", "optim.max_steps=1",
                                             f"run.dir={run_dir}", "run.progress=false", "run.precision=fp32"])
    finetune(cfg)
    saved = (run_dir / "config.yaml").read_text()
    assert "img_size: 32" in saved and "0.5" in saved  # config.yaml records the values used
