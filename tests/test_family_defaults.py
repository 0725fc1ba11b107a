"""Per-model defaults registered with each family: what they say, and that a recipe always wins."""
from pathlib import Path

import pytest

from maevit.config import fill_unset, load_config
from maevit.models import (
    create_classifier, create_mae, family_defaults, list_models, model_info, num_visible, register_model,
)
from maevit.train.finetune import FinetuneConfig
from maevit.train.optim import param_groups_layer_decay
from maevit.train.pretrain import PretrainConfig


@pytest.mark.parametrize("name", list_models())
def test_every_model_states_resolvable_defaults(name):
    pre = fill_unset(load_config(PretrainConfig, None, [f"model.name={name}"]), family_defaults(name, "pretrain"))
    e = model_info(name)
    assert 0.0 < pre.model.mask_ratio < 1.0 and isinstance(pre.model.norm_pix_loss, bool)
    assert (pre.model.decoder_embed_dim, pre.model.decoder_depth) == (e.decoder.embed_dim, e.decoder.depth)
    ft = fill_unset(load_config(FinetuneConfig, None, [f"model.name={name}"]), family_defaults(name, "finetune"))
    assert 0.0 < ft.optim.layer_decay <= 1.0 and ft.optim.layer_decay_by in ("block", "stage")
    assert ft.model.drop_path is not None and ft.optim.layer_decay_exempt is not None


def test_a_recipe_value_wins_over_the_models():
    name = "mae_hiera_tiny_224"
    assert family_defaults(name, "pretrain")["model.mask_ratio"] == 0.6
    cfg = load_config(PretrainConfig, None, [f"model.name={name}", "model.mask_ratio=0.9"])
    assert fill_unset(cfg, family_defaults(name, "pretrain")).model.mask_ratio == 0.9
    ft = load_config(FinetuneConfig, None, [f"model.name={name}", "optim.layer_decay=0.5"])
    ft = fill_unset(ft, family_defaults(name, "finetune"))
    assert ft.optim.layer_decay == 0.5 and ft.optim.layer_decay_by == "stage"


def test_unregistered_names_get_the_toolkit_defaults():
    assert family_defaults(None, "pretrain")["model.mask_ratio"] == 0.75
    assert family_defaults("timm:resnet18", "finetune")["optim.layer_decay_by"] == "block"
    with pytest.raises(ValueError, match="stage"):
        family_defaults(None, "probe")


def test_register_model_rejects_unknown_settings():
    with pytest.raises(ValueError, match="mask_ration"):
        register_model(pretrain=dict(mask_ration=0.5))


def test_layer_decay_by_stage_and_exempt_parts():
    model = create_classifier("mae_swin_tiny_patch4_window7_224", 10, img_size=128, window_size=4, embed_dim=16,
                              num_heads=(1, 2, 4, 8))
    scales = lambda groups: sorted({round(g["lr_scale"], 6) for g in groups})  # noqa: E731
    by_block = scales(param_groups_layer_decay(model, 0.05, 0.5))
    by_stage = scales(param_groups_layer_decay(model, 0.05, 0.5, by="stage"))
    assert len(by_stage) == 6 < len(by_block)  # stem, 4 stages, norm + head
    groups = param_groups_layer_decay(model, 0.05, 0.5, by="stage", exempt=["patch_embed.*"])
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            if names[id(p)].startswith("patch_embed."):
                assert g["lr_scale"] == 1.0


RECIPES = sorted((Path(__file__).resolve().parents[1] / "pretrain").glob("cifar10_*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_small_image_recipes_leave_enough_visible_units(recipe):
    """Each family's CIFAR-10 recipe masks at a unit small enough that an image keeps >= 16 visible units."""
    cfg = load_config(PretrainConfig, recipe, [])
    cfg = fill_unset(cfg, family_defaults(cfg.model.name, "pretrain"))
    encoder = create_mae(cfg.model.name, **cfg.model.overrides()).encoder
    units = (cfg.model.img_size // encoder.mask_unit) ** 2
    assert num_visible(units, cfg.model.mask_ratio) >= 16, (recipe.name, encoder.mask_unit, units)
    finetune = recipe.parents[1] / "finetune" / recipe.name
    if finetune.is_file():  # the fine-tuning recipe builds the same geometry
        ft = load_config(FinetuneConfig, finetune, [])
        assert (ft.model.name, ft.model.img_size) == (cfg.model.name, cfg.model.img_size)
