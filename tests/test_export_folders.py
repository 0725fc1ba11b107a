"""Model folders (`maevit export --format timm|hf`): timm and transformers load them as they load
shared models, with the same numbers as maevit; maevit's own commands read them back."""
import json

import pytest
import timm
import torch

from maevit.cli import main as cli
from maevit.export_folder import ExportFormatError, write_hf_folder, write_timm_folder
from maevit.models import create_classifier, create_mae, list_models, model_info, read_header
from maevit.models.weights import save_weights, header_of

PREP = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "interpolation": "bicubic", "crop_pct": 0.875}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _first_of_each_family() -> list[str]:
    seen: dict[str, str] = {}
    for name in list_models():
        seen.setdefault(model_info(name).family, name)
    return sorted(seen.values())


def _smoke_mae(name):
    return create_mae(name, **model_info(name).smoke, decoder_depth=1, decoder_embed_dim=32,
                      decoder_num_heads=2).eval()


@pytest.mark.parametrize("name", _first_of_each_family())
def test_every_family_timm_has_loads_from_its_folder_strictly(name, tmp_path):
    """Registry-wide: a family with a timm architecture exports a folder that `local-dir:` loads strictly
    (timm's loader is strict) with maevit's features; a family without one is refused, naming the alternative."""
    mae = _smoke_mae(name)
    with torch.no_grad():
        for p in mae.encoder.parameters():  # distinct values everywhere: a mis-mapped tensor shows
            p.add_(torch.randn_like(p) * 0.02)
    folder = tmp_path / "folder"
    if mae.encoder.timm_spec() is None:
        with pytest.raises(ExportFormatError, match="no timm architecture.*maevit export SRC OUT.safetensors"):
            write_timm_folder(mae, folder, preprocessing=PREP, card=lambda h: "")
        assert not folder.exists()
        return
    write_timm_folder(mae, folder, preprocessing=PREP, card=lambda h: "card")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, mae.encoder.in_chans, *mae.encoder.img_size)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), mae.encoder.forward_features(x), atol=1e-5, rtol=1e-5)
    cfg = model.pretrained_cfg
    assert tuple(cfg["input_size"]) == (mae.encoder.in_chans, *mae.encoder.img_size)
    assert (tuple(cfg["mean"]), tuple(cfg["std"]), cfg["crop_pct"]) == (PREP["mean"], PREP["std"], 0.875)
    assert "tag" not in cfg and "license" not in cfg  # the architecture's published weights' facts are not copied
    # maevit reads the folder wherever it reads a weights file: the architecture from config.json
    again = create_classifier(None, 0, pretrained=folder, global_pool=None).eval()
    with torch.no_grad():
        torch.testing.assert_close(again.forward_features(x), mae.encoder.forward_features(x), atol=0, rtol=0)


def test_hf_folder_from_pretrained_predicts_as_maevit(tmp_path):
    transformers = pytest.importorskip("transformers")
    mae = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=2, decoder_embed_dim=64,
                     decoder_depth=1, decoder_num_heads=4).eval()
    with torch.no_grad():
        for p in mae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    folder = write_hf_folder(mae, tmp_path / "hf", preprocessing=PREP, card=lambda h: "card")
    hf = transformers.ViTMAEForPreTraining.from_pretrained(str(folder)).eval()
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, mae.num_patches)
    with torch.no_grad():
        ours, theirs = mae(imgs, noise=noise), hf(pixel_values=imgs, noise=noise)
    assert torch.equal(ours.mask, theirs.mask)
    torch.testing.assert_close(theirs.logits, ours.pred, atol=1e-5, rtol=1e-5)
    proc = transformers.AutoImageProcessor.from_pretrained(str(folder))
    assert list(proc.image_mean) == list(PREP["mean"]) and proc.size == {"height": 32, "width": 32}
    # and back: maevit rebuilds the MAE from the folder alone (header in config.json, weights in HF names)
    assert read_header(folder)["kind"] == "mae"
    again = create_mae(None, checkpoint=folder).eval()
    with torch.no_grad():
        assert torch.equal(again(imgs, noise=noise).pred, ours.pred)


