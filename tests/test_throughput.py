"""FLOPs, peaks, MFU columns, precision=auto and the throughput benchmark's smoke run (all on CPU, fp32)."""
import importlib.util
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from maevit import create_mae
from maevit.train import perf, precision, runs
from maevit.train.perf import ThroughputMeter, compile_blocks, count_train_flops, gpu_peak_tflops
from maevit.train.precision import PrecisionChoice, choose_precision, cpu_bf16_flags, resolve_precision

REPO = Path(__file__).resolve().parents[1]


def _analytic_mae_flops(img=224, p=16, d=768, depth=12, dd=512, ddepth=8, ratio=0.75, c=3) -> int:
    """Forward + backward FLOPs per image of a plain-ViT MAE, counted by hand (2 per MAC).

    Linear layers cost 12 d^2 MACs per token per block (qkv 3, proj 1, MLP 8), attention
    2 n^2 d (scores and weighted sum). Backward is twice the forward, except that the patch
    embedding computes no gradient for the input image (weight gradient only)."""
    n = (img // p) ** 2
    k = int(n * (1 - ratio))
    patch = n * (c * p * p) * d
    encoder = depth * ((1 + k) * 12 * d * d + 2 * (1 + k) ** 2 * d)
    decoder = (1 + k) * d * dd + ddepth * ((1 + n) * 12 * dd * dd + 2 * (1 + n) ** 2 * dd) + n * dd * (c * p * p)
    forward_macs = patch + encoder + decoder
    return 2 * (3 * forward_macs - patch)


def test_flops_of_vit_base_mae_match_the_analytic_count():
    with torch.device("meta"):  # no memory, no init time: only shapes matter
        model = create_mae("mae_vit_base_patch16")
    rng = torch.random.get_rng_state()
    count = count_train_flops(model, (3, 224, 224))
    expected = _analytic_mae_flops()
    assert count.counted_on == "meta"
    assert count.total == pytest.approx(expected, rel=0.02)
    assert 57e9 < count.total < 60e9  # the published ~9.7 GMAC forward, x 2 x 3
    assert count.forward == pytest.approx(count.total / 3, rel=0.02)
    # the model, its gradients and the global RNG are untouched
    assert torch.equal(rng, torch.random.get_rng_state())
    assert all(p.grad is None for p in model.parameters())
    # the mask ratio matters: half the patches visible costs more
    half = count_train_flops(model, (3, 224, 224), mask_ratio=0.5).total
    assert half == pytest.approx(_analytic_mae_flops(ratio=0.5), rel=0.02)


class _NoMeta(torch.nn.Module):
    """An MAE whose forward reads a value (like data-dependent code): it cannot run on meta."""

    def __init__(self, mae):
        super().__init__()
        self.mae = mae

    def forward(self, imgs, mask_ratio=None):
        assert imgs.abs().sum().item() >= 0  # .item() fails on the meta device
        return self.mae(imgs, mask_ratio=mask_ratio)


def test_flops_fall_back_to_one_real_step_and_count_cpu_attention():
    mae = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=2, decoder_depth=1)
    meta = count_train_flops(mae, (3, 32, 32))
    rng = torch.random.get_rng_state()
    real = count_train_flops(_NoMeta(mae), (3, 32, 32))
    assert real.counted_on == "cpu" and meta.counted_on == "meta"
    assert real.forward == meta.forward  # CPU's fused attention kernels are counted too
    # (their backward formula adds the attention recomputation of a flash kernel: a fraction of a percent here)
    assert real.total == pytest.approx(meta.total, rel=0.01)
    assert torch.equal(rng, torch.random.get_rng_state())
    assert all(p.grad is None for p in mae.parameters())


def test_gpu_peak_table():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4)
    assert gpu_peak_tflops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.0)
    assert gpu_peak_tflops("NVIDIA H200", "fp16") == pytest.approx(989.4)
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32", tf32=True) == 156.0
    assert gpu_peak_tflops("NVIDIA L4", "bf16") == 121.0
    assert gpu_peak_tflops("NVIDIA GeForce RTX 4090", "bf16") == pytest.approx(165.2)
    assert gpu_peak_tflops("Tesla V100-SXM2-16GB", "bf16") is None


def test_matmul_rate_is_flops_over_the_best_time(monkeypatch):
    """The rate is 2 n^3 FLOPs over the fastest call: with a clock that advances 1 ms per reading, every
    call takes exactly 1 ms, whatever the machine."""
    clock = iter(i * 1e-3 for i in range(10**6))
    monkeypatch.setattr(perf.time, "perf_counter", lambda: next(clock))
    rates = perf.matmul_tflops(("fp32", "bf16"), n=64, budget_s=0.02)
    assert rates == {"fp32": pytest.approx(2 * 64**3 / 1e-3 / 1e12), "bf16": pytest.approx(2 * 64**3 / 1e-3 / 1e12)}


