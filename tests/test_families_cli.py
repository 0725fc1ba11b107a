"""Every encoder family through the real commands: two pretraining steps on the bundled data,
then two fine-tuning steps from the run directory with no architecture in the command."""
import json

import pytest
import torch

from maevit.models import list_models, model_info
from maevit.models.weights import read_header
from maevit.train.finetune import main_finetune
from maevit.train.pretrain import main as main_pretrain


def _one_per_family() -> list[str]:
    seen: dict[str, str] = {}
    for name in list_models():
        seen.setdefault(model_info(name).family, name)
    return sorted(seen.values())


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.mark.slow
@pytest.mark.parametrize("name", _one_per_family())
def test_pretrain_then_finetune_through_the_commands(name, tmp_path, capsys):
    smoke = dict(model_info(name).smoke)
    img = smoke.pop("img_size", 64)
    img = img if isinstance(img, int) else img[0]
    pre = tmp_path / "pre"
    common = ["data.batch_size=4", "data.num_workers=0", "run.progress=false", "run.log_every=1"]
    assert main_pretrain([
        f"model.name={name}", f"model.img_size={img}", f"model.args={json.dumps(smoke)}", "model.decoder_depth=1",
        "model.decoder_embed_dim=32", "model.decoder_num_heads=2", "data.train=bundled:train", "data.shuffle_buffer=8",
        "optim.max_steps=2", "optim.warmup_epochs=0", "run.viz_every=0", f"run.dir={pre}", *common,
    ]) == 0
    assert read_header(pre / "encoder.safetensors")["model_name"] == name
    ft = tmp_path / "ft"
    assert main_finetune([
        f"model.pretrained={pre}", f"model.img_size={img}", "data.train=bundled:train", "data.val=null",
        "data.mixup=0", "data.cutmix=0", "optim.max_steps=2", "optim.warmup_epochs=0", f"run.dir={ft}", *common,
    ]) == 0
    head = read_header(ft / "classifier.safetensors")
    assert head["model_name"] == name and head["num_classes"] == 10
    assert "fine-tuning done at step 2" in capsys.readouterr().out
