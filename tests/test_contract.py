"""The encoder contract, for every registered model (a family is covered by registering it).

Each model is built at its registered smoke size (same structure, tiny depth / image).
"""
import copy
import functools
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from maevit.models import (
    check_encoder, create_classifier, create_encoder, create_mae, export_encoder, list_models, model_info,
    patchify, read_header, unpatchify,
)
from maevit.models.weights import header_of, save_weights
from maevit.train.optim import param_groups_layer_decay

MODELS = list_models()


def _smoke(name, **kw):
    return {**model_info(name).smoke, **kw}


@functools.lru_cache(maxsize=None)
def _prototype(name):
    return create_mae(name, **_smoke(name, decoder_depth=1, decoder_embed_dim=32, decoder_num_heads=2))


def _mae(name):
    """A fresh smoke-size MAE (a copy: building the wide ones costs more than copying)."""
    return copy.deepcopy(_prototype(name))


def _images(model, b=2):
    enc = getattr(model, "encoder", model)
    return torch.randn(b, enc.in_chans, *enc.img_size)


def _masked_pixels(mae, mask):
    """[B, C, H, W] bool: pixels of masked patches."""
    p, c = mae.patch_size, mae.encoder.in_chans
    per_patch = mask.unsqueeze(-1).expand(-1, -1, p * p * c)
    return unpatchify(per_patch, p, mae.grid_size, c).bool()


@pytest.mark.parametrize("name", MODELS)
def test_contract_holds(name):
    check_encoder(create_encoder(name, **_smoke(name)))


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_reaches_every_parameter(name):
    mae = _mae(name).train()
    out = mae(_images(mae))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.pred.shape == patchify(_images(mae), mae.patch_size).shape
    n_keep = int((1 - out.mask).sum(1)[0])
    assert out.latent.shape == (2, mae.encoder.num_prefix_tokens + n_keep, mae.encoder.num_features)
    out.loss.backward()
    no_grad = [n for n, p in mae.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert no_grad == []


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", MODELS)
def test_masked_pixels_never_reach_the_encoder(name, mode):
    mae = _mae(name)
    mae.train(mode == "train")
    imgs = _images(mae)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731  same mask every call
    mask = mae.random_mask(2, generator=gen())
    hidden = _masked_pixels(mae, mask.mask)
    assert hidden.any() and (~hidden).any()

    def latent(x):
        torch.manual_seed(0)  # same dropout / drop-path draws, if any
        return mae.encoder.forward_masked(x, mask)

    base = latent(imgs)
    garbage = torch.where(hidden, torch.randn_like(imgs) * 100, imgs)
    assert torch.equal(latent(garbage), base)
    assert not torch.allclose(latent(torch.where(hidden, imgs, imgs + 1)), base)  # visible pixels do matter


@pytest.mark.parametrize("name", MODELS)
def test_nothing_masked_equals_the_full_forward(name):
    mae = _mae(name).eval()
    enc = mae.encoder
    if not enc.masked_equals_full:
        pytest.skip(f"{name}: {type(enc).__name__}.masked_equals_full is False (see its docstring)")
    x = _images(enc)
    mask = mae.random_mask(2, mask_ratio=0.0)
    with torch.no_grad():
        masked = enc.forward_masked(x, mask)  # visible tokens in ids_keep order
        full = enc.tokens_of(enc.forward_features(x))
    n = enc.num_prefix_tokens
    patches = torch.gather(masked[:, n:], 1, mask.ids_restore.unsqueeze(-1).expand(-1, -1, masked.shape[-1]))
    torch.testing.assert_close(torch.cat([masked[:, :n], patches], 1), full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_export_then_rebuild_from_the_file_alone(name, tmp_path):
    mae = _mae(name).eval()
    x = _images(mae)
    # encoder file -> classifier rebuilt with no name and no arguments
    path = export_encoder(mae, tmp_path / "encoder.safetensors")
    head = read_header(path)
    assert head["model_name"] == name and head["kind"] == "encoder"
    rebuilt = create_classifier(None, 0, pretrained=path, global_pool=None).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.forward_features(x), mae.encoder.forward_features(x), atol=0, rtol=0)
    if head.get("timm_model"):  # the file loads into the timm model its header names, strictly
        vit = timm.create_model(head["timm_model"], pretrained=False, **head["timm_kwargs"]).eval()
        vit.load_state_dict(load_file(str(path)), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(vit.forward_features(x), mae.encoder.forward_features(x), atol=1e-5, rtol=1e-5)
    # full MAE file -> MAE rebuilt with no name: same loss for the same mask
    full = save_weights(mae.state_dict(), tmp_path / "mae.safetensors", header_of(mae, "mae"))
    again = create_mae(None, checkpoint=full).eval()
    noise = torch.rand(2, mae.random_mask(2).unit_mask.shape[1])
    assert torch.equal(again(x, noise=noise).loss, mae(x, noise=noise).loss)
    json.dumps(head)  # the header is plain data


TIMM_TWINS = [n for n in MODELS if _prototype(n).encoder.timm_spec() is not None]


@pytest.mark.parametrize("name", TIMM_TWINS)
def test_a_classifier_file_evaluates_and_loads_into_timm(name, tmp_path):
    """Every family with a timm twin: a classifier file rebuilds from its header alone (`maevit eval`)
    with the same logits, and loads into the timm model the header names, strictly."""
    from maevit.train.evaluate import load_classifier

    clf = create_classifier(name, 7, **_smoke(name)).eval()
    path = save_weights(clf.state_dict(), tmp_path / "classifier.safetensors", header_of(clf, "classifier"))
    again, header = load_classifier(path)
    ref = timm.create_model(header["timm_model"], pretrained=False, **header["timm_kwargs"]).eval()
    ref.load_state_dict(load_file(str(path)), strict=True)
    x = _images(clf)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), clf(x), atol=0, rtol=0)
        torch.testing.assert_close(ref(x), clf(x))


