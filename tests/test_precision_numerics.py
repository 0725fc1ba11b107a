"""The fast paths compute the same training step as fp32 eager, within stated tolerances, on any CPU:
bf16 autocast (emulated where the CPU has no bf16 units: slow there, still correct) and the regional
``torch.compile`` of ``run.compile=true``."""
import pytest
import torch

from maevit.models import create_mae
from maevit.train.perf import compile_blocks

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2)


def _step(model, imgs, noise, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(imgs, noise=noise).loss
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach().float(), grads


def _pair():
    torch.manual_seed(0)
    model = create_mae("mae_vit_tiny_patch16", **TINY)
    imgs = torch.randn(4, 3, 32, 32)
    noise = torch.rand(4, model.num_patches)
    return model, imgs, noise


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_bf16_autocast_step_matches_fp32():
    model, imgs, noise = _pair()
    loss32, grads32 = _step(model, imgs, noise)
    loss16, grads16 = _step(model, imgs, noise, autocast=True)
    # bf16 keeps 8 bits of mantissa: the loss within 2%, every gradient pointing the same way
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    assert grads16.keys() == grads32.keys()
    worst = min(_cosine(grads16[k], grads32[k]) for k in grads32 if grads32[k].abs().max() > 0)
    assert worst > 0.98, worst


@pytest.mark.slow
def test_compiled_blocks_step_matches_eager():
    model, imgs, noise = _pair()
    loss, grads = _step(model, imgs, noise)
    assert compile_blocks(model) == 2 + 1
    loss_c, grads_c = _step(model, imgs, noise)
    assert loss_c.item() == pytest.approx(loss.item(), rel=1e-5)
    for k in grads:  # fusion reorders float sums: fp32 rounding, no more
        torch.testing.assert_close(grads_c[k], grads[k], rtol=1e-4, atol=1e-6)