def test_hf_refuses_what_vitmae_cannot_hold(tmp_path):
    swin = "mae_swin_tiny_patch4_window7_224"
    with pytest.raises(ExportFormatError, match="not a plain ViT"):
        write_hf_folder(_smoke_mae(swin), tmp_path / "a", preprocessing=PREP, card=lambda h: "")
    rope = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=1, pos_encoding="rope")
    with pytest.raises(ExportFormatError, match="pos_encoding=rope"):
        write_hf_folder(rope, tmp_path / "b", preprocessing=PREP, card=lambda h: "")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_export_command_formats_and_refusals(tmp_path, capsys):
    mae = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2,
                     decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    src = save_weights(mae.state_dict(), tmp_path / "mae.safetensors", header_of(mae, "mae"))
    out = tmp_path / "folder"
    assert cli(["export", str(src), str(out), "--format", "timm"]) == 0
    assert f"timm.create_model('local-dir:{out}', pretrained=True)" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "library_name: timm" in card and "Not exported from a maevit run directory" in card
    assert cli(["export", str(src), str(out), "--format", "timm"]) == 0  # an earlier model folder is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "mae.safetensors"]  # nothing left aside
    # a folder that is not a model folder is never replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert cli(["export", str(src), str(mine), "--format", "timm"]) == 2
    assert "not a model folder" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "keep"
    # a folder name without --format, and a file name with it: said before anything is read
    for argv in (["export", str(src), str(tmp_path / "x")], ["export", str(src), str(tmp_path / "x.safetensors"),
                                                             "--format", "timm"]):
        with pytest.raises(SystemExit) as e:
            cli(argv)
        assert e.value.code == 2
    assert "--format timm" in capsys.readouterr().err
    # a family timm does not have: exit 2 and the way out, nothing written
    cvt = _smoke_mae("mae_cvt_tiny")
    cvt_src = save_weights(cvt.state_dict(), tmp_path / "cvt.safetensors", header_of(cvt, "mae"))
    assert cli(["export", str(cvt_src), str(tmp_path / "cvt"), "--format", "timm"]) == 2
    err = capsys.readouterr().err
    assert "no timm architecture" in err and "Traceback" not in err and not (tmp_path / "cvt").exists()
    # an encoder file has no decoder for --format hf
    enc = tmp_path / "enc.safetensors"
    assert cli(["export", str(src), str(enc)]) == 0
    assert cli(["export", str(enc), str(tmp_path / "hf"), "--format", "hf"]) == 2
    assert "without the MAE decoder" in capsys.readouterr().err
    # the maevit header travels in config.json too
    assert json.loads((out / "config.json").read_text())["maevit"]["model_name"] == "mae_vit_tiny_patch16"


def test_a_classifier_exports_with_its_head_and_class_names(tmp_path):
    """A fine-tuned classifier's folder is a ready timm classifier (label_names, same logits), and
    `maevit eval` reads the folder back."""
    from maevit.train.evaluate import load_classifier

    names = [f"class_{c}" for c in "abcde"]
    clf = create_classifier("mae_vit_tiny_patch16", 5, img_size=32, patch_size=8, depth=1, embed_dim=32,
                            num_heads=2).eval()
    with torch.no_grad():
        clf.head.bias.copy_(torch.randn(5))  # a head that is not all zeros: a dropped head shows
    src = save_weights(clf.state_dict(), tmp_path / "classifier.safetensors",
                       header_of(clf, "classifier", class_names=names, mean=[0.5] * 3, std=[0.25] * 3))
    out = tmp_path / "clf"
    assert cli(["export", str(src), str(out), "--format", "timm"]) == 0
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert model.num_classes == 5 and model.pretrained_cfg["label_names"] == names
    assert tuple(model.pretrained_cfg["mean"]) == (0.5,) * 3  # the classifier's own normalisation
    again, header = load_classifier(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), clf(x), atol=1e-5, rtol=1e-5)
        assert torch.equal(again.eval()(x), clf(x))
    assert header["class_names"] == names
