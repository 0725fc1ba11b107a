"""Masked normalization: equal to the dense norms with nothing masked; blind to masked positions."""
import copy

import pytest
import torch
from torch import nn

from maevit.layers import MaskedBatchNorm2d, MaskedGroupNorm


@pytest.mark.parametrize("cls,make", [(MaskedBatchNorm2d, lambda: nn.BatchNorm2d(6)),
                                      (MaskedGroupNorm, lambda: nn.GroupNorm(3, 6))])
@pytest.mark.parametrize("training", [True, False])
def test_all_visible_equals_the_dense_norm(cls, make, training):
    dense = make()
    with torch.no_grad():
        dense.weight.uniform_(0.5, 1.5), dense.bias.uniform_(-0.5, 0.5)
        if isinstance(dense, nn.BatchNorm2d):
            dense.running_mean.uniform_(-1, 1), dense.running_var.uniform_(0.5, 2)
    masked = cls(*((6,) if cls is MaskedBatchNorm2d else (3, 6)))
    masked.load_state_dict(dense.state_dict())
    dense.train(training), masked.train(training)
    x = torch.randn(4, 6, 5, 7) * 3 + 1
    ones = torch.ones(4, 1, 5, 7)
    torch.testing.assert_close(masked(x, ones), dense(x), atol=1e-5, rtol=1e-5)
    for k, v in dense.state_dict().items():  # running statistics updated identically
        torch.testing.assert_close(masked.state_dict()[k], v)


@pytest.mark.parametrize("norm", [MaskedBatchNorm2d(4), MaskedGroupNorm(2, 4)])
def test_statistics_ignore_masked_positions(norm):
    norm.train()
    x = torch.randn(2, 4, 6, 6)
    visible = (torch.rand(2, 1, 6, 6) > 0.5).float()
    state = copy.deepcopy(norm.state_dict())
    out = norm(x, visible)
    norm.load_state_dict(state)
    out2 = norm(torch.where(visible.bool(), x, torch.randn_like(x) * 1e3), visible)
    assert torch.equal(out, out2)
    assert torch.equal(out * (1 - visible), torch.zeros_like(out))


def test_conv_visible_marks_outputs_whose_window_holds_a_visible_input():
    from maevit.layers import conv_visible, masked_conv

    visible = (torch.rand(2, 1, 8, 8) > 0.6).float()
    out = conv_visible(visible, 3, 2, 1)  # [2, 1, 4, 4]
    padded = torch.nn.functional.pad(visible, (1, 1, 1, 1))
    for i in range(4):
        for j in range(4):
            assert out[:, 0, i, j].tolist() == padded[:, 0, 2 * i:2 * i + 3, 2 * j:2 * j + 3].amax((1, 2)).tolist()
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    noisy = torch.where(visible.bool(), x, torch.randn_like(x) * 1e3)
    assert torch.equal(masked_conv(conv, x, visible), masked_conv(conv, noisy, visible))