def test_cpu_matmul_peak_is_measured_and_cached():
    first = perf.cpu_matmul_tflops(("fp32",), n=256, budget_s=0.05)["fp32"]
    assert 1e-4 < first < 100  # TFLOP/s: any CPU
    assert perf.cpu_matmul_tflops(("fp32",), n=256, budget_s=0.05)["fp32"] == first  # cached
    peak, source = perf.peak_tflops("cpu", "fp32")
    assert peak > 0 and "measured" in source


def test_meter_fields():
    meter = ThroughputMeter(flops_per_image=2e9, peak=0.1, num_processes=2)
    row = meter.fields(images_per_sec=100.0)  # 2e11 FLOP/s over 2 devices -> 0.1 TFLOP/s each
    assert row["tflops"] == pytest.approx(0.1) and row["mfu"] == pytest.approx(1.0)
    assert 0.0 <= row["data_wait"] <= 1.0
    assert ThroughputMeter(1e9, None).fields(10.0)["mfu"] is None

    def slow():
        for i in range(3):
            t = __import__("time").perf_counter()
            while __import__("time").perf_counter() - t < 0.02:
                pass
            yield i

    meter = ThroughputMeter(1e9, 1.0)
    assert list(meter.timed(slow())) == [0, 1, 2]
    assert meter.fields(1.0)["data_wait"] > 0.5  # nearly all of the time was spent in next()


def test_meter_hints_at_a_slow_loader_once(caplog):
    import time

    def slow(n):
        for i in range(n):
            time.sleep(0.01)
            yield i

    meter = ThroughputMeter(1e9, 1.0)
    with caplog.at_level("WARNING"):
        for _ in range(3):
            list(meter.timed(slow(2)))
            meter.fields(1.0)
    assert caplog.text.count("waited for data") == 1 and "data.num_workers" in caplog.text


def test_precision_choice_is_a_pure_function_of_the_facts():
    gpu = choose_precision("cuda", bf16_supported=True, device_name="NVIDIA H100 80GB HBM3")
    assert gpu.precision == "bf16" and "H100" in gpu.reason
    assert choose_precision("cuda", bf16_supported=False, device_name="Tesla V100").precision == "fp32"
    # CPU: x86 bf16 units (AMX matrix units, avx512_bf16 vector units) decide; no timing is involved
    no_units = choose_precision("cpu", bf16_supported=False, bf16_native=[])
    assert no_units.precision == "fp32" and "no native bf16" in no_units.reason
    vector_only = choose_precision("cpu", bf16_supported=True, bf16_native=["avx512_bf16"])
    assert vector_only.precision == "bf16" and "avx512_bf16" in vector_only.reason
    arm = choose_precision("cpu", bf16_supported=True, bf16_native=["bf16"])
    assert arm.precision == "fp32" and "not measured" in arm.reason
    amx = choose_precision("cpu", bf16_supported=True, bf16_native=["avx512_bf16", "amx_bf16"])
    assert amx.precision == "bf16" and "amx_bf16" in amx.reason
    assert choose_precision("mps", bf16_supported=True).precision == "fp32"


def test_cpu_bf16_flags_from_cpuinfo(monkeypatch):
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    assert cpu_bf16_flags("flags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 amx_tile\n") == ["avx512_bf16"]
    assert cpu_bf16_flags("flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile avx512_bf16\n") == ["avx512_bf16", "amx_bf16"]
    assert cpu_bf16_flags("flags\t\t: fpu avx2 avx512f avx512bw\n") == []
    monkeypatch.setattr(precision.platform, "machine", lambda: "aarch64")
    assert cpu_bf16_flags("Features\t: fp asimd sve bf16 i8mm\n") == ["bf16"]


def test_auto_precision_is_fp32_where_bf16_is_not_native(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])
    choice = resolve_precision("auto", tmp_path, device="cpu")
    assert choice.precision == "fp32" and "no native bf16" in choice.reason
    # the same machine always gives the same answer (no timing: identical runs train identical models)
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ["avx512_bf16", "amx_bf16"])
    assert {resolve_precision("auto", tmp_path, device="cpu").precision for _ in range(3)} == {"bf16"}
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ["bf16"])
    assert {resolve_precision("auto", tmp_path, device="cpu").precision for _ in range(3)} == {"fp32"}
    # explicit choices pass through untouched
    for p in ("fp32", "bf16", "fp16"):
        assert resolve_precision(p, device="cpu") == PrecisionChoice(p, "set by run.precision")
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16"):
        resolve_precision("fp8")


