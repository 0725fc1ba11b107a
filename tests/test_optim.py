import math

import pytest
import torch

from maevit.models import create_mae
from maevit.train.optim import build_adamw, cosine_lr, param_groups, scaled_lr, set_lr


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),  # warm-up starts at 0
        (5, 0.5),  # linear
        (10, 1.0),  # peak at the end of warm-up
        (60, 0.1 + 0.9 * 0.5),  # half-way through the cosine: mid-point of base and min
        (110, 0.1),  # end of schedule: min_lr
        (500, 0.1),  # and it stays there
    ],
)
def test_cosine_lr_values(step, expected):
    lr = cosine_lr(step, base_lr=1.0, warmup_steps=10, total_steps=110, min_lr=0.1)
    assert lr == pytest.approx(expected, abs=1e-12)


def test_cosine_lr_is_cosine_shaped_and_monotone_after_warmup():
    lrs = [cosine_lr(s, base_lr=2.0, warmup_steps=0, total_steps=100, min_lr=0.0) for s in range(101)]
    assert lrs[0] == 2.0
    assert lrs[25] == pytest.approx(1.0 + math.cos(math.pi * 0.25))
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_scaled_lr_linear_rule():
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert scaled_lr(1e-3, 256) == pytest.approx(1e-3)


def _tiny_mae():
    return create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                      decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def test_param_groups_exact_membership():
    model = _tiny_mae()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, weight_decay=0.05)
    by_wd = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert set(by_wd) == {0.0, 0.05}
    no_decay, decay = by_wd[0.0], by_wd[0.05]

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected_no_decay = {
        n for n in trainable
        if n.endswith(".bias") or ".norm" in n or n.startswith("decoder.norm") or n.startswith("encoder.norm")
        or n in ("encoder.cls_token", "decoder.mask_token")
    }
    assert no_decay == expected_no_decay
    assert decay == trainable - expected_no_decay
    # every decayed tensor is a matrix / conv kernel
    assert all(dict(model.named_parameters())[n].ndim >= 2 for n in decay)
    assert "encoder.patch_embed.proj.weight" in decay and "decoder.pred.weight" in decay
    # the fixed sin-cos tables (requires_grad False) are in no group at all
    assert "encoder.pos_embed" not in no_decay | decay and "decoder.pos_embed" not in no_decay | decay
    assert no_decay.isdisjoint(decay)


def test_build_adamw_mae_betas_and_set_lr():
    model = _tiny_mae()
    opt = build_adamw(model, lr=1e-3, weight_decay=0.05)
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    opt.param_groups[0]["lr_scale"] = 0.5
    set_lr(opt, 2e-3)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3) and opt.param_groups[1]["lr"] == pytest.approx(2e-3)


def test_fused_adamw_found_inf_skips_the_update():
    # the pretraining loop relies on this to drop non-finite steps without a host sync
    model = _tiny_mae()
    opt = build_adamw(model, lr=1e-2, weight_decay=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(2, 3, 32, 32)).loss.backward()
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert not torch.equal(before["decoder.pred.weight"], model.decoder.pred.weight)
