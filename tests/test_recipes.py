"""Shipped recipes: `maevit recipes`, and `maevit pretrain|finetune NAME` from any folder."""
from pathlib import Path

import pytest
import yaml

from maevit.cli import main
from maevit.recipes import list_recipes, recipe_root

REPO = Path(__file__).resolve().parents[1]


def test_recipes_lists_every_top_level_recipe_with_its_model_and_purpose(capsys):
    assert recipe_root() == REPO  # a source checkout reads the top-level folders themselves
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    files = sorted((REPO / "pretrain").glob("*.yaml")) + sorted((REPO / "finetune").glob("*.yaml"))
    assert len(lines) == len(files)
    for line, path in zip(lines, files):
        stage, name, model, about = line.split(maxsplit=3)
        assert (stage, name) == (path.parent.name, path.stem)
        assert model == yaml.safe_load(path.read_text())["model"]["name"]
        assert about.endswith(".") and about.split()[0] in path.read_text().splitlines()[0]
    assert main(["recipes", "swin"]) == 0
    assert [line.split()[:2] for line in capsys.readouterr().out.splitlines()] == [
        ["pretrain", "cifar10_swin"], ["finetune", "cifar10_swin"]]
    assert main(["recipes", "no_such_recipe"]) == 2
    assert "no recipe matches" in capsys.readouterr().err


@pytest.mark.parametrize("cmd,arg", [("pretrain", "cifar10_swin"), ("pretrain", "cifar10_swin.yaml"),
                                     ("pretrain", "pretrain/cifar10_swin.yaml"), ("finetune", "cifar10_hiera")])
def test_a_shipped_recipe_runs_by_name_from_any_folder(cmd, arg, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no pretrain/ folder here: the name is a shipped recipe
    assert main([cmd, arg, "--print-config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    recipe = yaml.safe_load((REPO / cmd / f"{Path(arg).stem}.yaml").read_text())
    assert shown["model"]["name"] == recipe["model"]["name"] and shown["model"]["args"] == recipe["model"]["args"]


def test_a_local_file_wins_over_a_shipped_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "demo.yaml").write_text("model: {name: mae_vit_small_patch16}\n")
    assert main(["pretrain", "pretrain/demo.yaml", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["name"] == "mae_vit_small_patch16"
    assert main(["pretrain", "demo", "--print-config"]) == 0  # a bare name: the shipped recipe
    assert yaml.safe_load(capsys.readouterr().out)["data"]["train"] == "sample:train"


def test_an_unknown_recipe_is_a_usage_error_naming_the_closest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "cifar10_swn"]) == 2
    err = capsys.readouterr().err
    assert "cifar10_swin" in err and "maevit recipes" in err and "Traceback" not in err
    # a recipe of the other stage: says which command runs it
    assert main(["pretrain", "cifar10_resnet_teacher"]) == 2
    assert "maevit finetune cifar10_resnet_teacher" in capsys.readouterr().err
    assert len(list_recipes("pretrain")) == len(list((REPO / "pretrain").glob("*.yaml")))