def test_auto_precision_sticks_to_the_resumed_runs_choice(monkeypatch, tmp_path):
    ckpt = tmp_path / "checkpoints" / "step-00000004"
    ckpt.mkdir(parents=True)
    (ckpt / runs.STATE_FILE).write_text('{"step": 4, "precision": "bf16"}')
    (tmp_path / "checkpoints" / runs.LATEST_FILE).write_text("step-00000004\n")
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])
    assert runs.RunDir(tmp_path).latest_checkpoint() == ckpt
    choice = resolve_precision("auto", tmp_path, device="cpu")
    assert choice.precision == "bf16" and "resumed" in choice.reason
    assert resolve_precision("auto", tmp_path, fresh=True, device="cpu").precision == "fp32"


def test_compile_blocks_is_regional_and_keeps_names():
    mae = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=3, decoder_depth=1)
    names = [k for k, _ in mae.named_parameters()]
    assert compile_blocks(mae) == 3 + 1  # encoder and decoder blocks (a one-block decoder too); nothing runs yet
    assert [k for k, _ in mae.named_parameters()] == names
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in mae.encoder.blocks)
    assert getattr(mae, "_compiled_call_impl", None) is None  # not the whole model

    class Stage(torch.nn.Module):  # a hierarchical family: stages of blocks -> the blocks are compiled
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])

    stages = torch.nn.ModuleList([Stage(), Stage(), Stage()])
    assert compile_blocks(stages) == 6
    assert all(getattr(s, "_compiled_call_impl", None) is None for s in stages)


TINY_RUN = ["model.name=mae_vit_tiny_patch16", "model.img_size=32", "model.patch_size=8", "model.embed_dim=32",
            "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=32", "model.decoder_depth=1",
            "model.decoder_num_heads=2", "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=16",
            "optim.epochs=1", "run.progress=false", "run.viz_every=0", "run.precision=fp32"]


def test_pretrain_logs_flops_and_writes_tflops_mfu_columns(tmp_path, caplog):
    from maevit.config import load_config
    from maevit.train.pretrain import PretrainConfig, train

    tiny = ["model.name=mae_vit_tiny_patch16", "model.img_size=32", "model.patch_size=8", "model.embed_dim=32",
            "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=32", "model.decoder_depth=1",
            "model.decoder_num_heads=2", "data.train=bundled:train", "data.batch_size=8", "data.num_workers=0",
            "data.shuffle_buffer=16", "optim.epochs=1", "optim.max_steps=4", "run.progress=false",
            "run.viz_every=0", "run.log_every=2", "run.ckpt_every=4", "run.precision=fp32", f"run.dir={tmp_path}"]
    with caplog.at_level("INFO"):
        train(load_config(PretrainConfig, None, tiny))
    log = caplog.text
    assert "GFLOP per image forward + backward" in log and "parameters" in log and "MFU against" in log
    rows = runs.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["tflops"] > 0 and 0 < r["mfu"] < 1.0  # a tiny model is far from the CPU's matmul peak
        assert 0.0 <= r["data_wait"] <= 1.0
        # tflops is images/s x FLOPs per image (one process)
        assert r["tflops"] == pytest.approx(r["images_per_sec"] * rows[0]["tflops"] / rows[0]["images_per_sec"],
                                            rel=0.02)
    state = (tmp_path / "checkpoints" / "step-00000004" / runs.STATE_FILE).read_text()
    assert '"precision": "fp32"' in state


# ----------------------------------------------------------------------------- the benchmark
# A stand-in for the published models_mae.py: the same imports and constructor, which the
# benchmark's import shims must handle (timm's Block without qk_scale; util.pos_embed), and
# the published parameter names; the forward is a simple one (no masking).
_FAKE_MODELS_MAE = '''
import torch
import torch.nn as nn
from timm.models.vision_transformer import PatchEmbed, Block
from util.pos_embed import get_2d_sincos_pos_embed


class MaskedAutoencoderViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.,
                 norm_layer=nn.LayerNorm, norm_pix_loss=False):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        table = get_2d_sincos_pos_embed(embed_dim, int(n ** .5), cls_token=True)
        self.pos_embed = nn.Parameter(torch.from_numpy(table).float()[None], requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, qk_scale=None,
                                           norm_layer=norm_layer) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True,
                                                   qk_scale=None, norm_layer=norm_layer) for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)

    def forward(self, imgs, mask_ratio=0.75):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)
        for b in self.blocks:
            x = b(x)
        x = self.decoder_embed(self.norm(x)) + self.decoder_pos_embed
        for b in self.decoder_blocks:
            x = b(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        return (pred ** 2).mean(), pred, None
'''


