"""``run.precision``: the auto policy (bf16 where it is native and pays off), and the run's Accelerator.

- :func:`choose_precision`: ``run.precision=auto`` as a pure function of the
  facts (device type, bf16 support, native bf16 units);
- :func:`resolve_precision` gathers those facts, keeps a resumed run on the
  precision it started with, and agrees across processes;
- :func:`make_accelerator`: an ``Accelerator`` at the resolved precision.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maevit.train.fp32_attention import Fp32Attention, fp32_attention_wanted, in_fp32_attention

logger = logging.getLogger("maevit.throughput")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``run.precision`` resolved to, and why (for the log)."""

    precision: str
    reason: str

    def __str__(self) -> str:
        return f"{self.precision} ({self.reason})"


def choose_precision(
    device_type: str,
    *,
    bf16_supported: bool,
    bf16_native: list[str] | tuple[str, ...] = (),
    device_name: str = "",
) -> PrecisionChoice:
    """``run.precision=auto``: a pure function of the hardware, so identical runs make identical choices.

    bf16 autocast on CUDA GPUs with native bf16 and on x86 CPUs with bf16 units: ``amx_bf16`` (matrix
    units: a bf16 matmul ~6x an fp32 one) or ``avx512_bf16`` (a bf16 matmul 2.2-2.5x fp32 on a Zen 4,
    and the MAE step 1.7-1.9x once attention runs in fp32 there: :mod:`maevit.train.fp32_attention`,
    BENCHMARKS.md "bf16 on a CPU with avx512_bf16"); fp32 elsewhere, including Arm CPUs whose only
    bf16 support is the ``bf16`` flag (not measured). A timing check never decides: timings on a
    shared machine vary from run to run, and two runs of one command must train the same model.

    Args:
        device_type: "cuda", "cpu", ...
        bf16_supported: the device runs bf16 natively (CUDA: compute capability >= 8.0).
        bf16_native: CPU: the bf16 instruction-set flags found (e.g. ``["avx512_bf16", "amx_bf16"]``).
        device_name: for the message.
    """
    if device_type == "cuda":
        if bf16_supported:
            return PrecisionChoice("bf16", f"GPU {device_name} supports bf16".replace("GPU  ", "GPU "))
        return PrecisionChoice("fp32", f"GPU {device_name} has no native bf16 (compute capability < 8.0); "
                                       f"run.precision=fp16 gives mixed precision with loss scaling")
    if device_type == "cpu":
        if not bf16_native:
            return PrecisionChoice("fp32", "CPU has no native bf16 units (no avx512_bf16 / amx_bf16 / bf16 flag): "
                                           "bf16 would be emulated and slower")
        if "amx_bf16" in bf16_native:
            return PrecisionChoice("bf16", "CPU has bf16 matrix units (amx_bf16)")
        if "avx512_bf16" in bf16_native:
            return PrecisionChoice("bf16", "CPU has bf16 vector units (avx512_bf16); attention runs in fp32")
        return PrecisionChoice("fp32", f"CPU has {' and '.join(bf16_native)} only, where bf16 training was not "
                                       f"measured; run.precision=bf16 uses it anyway")
    return PrecisionChoice("fp32", f"auto chooses bf16 only on CUDA GPUs and CPUs with bf16 units, not on "
                                   f"{device_type}; set run.precision explicitly")


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The CPU's native bf16 instruction-set flags: x86 ``avx512_bf16`` / ``amx_bf16``,
    Arm ``bf16`` (read from ``/proc/cpuinfo``; empty where it cannot be read, or when the environment
    sets ``MAEVIT_CPU_BF16=0``: then ``run.precision=auto`` stays fp32 on this CPU, as the tests do)."""
    if cpuinfo is None:
        if os.environ.get("MAEVIT_CPU_BF16", "").strip() == "0":
            return []
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    wanted = ("avx512_bf16", "amx_bf16") if platform.machine().lower() in ("x86_64", "amd64", "i686") \
        else ("bf16", "avx512_bf16", "amx_bf16")
    return [f for f in wanted if f in flags]


def recorded_precision(run_dir: str | os.PathLike) -> str | None:
    """The precision saved in a run's latest checkpoint (``trainer_state.json``), if any."""
    from maevit.train import runs

    ckpt = runs.RunDir(run_dir).latest_checkpoint()
    if ckpt is None:
        return None
    try:
        value = json.loads((Path(ckpt) / runs.STATE_FILE).read_text()).get("precision")
    except (OSError, ValueError):
        return None
    return value if value in PRECISIONS[1:] else None


def _gather_choice(device: torch.device) -> PrecisionChoice:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch
            native = torch.cuda.is_bf16_supported()
        return choose_precision("cuda", bf16_supported=native, device_name=name)
    if device.type == "cpu":
        flags = cpu_bf16_flags()
        return choose_precision("cpu", bf16_supported=bool(flags), bf16_native=flags)
    return choose_precision(device.type, bf16_supported=False)


