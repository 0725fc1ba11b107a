"""Throughput you can see: FLOPs per image, peak FLOP/s, MFU; and regional compilation.

- :func:`count_train_flops`: forward + backward FLOPs of one training step per
  image, counted by ``torch.utils.flop_counter.FlopCounterMode`` on whatever the
  model does (``model(imgs).loss``, then ``backward()``), so it needs nothing
  but the generic MAE interface and works for every encoder family. It runs on
  the meta device (no memory, no compute, the model untouched); a model that
  cannot run on meta is counted with one real image on its own device instead,
  on copies of its weights.
- :func:`peak_tflops`: dense peak of the device at a precision, from
  :data:`GPU_PEAK_TFLOPS` (datasheet figures) or, on CPU, from a short matmul
  measurement (:func:`cpu_matmul_tflops`; cached per process), labelled as such.
- :class:`ThroughputMeter`: turns images/s into achieved TFLOP/s per device
  and MFU (model FLOPs utilisation = achieved / peak), and measures the share
  of wall time the loop waits for data; these become the ``tflops``, ``mfu``
  and ``data_wait`` columns of ``metrics.jsonl`` and the tracker.
- :func:`compile_blocks`: regional ``torch.compile`` of the repeated blocks.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import nn

logger = logging.getLogger("maevit.throughput")


# ----------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one training step, per image.

    Attributes:
        forward: forward pass (mask, encode, decode, loss).
        total: forward + backward.
        counted_on: "meta", or the device type of the one-image fallback.
    """

    forward: int
    total: int
    counted_on: str

    @property
    def gflops(self) -> float:
        return self.total / 1e9


def _cpu_attention_flops() -> dict[Any, Any]:
    """FLOP formulas for CPU's fused attention kernels, which ``flop_counter`` does not list
    (on meta and CUDA, SDPA dispatches to kernels it does count)."""
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    out = {}
    for cpu_op, twin in (("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention"),
                         ("_scaled_dot_product_flash_attention_for_cpu_backward",
                          "_scaled_dot_product_flash_attention_backward")):
        if hasattr(aten, cpu_op) and getattr(aten, twin) in flop_registry:
            fn = flop_registry[getattr(aten, twin)]
            out[getattr(aten, cpu_op)] = getattr(fn, "__wrapped__", fn)  # FlopCounterMode wraps it again
    return out


def _scalar_loss(out: Any) -> torch.Tensor:
    """A scalar to backpropagate: an MAE's ``.loss``, else the mean of the logits (a tuple of them
    for a DeiT in distilled training: class and distillation heads)."""
    if hasattr(out, "loss"):
        return out.loss
    return sum(o.float().mean() for o in (out if isinstance(out, (tuple, list)) else (out,)))


def _count(model: nn.Module, tensors: dict[str, torch.Tensor], imgs: torch.Tensor,
           mask_ratio: float | None) -> tuple[int, int]:
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    kwargs = {} if mask_ratio is None else {"mask_ratio": mask_ratio}
    mapping = _cpu_attention_flops()
    with FlopCounterMode(display=False, custom_mapping=mapping) as fwd:
        out = functional_call(model, tensors, (imgs,), kwargs, strict=False)
        loss = _scalar_loss(out)
    with FlopCounterMode(display=False, custom_mapping=mapping) as bwd:
        loss.backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


