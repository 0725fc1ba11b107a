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


# ----------------------------------------------------------------------------- attention in fp32 under bf16
class _RecordAttention(torch.overrides.TorchFunctionMode):
    """Records the dtype of q, k, v at every ``scaled_dot_product_attention`` that reaches the kernel."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.dtypes.append((tuple(a.dtype for a in args[:3]), torch.is_autocast_enabled("cpu")))
        return func(*args, **kwargs)


def test_fp32_attention_rule():
    from maevit.train.fp32_attention import fp32_attention_wanted as wanted

    assert wanted("cpu", "bf16", ["avx512_bf16"]) and wanted("cpu", "bf16", [])
    assert not wanted("cpu", "bf16", ["avx512_bf16", "amx_bf16"])  # AMX: bf16 attention kept
    assert not wanted("cpu", "fp32", ["avx512_bf16"]) and not wanted("cuda", "bf16", [])


@pytest.mark.parametrize("name,kw", [
    ("mae_vit_tiny_patch16", TINY),
    ("mae_swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(1, 1),
                                              num_heads=(1, 2), decoder_embed_dim=32, decoder_depth=1,
                                              decoder_num_heads=2)),
])
def test_a_bf16_run_on_a_cpu_without_amx_computes_attention_in_fp32(monkeypatch, name, kw):
    """Through the run's Accelerator: every attention of the prepared model's forward (and of
    ``accelerator.autocast()``) reaches the kernel in fp32 with autocast off; the loss stays within bf16's
    tolerance of fp32 and gradients reach every parameter; an fp32 run is untouched."""
    from maevit.train import precision

    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    torch.manual_seed(0)
    model = create_mae(name, **kw)
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, model.num_patches)
    with torch.no_grad():
        loss32 = model(imgs, noise=noise).loss.item()
    acc = precision.make_accelerator("bf16")
    assert acc.fp32_attention
    prepared = acc.prepare(model)
    rec = _RecordAttention()
    with rec:
        loss = prepared(imgs, noise=noise).loss
    loss.backward()
    assert rec.dtypes and all(d == ((torch.float32,) * 3, False) for d in rec.dtypes), rec.dtypes
    assert loss.item() == pytest.approx(loss32, rel=2e-2)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    rec = _RecordAttention()
    with rec, acc.autocast(), torch.no_grad():
        acc.unwrap_model(prepared)(imgs, noise=noise)
    assert rec.dtypes and all(d == ((torch.float32,) * 3, False) for d in rec.dtypes)
    assert acc.prepare_model(prepared) is prepared and prepared.forward.in_fp32_attention  # wrapped once

    acc32 = precision.make_accelerator("fp32")
    assert not acc32.fp32_attention
    torch.manual_seed(0)
    plain = acc32.prepare(create_mae(name, **kw))
    rec = _RecordAttention()
    with rec, torch.no_grad():
        assert plain(imgs, noise=noise).loss.item() == pytest.approx(loss32, rel=1e-6)
    assert all(d == ((torch.float32,) * 3, False) for d in rec.dtypes)


def test_with_amx_the_bf16_run_keeps_bf16_attention(monkeypatch):
    from maevit.train import precision

    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ["avx512_bf16", "amx_bf16"])
    model, imgs, noise = _pair()
    acc = precision.make_accelerator("bf16")
    assert not acc.fp32_attention
    rec = _RecordAttention()
    with rec, torch.no_grad():
        acc.prepare(model)(imgs, noise=noise)
    assert rec.dtypes and all(d[0] == (torch.bfloat16,) * 3 for d in rec.dtypes)


class _RecordConv(torch.overrides.TorchFunctionMode):
    """Records (groups, stride, input dtype, autocast on) at every ``conv2d`` that reaches the kernel."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.conv2d:
            call = dict(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args), **kwargs)
            stride = call.get("stride", 1)
            self.calls.append((call.get("groups", 1), max(stride) if isinstance(stride, (tuple, list)) else stride,
                               call["input"].dtype, torch.is_autocast_enabled("cpu")))
        return func(*args, **kwargs)


def test_a_bf16_cvt_step_without_amx_runs_its_strided_depthwise_convolutions_in_fp32(monkeypatch):
    """CvT's depthwise key / value projections (stride 2) are 3-13x slower in bf16 than fp32 on such a CPU:
    through the run's Accelerator they reach the kernel in fp32 with autocast off, while its stride-1
    depthwise query projections and dense embeddings stay bf16; the loss stays within bf16's tolerance."""
    from maevit.train import precision

    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    kw = dict(img_size=32, patch_strides=(2, 2, 1), patch_sizes=(3, 3, 3), patch_paddings=(1, 1, 1),
              decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    torch.manual_seed(0)
    model = create_mae("mae_cvt_tiny", **kw)
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, model.num_patches)
    with torch.no_grad():
        loss32 = model(imgs, noise=noise).loss.item()
    prepared = precision.make_accelerator("bf16").prepare(model)
    rec = _RecordConv()
    with rec:
        loss = prepared(imgs, noise=noise).loss
    loss.backward()
    strided_grouped = [c for c in rec.calls if c[0] > 1 and c[1] > 1]
    others = [c for c in rec.calls if not (c[0] > 1 and c[1] > 1)]
    assert strided_grouped and all(c[2:] == (torch.float32, False) for c in strided_grouped), rec.calls
    assert others and all(c[3] for c in others), rec.calls  # left to autocast (bf16)
    assert loss.item() == pytest.approx(loss32, rel=2e-2)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
