"""How much memory one training step needs, estimated before the first step, and
the message when an allocation fails anyway.

The estimate is a dry run: the real model's forward on *meta* tensors (shapes
only, no memory, well under a second for ViT-B) through
``torch.func.functional_call``, counting the bytes autograd saves for the
backward pass. Weights, gradients and AdamW's two moments add 16 bytes per
trainable parameter (fp32 master weights, also under mixed precision). Peak
use is somewhat higher (temporaries, the allocator's caching, the data
loader's pinned batches), so it is a floor to compare with the device, not a
promise.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("maevit")

GiB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training step of one process holds.

    Attributes:
        weights / grads / optimizer: parameters, their gradients, AdamW's two moments.
        activations: tensors saved for the backward pass at this batch size.
        batch_size: the per-process batch the activations are for.
    """

    weights: int
    grads: int
    optimizer: int
    activations: int
    batch_size: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations

    def describe(self) -> str:
        return (f"~{_size(self.total)} per process: weights {_size(self.weights)} + gradients {_size(self.grads)} + "
                f"AdamW state {_size(self.optimizer)} + activations {_size(self.activations)} "
                f"(batch {self.batch_size})")


def _size(b: int) -> str:
    return f"{b / 2**20:.1f} MiB" if b < GiB else f"{b / GiB:.2f} GiB"


def saved_activation_bytes(model: nn.Module, inputs: tuple[Any, ...], *, dtype: torch.dtype | None = None,
                           **kwargs: Any) -> int:
    """Bytes autograd saves for backward in ``model(*inputs, **kwargs)``, run on meta tensors.

    Args:
        model: the real model (its parameters stay where they are; meta stand-ins replace them).
        inputs: meta tensors of the batch's shapes.
        dtype: floating dtype of the stand-ins (``torch.bfloat16`` approximates mixed precision).
    """
    def like(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(t, device="meta", dtype=dtype if dtype is not None and t.is_floating_point() else None)

    state = {k: like(p).requires_grad_(p.requires_grad) for k, p in model.named_parameters()}
    state.update({k: like(b) for k, b in model.named_buffers()})
    params = {id(p) for p in state.values()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in params and id(t._base) not in params:  # weights (and views of them, e.g. W.t()) are
            saved[id(t)] = t.numel() * t.element_size()  # counted once, as weights
        return t

    inputs = tuple(x.to(dtype) if dtype is not None and x.is_floating_point() else x for x in inputs)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.func.functional_call(model, state, inputs, kwargs)
    return sum(saved.values())


def estimate_step_memory(model: nn.Module, input_shape: tuple[int, ...], *, precision: str = "fp32",
                         **kwargs: Any) -> MemoryEstimate:
    """Estimate the memory of one AdamW training step of ``model`` on a batch of ``input_shape``.

    Args:
        model: the unwrapped model, in training mode.
        input_shape: ``(B, C, H, W)`` of one per-process batch.
        precision: ``fp32`` | ``bf16`` | ``fp16`` (mixed precision halves most activations).
        **kwargs: passed to the forward.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    dtype = None if precision == "fp32" else {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    act = saved_activation_bytes(model, (torch.empty(input_shape, device="meta"),), dtype=dtype, **kwargs)
    return MemoryEstimate(4 * (trainable + frozen), 4 * trainable, 8 * trainable, act, int(input_shape[0]))


def free_memory(device: torch.device) -> int | None:
    """Bytes free for this process on ``device`` (CPU: the host's available memory divided by the
    processes on this node), or None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                kb = int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1))
        except (OSError, AttributeError):
            return None
        return kb * 1024 // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return None


def fit_warning(est: MemoryEstimate, device: torch.device, free: int | None = None) -> str | None:
    """A warning when the estimate does not fit in the free memory of ``device`` (None when it fits)."""
    free = free_memory(device) if free is None else free
    if free is None or est.total <= free:
        return None
    half = max(1, est.batch_size // 2)
    return (f"one step needs an estimated {est.total / GiB:.1f} GiB but {device} has {free / GiB:.1f} GiB free: "
            f"expect an out-of-memory error. Lower data.batch_size (e.g. {half}) and raise optim.accum_steps "
            "(e.g. 2) to keep the effective batch, or use run.precision=bf16 on a GPU")


def is_out_of_memory(e: BaseException) -> bool:
    """A failed allocation: CUDA's ``OutOfMemoryError`` or the CPU allocator's ``RuntimeError``."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and bool(
        re.search(r"not enough memory|can't allocate memory|out of memory|DefaultCPUAllocator", msg))


def oom_message(batch_size: int | None, device: str = "") -> str:
    """What to do after an out-of-memory error."""
    b = "the batch size" if batch_size is None else f"data.batch_size (now {batch_size})"
    eg = "" if batch_size is None else f", e.g. data.batch_size={max(1, batch_size // 2)} optim.accum_steps=2,"
    return (f"out of memory{' on ' + device if device else ''}: one training step does not fit. Lower {b} and "
            f"raise optim.accum_steps to keep the effective batch{eg} or use run.precision=bf16 on a GPU; the "
            "estimate printed at start-up says what one step needs. Re-running the same command resumes from "
            "the last checkpoint.")


def log_memory_estimate(acc, model: torch.nn.Module, input_shape: tuple[int, ...], precision: str) -> None:
    """Log what one training step needs (a dry run on meta tensors), and warn when it cannot fit."""
    try:
        est = estimate_step_memory(model, input_shape, precision=precision)
    except Exception as e:  # an estimate must never stop a run (an op without a meta kernel, ...)
        logger.debug("no memory estimate: %s", e)
        return
    logger.info("memory: %s", est.describe())
    warning = fit_warning(est, acc.device)
    if warning:
        logger.warning("%s", warning)
