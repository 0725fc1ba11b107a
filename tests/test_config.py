"""Config schema: merge order, validation, readable errors."""
from dataclasses import dataclass, field
from typing import Literal

import pytest

from maevit.config import ConfigError, load_config, save_config


@dataclass
class Optim:
    lr: float = 1.0e-4  # base learning rate
    epochs: int = 10


@dataclass
class Cfg:
    optim: Optim = field(default_factory=Optim)
    precision: Literal["fp32", "bf16"] = "fp32"


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  epochs: 5\n")
    cfg = load_config(Cfg, recipe, ["optim.lr=1e-3", "precision=bf16"])
    assert cfg.optim.epochs == 5 and cfg.optim.lr == 1e-3 and cfg.precision == "bf16"
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(Cfg, tmp_path / "out.yaml") == cfg


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lrr=1", "Did you mean 'lr'"),
        ("optim.epochs=2.5", "optim.epochs: expected an integer"),
        ("precision=fp8", "'fp32', 'bf16'"),
        ("optim.lr=fast", "optim.lr: expected a number"),
        ("epochs", "key=value"),
    ],
)
def test_bad_keys_and_values_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Cfg, None, [override])