def _benchmark():
    spec = importlib.util.spec_from_file_location("gpu_throughput", REPO / "benchmarks" / "gpu_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_benchmark_tiny_cpu_mode(tmp_path):
    import sys

    import timm.models.vision_transformer as vit_mod

    (tmp_path / "mae").mkdir()
    (tmp_path / "mae" / "models_mae.py").write_text(textwrap.dedent(_FAKE_MODELS_MAE))
    block = vit_mod.Block
    bench = _benchmark()
    res = bench.main(["--tiny", "--mae-code", str(tmp_path / "mae"), "--json", str(tmp_path / "out.json")])
    assert vit_mod.Block is block and "util.pos_embed" not in sys.modules  # the import shims are undone
    tiny = res["models"]["tiny"]
    assert set(tiny["runners"]) == {"maevit", "hf_vitmae", "published_mae"}
    for row in tiny["runners"].values():
        assert row["images_per_sec"] > 0 and row["tflops"] > 0 and 0 < row["mfu"] < 1
        assert len(row["rounds"]) == 2
    assert tiny["gflop_per_image"] > 0
    losses = tiny["loss_before_training"]
    assert losses["maevit"] == pytest.approx(losses["hf_vitmae"], rel=1e-4)  # same weights, same mask
    assert (tmp_path / "out.json").is_file()
    # maevit -> published names -> maevit is the identity
    from maevit.models.weights import split_mae

    sd = create_mae("mae_vit_tiny_patch16", **bench.TINY).state_dict()
    enc, dec = split_mae(bench.to_published_keys(sd))
    back = {**{f"encoder.{k}": v for k, v in enc.items()}, **{f"decoder.{k}": v for k, v in dec.items()}}
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


# ----------------------------------------------------------------------------- data.decode=device
def _mixed_images(folder: Path, n: int = 12) -> Path:
    """Random-noise JPEGs of varied sizes, plus two PNGs (decoded by the workers in either mode)."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img.save(folder / f"{i:03d}.{'png' if i % 6 == 5 else 'jpg'}", quality=90)
    return folder


@pytest.mark.parametrize("num_workers", [0, 1])
def test_device_decode_reproduces_the_worker_path(tmp_path, num_workers):
    from maevit.data.device_decode import DeferredBatch
    from maevit.data.stream import pretrain_loader

    src = str(_mixed_images(tmp_path / "imgs"))
    kw = dict(img_size=24, batch_size=4, num_workers=num_workers, seed=5, shuffle_buffer=4)
    cpu = list(pretrain_loader(src, draft=False, **kw))  # draft mode is a CPU-only shortcut
    dev = list(pretrain_loader(src, decode="device", **kw))
    assert len(cpu) == len(dev) == 3
    assert all(isinstance(b, DeferredBatch) and len(b) == 4 for b in dev)
    assert sum(len(b.jpeg_index) for b in dev) == 10 and sum(len(b.decoded_index) for b in dev) == 2
    for a, b in zip(cpu, dev):
        assert torch.equal(a, b.to("cpu"))  # same crops, flips, decoder and resize kernel: identical


def test_device_decode_falls_back_to_the_cpu_and_replaces_corrupt_jpegs(monkeypatch, caplog):
    import io

    import torchvision.io
    from PIL import Image

    from maevit.data.device_decode import DeferredBatch, DeferredCrop

    def jpeg(colour) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), colour).save(buf, format="JPEG", quality=95)
        return buf.getvalue()

    refused, corrupt = jpeg((200, 100, 50)), jpeg((10, 20, 30))
    corrupt = corrupt[:200] + bytes(len(corrupt) - 200)  # a readable header, garbage after it
    real = torchvision.io.decode_jpeg

    def device_decoder(data, **kw):  # like nvJPEG refusing some files: any list fails, one image fails
        if isinstance(data, list) or bytes(data.numpy()) == refused:
            raise RuntimeError("unsupported")
        return real(data, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", device_decoder)
    items = [DeferredCrop(torch.frombuffer(bytearray(b), dtype=torch.uint8), (0, 0, 16, 16), False)
             for b in (refused, corrupt, jpeg((0, 255, 0)))]
    with caplog.at_level("WARNING"):
        out = DeferredBatch(items, (8, 8), (0, 0, 0), (1 / 255, 1 / 255, 1 / 255)).to("cpu")  # raw 0..255 values
    assert out.shape == (3, 3, 8, 8)
    assert out[0].mean((1, 2)).tolist() == pytest.approx([200, 100, 50], abs=3)  # decoded on the CPU instead
    assert torch.equal(out[1], out[0])  # corrupt: a copy of a good image of the batch
    assert out[2].mean((1, 2)).tolist() == pytest.approx([0, 255, 0], abs=3)
    assert "could not be decoded" in caplog.text


def test_pretrain_with_device_decode(tmp_path):
    from maevit.config import load_config
    from maevit.train.pretrain import PretrainConfig, train

    src = _mixed_images(tmp_path / "imgs", n=16)
    cfg = load_config(PretrainConfig, None, [*TINY_RUN, f"data.train={src}", "data.decode=device", "optim.max_steps=2",
                                             "run.log_every=1", "run.viz_every=2", "run.viz_images=2",
                                             f"run.dir={tmp_path / 'run'}"])
    result = train(cfg)
    assert result["step"] == 2 and math.isfinite(result["loss"])
    assert (tmp_path / "run" / "images" / "recon-00000002.png").is_file()  # the grid's batch decodes too


def test_finetune_and_probe_accept_auto(monkeypatch, tmp_path):
    from maevit.config import load_config
    from maevit.train.precision import resolve_run_precision
    from maevit.train.finetune import FinetuneConfig
    from maevit.train.probe import ProbeConfig

    assert load_config(FinetuneConfig, None, []).run.precision == "auto"
    probe_cfg = load_config(ProbeConfig, None, ["run.precision=auto", f"run.dir={tmp_path}"])
    assert probe_cfg.run.precision == "auto"
    if torch.cuda.is_available():
        pytest.skip("Accelerate would pick the GPU")
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])  # a CPU without bf16 units
    assert resolve_run_precision(probe_cfg.run) == "fp32"


def test_the_environment_can_keep_auto_at_fp32(monkeypatch):
    monkeypatch.setenv("MAEVIT_CPU_BF16", "0")
    assert cpu_bf16_flags() == []  # what the test suite sets: numbers never depend on a timing check


def test_the_log_says_the_measured_bf16_ratio_and_warns_of_emulated_bf16(monkeypatch, tmp_path, caplog):
    from types import SimpleNamespace

    from maevit.train import perf

    monkeypatch.setattr(perf, "cpu_matmul_tflops", lambda dtypes, **kw: {"fp32": 0.2, "bf16": 0.002})
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])
    run = SimpleNamespace(precision="auto", dir=tmp_path, fresh=True)
    with caplog.at_level("INFO", logger="maevit.throughput"):
        assert precision.resolve_run_precision(run) == "fp32"
    assert "precision auto -> fp32" in caplog.text and "0.01x" in caplog.text  # advice, not the decision
    caplog.clear()
    run.precision = "bf16"  # asked for explicitly: kept, with a warning that says why it will be slow
    with caplog.at_level("INFO", logger="maevit.throughput"):
        assert precision.resolve_run_precision(run) == "bf16"
    assert "emulated" in caplog.text and "0.01x" in caplog.text
    caplog.clear()
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ["avx512_bf16", "amx_bf16"])
    with caplog.at_level("INFO", logger="maevit.throughput"):
        precision.resolve_run_precision(run)
    assert "emulated" not in caplog.text


def test_the_step_profile_sorts_a_steps_time_into_kinds_that_add_up():
    spec = importlib.util.spec_from_file_location("step_profile", REPO / "benchmarks" / "step_profile.py")
    prof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prof)
    assert [prof.kind_of(n) for n in ("aten::addmm", "aten::mm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                                      "aten::copy_", "aten::native_layer_norm_backward", "aten::_fused_adamw_",
                                      "aten::gelu", "aten::convolution_backward")] == [
        "matmul", "matmul", "attention", "copies", "norms", "optimizer", "rest", "matmul"]
    res = prof.main(["--img-size", "32", "--batch-size", "4", "--steps", "1", "--model-args", "patch_size=8",
                     "depth=1", "decoder_depth=1", "decoder_embed_dim=32", "decoder_num_heads=2"])
    for dtype in ("fp32", "bf16"):
        assert set(res[dtype]) == set(prof.KINDS) and res[dtype]["matmul"] > 0 and res[dtype]["optimizer"] > 0
    assert res["ratio"] > 0 and res["speedup"] > 0
    share = res["fp32"]["matmul"] / sum(res["fp32"].values())
    assert res["bound"] == pytest.approx(1 / (1 - share + share / res["ratio"]))