def _process_state():
    """The process state the Accelerator will share, created with the CPU flag it would read itself: a first
    ``PartialState()`` without it would fix a CPU launch (``ACCELERATE_USE_CPU=1``) as one process."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def resolve_precision(requested: str, run_dir: str | os.PathLike | None = None, *, fresh: bool = False,
                      device: torch.device | str | None = None) -> PrecisionChoice:
    """Resolve ``run.precision`` (``auto`` or explicit) for this process's device.

    ``auto`` is decided once per run: a resumed run keeps the precision its checkpoint
    records (so resume stays exact), and with several processes the main process decides
    and the others follow.

    Args:
        requested: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        run_dir: the run directory (for the recorded choice); ``fresh``: ignore it.
        device: default: the device Accelerate assigns to this process.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"run.precision={requested!r}: expected one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return PrecisionChoice(requested, "set by run.precision")
    state = _process_state()
    device = torch.device(device) if device is not None else state.device
    choice = None
    if state.is_main_process:
        old = recorded_precision(run_dir) if run_dir is not None and not fresh else None
        if old is not None:
            choice = PrecisionChoice(old, "recorded in the checkpoint being resumed")
        else:
            choice = _gather_choice(device)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [choice]
        broadcast_object_list(box, from_process=0)
        choice = box[0]
    return choice


def resolve_run_precision(run: Any) -> str:
    """``run.precision`` for this device: ``auto`` becomes bf16 or fp32 (logged with the reason; a resumed
    run keeps its recorded choice; rank 0 decides for all). See :func:`resolve_precision`."""
    choice = resolve_precision(run.precision, run.dir, fresh=run.fresh)
    on_cpu = _process_state().device.type == "cpu"
    if run.precision == "auto":
        logger.info("precision auto -> %s%s", choice, f"; {cpu_bf16_advice()}" if on_cpu else "")
    elif on_cpu and choice.precision == "bf16" and not cpu_bf16_flags():
        logger.warning(
            "run.precision=bf16 on a CPU without bf16 units (no avx512_bf16 / amx_bf16 / bf16 flag): every bf16 "
            "matmul is emulated, so this run will be many times slower than fp32 (%s). Use run.precision=auto or "
            "fp32 here; bf16 pays on CPUs with AMX-bf16 and on GPUs.", cpu_bf16_advice())
    return choice.precision


def cpu_bf16_advice(n: int = 256, budget_s: float = 0.1) -> str:
    """The measured bf16 / fp32 matmul speed of this CPU, as a phrase for the log (advice only: no choice
    depends on it, so two runs of one command never differ; small matrices: an emulated bf16 matmul can
    be hundreds of times slower than fp32)."""
    from maevit.train.perf import cpu_matmul_tflops

    rates = cpu_matmul_tflops(("fp32", "bf16"), n=n, budget_s=budget_s)
    return (f"bf16 / fp32 matmul measured on this CPU: {rates['bf16'] / rates['fp32']:.2f}x "
            f"({rates['bf16']:.3g} / {rates['fp32']:.3g} TFLOP/s, {n}^2, {torch.get_num_threads()} threads)")


def make_accelerator(precision: str, accum_steps: int = 1, run_dir: str | os.PathLike | None = None,
                     tracker: str = "auto"):
    """An ``Accelerator`` for one run: precision (resolved: fp32 / bf16 / fp16), accumulation, and
    ``tracker`` (``run.tracker``: :func:`maevit.train.trackers.resolve_tracker`) for a run with a ``run_dir``.

    Raises:
        maevit.config.ConfigError: the tracker is not installed (the message has the pip command).
    """
    from accelerate.state import AcceleratorState

    from maevit.train.trackers import resolve_tracker

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    earlier = AcceleratorState._shared_state.get("_mixed_precision")
    if earlier is not None and earlier != mixed:  # an earlier run in this process (maevit demo, a notebook)
        AcceleratorState._reset_state()  # the process group (PartialState) stays
    acc = _accelerator_class()(
        mixed_precision=mixed,
        gradient_accumulation_steps=accum_steps,
        log_with=resolve_tracker(tracker) if run_dir is not None else None,
        project_dir=None if run_dir is None else str(run_dir),
    )
    acc.fp32_attention = fp32_attention_wanted(acc.device.type, precision, cpu_bf16_flags())
    if acc.fp32_attention:
        logger.info("attention and strided grouped convolutions run in fp32 inside the bf16 step: this CPU has no "
                    "bf16 matrix units (amx_bf16), and their bf16 kernels are slower than the fp32 ones (BENCHMARKS.md)")
    return acc


@functools.cache
def _accelerator_class() -> type:
    """Accelerate's ``Accelerator`` with the attention of its autocast in fp32 where
    :func:`~maevit.train.fp32_attention.fp32_attention_wanted` says so: in the forward of every prepared
    model (where Accelerate puts its autocast) and in ``accelerator.autocast()``. Made on first use
    because Accelerate is imported lazily."""
    from accelerate import Accelerator

    class MaevitAccelerator(Accelerator):
        fp32_attention = False

        def prepare_model(self, model, device_placement=None, evaluation_mode=False):
            model = super().prepare_model(model, device_placement, evaluation_mode)
            if self.fp32_attention and not getattr(model.forward, "in_fp32_attention", False):
                model.forward = in_fp32_attention(model.forward)
            return model

        @contextlib.contextmanager
        def autocast(self, autocast_handler=None):
            with super().autocast(autocast_handler), (Fp32Attention() if self.fp32_attention
                                                      else contextlib.nullcontext()):
                yield

    return MaevitAccelerator