def count_train_flops(
    model: nn.Module,
    img_shape: tuple[int, int, int],
    *,
    mask_ratio: float | None = None,
    batch_size: int = 2,
) -> FlopCount:
    """Forward + backward FLOPs per image of ``model(imgs).loss`` (an MAE training step), or of
    ``model(imgs)`` for a model that returns a tensor (a classifier; the loss itself is free).

    Counts matmuls, convolutions and attention (the ops ``torch.utils.flop_counter``
    knows: everything else is a rounding error for ViTs). The model, its gradients,
    buffers and the global RNG are left untouched. Count before ``torch.compile``.

    Args:
        model: anything whose ``forward(imgs, mask_ratio=...)`` returns an object with ``.loss``,
            or whose ``forward(imgs)`` returns a tensor (then ``mask_ratio`` must be None).
        img_shape: ``(C, H, W)`` of one image.
        mask_ratio: the ratio to count at; None: the model's default.
        batch_size: images in the counted batch (the result is per image; 2: BatchNorm in
            training mode needs more than one value per channel).

    Returns:
        :class:`FlopCount`.
    """
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    try:  # meta: shapes only
        tensors = {k: torch.empty_like(v, device="meta").requires_grad_(v.requires_grad) for k, v in params.items()}
        tensors.update({k: torch.empty_like(v, device="meta") for k, v in buffers.items()})
        imgs = torch.empty(batch_size, *img_shape, device="meta")
        with torch.random.fork_rng(devices=[]):
            f, b = _count(model, tensors, imgs, mask_ratio)
        where = "meta"
    except Exception as exn:  # e.g. data-dependent shapes: one real step on copies of the weights
        device = next(iter(params.values())).device
        logger.debug("FLOPs on meta failed (%s: %s); counting one real step on %s", type(exn).__name__, exn, device)
        tensors = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in params.items()}
        tensors.update({k: v.detach().clone() for k, v in buffers.items()})
        forked = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked):
            imgs = torch.randn(batch_size, *img_shape, device=device)
            f, b = _count(model, tensors, imgs, mask_ratio)
        where = device.type
    return FlopCount(forward=f // batch_size, total=(f + b) // batch_size, counted_on=where)


# ----------------------------------------------------------------------------- peaks
# Dense (non-sparse) tensor-core peaks in TFLOP/s from NVIDIA's datasheets / architecture
# whitepapers: A100 (SXM4 and PCIe), H100 SXM5 / PCIe / NVL, H200 SXM / NVL, L4, and the
# GeForce RTX 4090 (Ada whitepaper, FP32 accumulate). "tf32" applies to fp32 matmuls when
# torch allows TF32 (torch.set_float32_matmul_precision("high")), "fp32" otherwise;
# fp16 shares the bf16 figure on all of these. First matching key wins (most specific first).
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    "H200 NVL": {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM: the H100 SXM5 compute
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},  # SXM4 and PCIe, 40 and 80 GB
    "L4": {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "RTX 4090": {"bf16": 165.2, "tf32": 82.6, "fp32": 82.6},
}


def gpu_peak_tflops(device_name: str, precision: str, *, tf32: bool = False) -> float | None:
    """Dense peak TFLOP/s of a GPU named ``device_name`` (``torch.cuda.get_device_name()``)
    at ``precision`` (fp32 / bf16 / fp16); None for a GPU not in :data:`GPU_PEAK_TFLOPS`."""
    key = "bf16" if precision in ("bf16", "fp16") else ("tf32" if tf32 else "fp32")
    for name, peaks in GPU_PEAK_TFLOPS.items():
        if name.lower() in device_name.lower():
            return peaks[key]
    return None


def _best_rate(fns: dict[str, Any], flops: float, budget_s: float) -> dict[str, float]:
    """Best TFLOP/s of each callable, called in alternation until ``budget_s`` is spent
    (alternating: a burst of load from other processes hits both alike)."""
    best = dict.fromkeys(fns, math.inf)
    for fn in fns.values():  # warm-up: thread pool, packing buffers
        fn()
    end = time.perf_counter() + budget_s
    reps = 0
    while time.perf_counter() < end or reps < 2:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
        reps += 1
    return {name: flops / t / 1e12 for name, t in best.items()}


def matmul_tflops(dtypes: Iterable[str] = ("fp32",), *, n: int = 1024, budget_s: float = 0.3,
                  device: torch.device | str = "cpu") -> dict[str, float]:
    """Measured matmul rate (TFLOP/s) of an ``n x n`` product per dtype: the best of repeated
    calls, dtypes alternating, for about ``budget_s`` seconds (plus a warm-up call each)."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(n, n, generator=gen).to(device), torch.randn(n, n, generator=gen).to(device)
    fns = {}
    for name in dtypes:
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        a, b = a32.to(dt), b32.to(dt)
        if device.type == "cuda":
            fns[name] = lambda a=a, b=b: (torch.mm(a, b), torch.cuda.synchronize(device))
        else:
            fns[name] = lambda a=a, b=b: torch.mm(a, b)
    return _best_rate(fns, 2.0 * n**3, budget_s)


_CPU_RATES: dict[tuple[str, int, int], float] = {}  # (dtype, threads, n) -> TFLOP/s, per process


def cpu_matmul_tflops(dtypes: Iterable[str] = ("fp32",), *, n: int = 1024, budget_s: float = 0.3) -> dict[str, float]:
    """Measured CPU matmul rate (TFLOP/s) per dtype with the current torch thread count
    (:func:`matmul_tflops`), cached per process, so the bf16 check of ``precision=auto``
    and the MFU peak use the same measurement.

    This is the CPU's *measured* peak, the yardstick for MFU on CPU; it is not a datasheet
    figure, and on a machine shared with other jobs it is what this process got at start-up.
    """
    threads = torch.get_num_threads()
    missing = [d for d in dtypes if (d, threads, n) not in _CPU_RATES]
    if missing:
        for name, rate in matmul_tflops(missing, n=n, budget_s=budget_s).items():
            _CPU_RATES[(name, threads, n)] = rate
    return {d: _CPU_RATES[(d, threads, n)] for d in dtypes}


def peak_tflops(device: torch.device | str, precision: str) -> tuple[float | None, str]:
    """Peak TFLOP/s per device for MFU, and where the figure comes from.

    Returns:
        ``(tflops, source)``; ``tflops`` is None for a GPU missing from :data:`GPU_PEAK_TFLOPS`
        (then set ``run.peak_tflops``).
    """
    device = torch.device(device)
    precision = "fp32" if precision not in ("bf16", "fp16") else precision
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf32 = precision == "fp32" and torch.backends.cuda.matmul.allow_tf32
        peak = gpu_peak_tflops(name, precision, tf32=tf32)
        kind = "bf16/fp16" if precision != "fp32" else ("tf32" if tf32 else "fp32")
        if peak is None:
            return None, f"{name} is not in maevit's table of peaks: set run.peak_tflops for MFU"
        return peak, f"{name} dense {kind} peak (datasheet)"
    if device.type == "cpu":
        rate = cpu_matmul_tflops((precision,))[precision]
        return rate, f"measured {precision} matmul rate of this CPU, {torch.get_num_threads()} threads"
    return None, f"no peak known for device type {device.type!r}: set run.peak_tflops for MFU"


# ----------------------------------------------------------------------------- MFU meter
class ThroughputMeter:
    """Achieved TFLOP/s and MFU from images/s, and the share of time spent waiting for data.

    Args:
        flops_per_image: forward + backward FLOPs per image (:func:`count_train_flops`).
        peak: peak TFLOP/s of *one* device (None: MFU is not reported).
        num_processes: devices the images/s figure is spread over.

    Attributes:
        in_process_data: the batches are made in the training process (``data.num_workers=0``): then the
            "wait" is the time spent making them, and the hint says so instead of blaming a loader.
    """

    WAIT_WARNING = 0.1  # share of wall time waiting for data that is worth a hint (once per run)

    def __init__(self, flops_per_image: float, peak: float | None, num_processes: int = 1) -> None:
        self.flops_per_image, self.peak, self.num_processes = flops_per_image, peak, num_processes
        self._wait = 0.0
        self._t0 = time.perf_counter()
        self._windows, self._warned = 0, False
        self.in_process_data = False

    def timed(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Yield from ``batches``, adding the time spent inside ``next()`` to the data wait."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self._wait += time.perf_counter() - t0
            yield item

    def fields(self, images_per_sec: float) -> dict[str, float | None]:
        """``tflops`` (achieved per device), ``mfu`` (fraction of the peak) and ``data_wait``
        (fraction of the wall time since the last call spent waiting for the next batch)."""
        now = time.perf_counter()
        tflops = self.flops_per_image * images_per_sec / self.num_processes / 1e12 if self.flops_per_image else None
        wait = self._wait / max(now - self._t0, 1e-9)
        self._wait, self._t0 = 0.0, now
        self._windows += 1
        if self._windows >= 2 and wait > self.WAIT_WARNING and not self._warned:  # window 1: loader start-up
            self._warned = True
            if self.in_process_data:
                logger.info("making the batches in the training process (data.num_workers=0) took %.0f%% of the "
                            "time; where cores are spare, data.num_workers=1 or more makes them beside the steps "
                            "(on 2 cores, with small images, in-process data measured faster)", 100 * wait)
            else:
                logger.warning("the training loop waited for data %.0f%% of the time: the loader is the bottleneck. "
                               "Raise data.num_workers (about one per CPU core per device), write pre-resized "
                               "shards (maevit shards write --resize-shorter 320), or decode on the GPU "
                               "(data.decode=device)", 100 * wait)
        return {
            "tflops": _sig(tflops) if tflops is not None else None,
            "mfu": _sig(tflops / self.peak) if self.peak and tflops is not None else None,
            "data_wait": round(min(wait, 1.0), 4),
        }


def _sig(x: float, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant digits (a tiny model's TFLOP/s is not 0.0)."""
    return float(f"{x:.{digits}g}")


def meter_for(model: nn.Module, img_shape: tuple[int, int, int], device: torch.device | str, precision: str, *,
              num_processes: int = 1, peak: float | None = None, mask_ratio: float | None = None,
              log: bool = True) -> ThroughputMeter:
    """Count the model's FLOPs, find the device's peak, log both with the parameter count,
    and return a :class:`ThroughputMeter`. ``peak`` overrides the table / measurement."""
    try:
        flops = count_train_flops(model, img_shape, mask_ratio=mask_ratio)
    except Exception as exn:  # a model the counter cannot run: train anyway, without the FLOP columns
        logger.warning("could not count the model's FLOPs (%s: %s); tflops / mfu stay empty", type(exn).__name__, exn)
        flops = FlopCount(forward=0, total=0, counted_on="nothing")
    source = "run.peak_tflops"
    if peak is None:
        peak, source = peak_tflops(device, precision)
    if log:
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("model: %.2fM parameters (%.2fM trainable); %.2f GFLOP per image forward + backward "
                    "(forward %.2f, counted on %s)", n_params / 1e6, n_train / 1e6, flops.total / 1e9,
                    flops.forward / 1e9, flops.counted_on)
        logger.info("MFU against %s", f"{peak:.3g} TFLOP/s per device ({source})" if peak else f"nothing ({source})")
    return ThroughputMeter(flops.total, peak, num_processes)


# ----------------------------------------------------------------------------- compile
def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> int:
    """Regional compilation: ``torch.compile`` each repeated block in place.

    A "block" is a child of an ``nn.Sequential`` / ``nn.ModuleList`` whose class repeats:
    some such container holds two or more children, all of that class (the transformer
    blocks of a plain ViT's encoder; the blocks or stages of other families). Every child
    of that class in any such container is compiled, so a one-block decoder is too.
    Blocks of one shape share one compiled graph, so compiling is quick, and the masking /
    gather code around them stays eager. Parameter names do not change.

    Returns:
        How many modules were compiled.
    """
    containers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Sequential, nn.ModuleList))]
    repeated = set()
    for _, c in containers:
        kinds = {type(k) for k in c.children()}
        if len(c) >= 2 and len(kinds) == 1 and not issubclass(next(iter(kinds)), (nn.Sequential, nn.ModuleList)):
            repeated |= kinds
    found = {f"{name}.{child}" if name else child: k for name, c in containers
             for child, k in c.named_children() if type(k) in repeated}
    # the innermost repeated units: a stage made of repeated blocks is left to its blocks
    blocks = [k for name, k in found.items() if not any(o.startswith(name + ".") for o in found)]
    for k in blocks:
        k.compile(**compile_kwargs)
    return len(blocks)