@pytest.mark.parametrize("name", MODELS)
def test_layer_decay_groups_cover_every_parameter_once(name):
    clf = create_classifier(name, 5, **_smoke(name))
    groups = param_groups_layer_decay(clf, 0.05, 0.75)
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in clf.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable)
    scales = {g["lr_scale"] for g in groups}
    assert max(scales) == 1.0 and (min(scales) < 1.0)
    assert all(g["weight_decay"] == 0 for g in groups
               if any(p is dict(clf.named_parameters()).get(n) for p in g["params"] for n in clf.no_weight_decay()))


def test_unit_masking_expands_units_to_patches():
    from maevit.models import random_masking

    m = random_masking(3, (8, 12), 0.5, patches_per_unit=2, generator=torch.Generator().manual_seed(0))
    assert m.unit_grid == (4, 6) and m.ids_keep.shape == (3, 12 * 4)
    per_unit = m.mask.reshape(3, 4, 2, 6, 2).permute(0, 1, 3, 2, 4).reshape(3, 24, 4)
    assert torch.equal(per_unit.amin(-1), per_unit.amax(-1))  # every unit fully masked or fully visible
    assert torch.equal(per_unit[..., 0], m.unit_mask)
    assert set(m.ids_keep[0].tolist()) == set((m.mask[0] == 0).nonzero().flatten().tolist())
    shuffled = torch.argsort(m.ids_restore, 1)
    assert torch.equal(shuffled[:, :48], m.ids_keep)


def test_unit_of_one_patch_is_the_published_masking():
    from maevit.models import mask_from_noise, random_masking

    noise = torch.rand(4, 49)
    ours = random_masking(4, (7, 7), 0.75, noise=noise)
    # the published MAE code, inline
    keep = int(49 * 0.25)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(4, 49)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    assert torch.equal(ours.ids_keep, ids_shuffle[:, :keep]) and torch.equal(ours.ids_restore, ids_restore)
    assert torch.equal(ours.mask, mask) and torch.equal(mask_from_noise(noise, keep).mask, mask)


def test_unknown_names_and_arguments_suggest_close_matches():
    with pytest.raises(KeyError, match="mae_vit_base_patch16"):
        create_mae("mae_vit_base_patch61")
    with pytest.raises(KeyError, match="decoder_embed_dim"):
        create_mae("mae_vit_tiny_patch16", decoder_dim=64)
    with pytest.raises(KeyError, match="pos_encoding"):
        create_encoder("mae_vit_tiny_patch16", pos_encodings="rope")
