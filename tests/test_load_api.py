"""`maevit.load(PATH)` / `maevit.transforms_for(model)`: every kind of file a run writes comes back as
the model it holds, with the preprocessing its run used."""
import subprocess
import sys

import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import maevit
from maevit.config import load_config
from maevit.data.bundled import CLASSES
from maevit.models import CheckpointError, MaskedAutoencoder, ModelArgumentError, create_classifier
from maevit.models.weights import find_weights_file, read_header, read_state_dict
from tests.tiny_runs import TINY_PRETRAIN

MEAN, STD = [0.25, 0.5, 0.75], [0.2, 0.3, 0.4]  # not ImageNet's: they must come from the run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """A 3-step pretraining (custom mean / std), a 2-step fine-tune and a 1-epoch probe of its encoder."""
    from maevit.train.finetune import FinetuneConfig, finetune
    from maevit.train.pretrain import PretrainConfig, train
    from maevit.train.probe import ProbeConfig, probe

    root = tmp_path_factory.mktemp("runs")
    pt, ft, pr = root / "pt", root / "ft", root / "pr"
    train(load_config(PretrainConfig, None, [*TINY_PRETRAIN, "optim.max_steps=3", f"run.dir={pt}",
                                             f"data.mean={MEAN}", f"data.std={STD}"]))
    small = ["data.train=bundled:train", "data.val=null", "data.batch_size=8", "data.num_workers=0",
             "run.precision=fp32", "data.label_fraction=0.02"]
    finetune(load_config(FinetuneConfig, None, [f"model.pretrained={pt}", *small, "optim.max_steps=2",
                                                "run.progress=false", f"run.dir={ft}"]))
    probe(load_config(ProbeConfig, None, [f"model.pretrained={pt / 'encoder.safetensors'}", *small,
                                          "optim.epochs=1", f"run.dir={pr}"]))
    return pt, ft, pr


def _images(n=2):
    torch.manual_seed(1)
    return torch.randn(n, 3, 32, 32)


def test_import_maevit_is_cheap():
    code = "import sys, maevit; maevit.__version__; print(sorted({'torch', 'timm'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_pretraining_run_loads_as_its_mae(runs):
    pt, _, _ = runs
    for path in (pt, find_weights_file(pt).parent):  # the run directory, or one checkpoint of it
        mae = maevit.load(path)
        assert isinstance(mae, MaskedAutoencoder) and not mae.training
        saved = read_state_dict(find_weights_file(pt))
        for k, v in mae.state_dict().items():
            torch.testing.assert_close(v, saved[k], rtol=0, atol=0, msg=k)
        cfg = mae.pretrained_cfg
        assert cfg["kind"] == "mae" and cfg["input_size"] == (3, 32, 32)
        assert cfg["mean"] == pytest.approx(MEAN) and cfg["std"] == pytest.approx(STD)  # from the run's config
        out = mae(_images(), noise=torch.rand(2, 16))
        assert out.pred.shape == (2, 16, 8 * 8 * 3)


def test_the_exported_encoder_gives_the_pretrained_class_token(runs):
    pt, _, _ = runs
    enc = maevit.load(pt / "encoder.safetensors")
    assert enc.pretrained_cfg["kind"] == "encoder" and enc.pretrained_cfg["num_classes"] == 0
    assert enc.pretrained_cfg["mean"] == pytest.approx(MEAN)  # from the file's own header
    x = _images()
    with torch.no_grad():
        tokens = maevit.load(pt).encoder.forward_features(x)  # [B, 1 + L, D]
        torch.testing.assert_close(enc(x), tokens[:, 0])  # class token after the pretrained norm
        torch.testing.assert_close(enc.forward_features(x), tokens)


def test_a_finetuned_classifier_loads_with_its_classes_and_matches_timm(runs):
    _, ft, _ = runs
    for path in (ft, ft / "classifier.safetensors"):
        clf = maevit.load(path)
        cfg = clf.pretrained_cfg
        assert cfg["kind"] == "classifier" and cfg["num_classes"] == 10 and cfg["label_names"] == sorted(CLASSES)
        assert cfg["mean"] == pytest.approx(MEAN)  # the fine-tune took them from the pretraining
        header = read_header(ft / "classifier.safetensors")
        twin = timm.create_model(header["timm_model"], pretrained=False, **header["timm_kwargs"]).eval()
        twin.load_state_dict(load_file(ft / "classifier.safetensors"), strict=True)
        x = _images()
        with torch.no_grad():
            torch.testing.assert_close(clf(x), twin(x))


def test_a_probe_loads_as_its_encoder_and_head(runs, tmp_path):
    pt, _, pr = runs
    for path in (pr, pr / "probe_head.safetensors"):
        probe = maevit.load(path)
        assert probe.pretrained_cfg["kind"] == "probe_head" and probe.pretrained_cfg["num_classes"] == 10
        assert probe.pretrained_cfg["mean"] == pytest.approx(MEAN)
        head = load_file(pr / "probe_head.safetensors")
        pool = yaml.safe_load((pr / "config.yaml").read_text())["model"]["global_pool"]  # what the probe read
        enc = create_classifier(None, 0, pretrained=pt / "encoder.safetensors", global_pool=pool).eval()
        x = _images()
        with torch.no_grad():
            f = enc(x)
            want = (f - head["0.running_mean"]) / torch.sqrt(head["0.running_var"] + 1e-6) @ head["1.weight"].T \
                + head["1.bias"]
            torch.testing.assert_close(probe(x), want, rtol=1e-4, atol=1e-5)
    # a head file away from its run: which encoder it reads is unknown, and said so
    alone = tmp_path / "probe_head.safetensors"
    alone.write_bytes((pr / "probe_head.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="load the probe's run directory"):
        maevit.load(alone)


def test_transforms_for_resizes_crops_and_normalises_as_recorded(runs):
    pt, _, _ = runs
    enc = maevit.load(pt / "encoder.safetensors")
    tf = maevit.transforms_for(enc)
    colour = (51, 102, 204)
    x = tf(Image.new("RGB", (60, 45), colour))
    assert x.shape == (3, 32, 32)
    want = (torch.tensor(colour) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(x.mean(dim=(1, 2)), want, rtol=0, atol=1e-3)
    # timm reads the same convention
    assert timm.data.resolve_data_config(model=enc)["mean"] == pytest.approx(MEAN)
    with pytest.raises(ValueError, match="maevit.load"):
        maevit.transforms_for(torch.nn.Linear(2, 2))


def test_foreign_weights_need_a_model_name(tmp_path):
    """A timm state dict says nothing about itself: the registered name gives the architecture."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    with pytest.raises(ModelArgumentError, match="pass the model name"):
        maevit.load(path)
    enc = maevit.load(path, model="mae_vit_tiny_patch16")
    assert enc.pretrained_cfg["kind"] == "encoder" and enc.pretrained_cfg["input_size"] == (3, 224, 224)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), vit(x))
