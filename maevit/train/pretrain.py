"""MAE pretraining: ``maevit pretrain RECIPE.yaml key=value ...``.

Accelerate owns devices, processes, precision and gradient accumulation, so the
same command runs on one CPU, ``accelerate launch`` on N GPUs, or ``torchrun``
over several nodes. The data stream is already split by rank (stream B), so it
is *not* passed to ``accelerator.prepare`` (which would re-shard it).

The loop never waits for the device inside a step: losses are summed on the
device and read every ``run.log_every`` steps; a step whose gradient is not
finite is skipped on the device by the fused AdamW kernel (``found_inf``) and
counted. Re-running the same command on a run directory resumes it exactly.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from maevit.config import ConfigError, load_config, to_dict
from maevit.data.stream import labeled_loader
from maevit.models import create_mae
from maevit.train import runs, throughput
from maevit.train.knn import knn_accuracy
from maevit.train.optim import build_adamw, cosine_lr, scaled_lr, set_lr

logger = logging.getLogger("maevit.pretrain")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    name: str = "mae_vit_base_patch16"  # a registered model (`maevit models`)
    img_size: int = 224  # input side in pixels (also the crop size of the data)
    patch_size: int | None = None  # None: the model's own
    embed_dim: int | None = None  # encoder width / depth / heads; None: the model's own
    depth: int | None = None
    num_heads: int | None = None
    decoder_embed_dim: int | None = None  # decoder size; None: the model's own
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    mask_ratio: float = 0.75  # fraction of patches removed (MAE: 0.75)
    norm_pix_loss: bool = True  # per-patch normalised pixel targets (MAE's recipe)

    def overrides(self) -> dict[str, Any]:
        """Arguments for ``create_mae`` (fields left at None keep the model's value)."""
        out = {k: v for k, v in to_dict(self).items() if k != "name" and v is not None}
        return out


@dataclass
class DataConfig:
    train: str = ""  # shard dir / pattern / URL, image folder, or "bundled"
    batch_size: int = 64  # per process; effective batch = this x processes x optim.accum_steps
    num_workers: int = 4  # loader processes per rank
    mode: Literal["exact", "resampled"] = "exact"  # exact epochs, or sample shards with replacement
    samples_per_epoch: int | None = None  # resampled mode: epoch length (None: dataset size)
    shuffle_buffer: int = 1000  # samples in the shuffle buffer of each worker
    mean: tuple[float, float, float] = IMAGENET_MEAN  # normalisation of the input images
    std: tuple[float, float, float] = IMAGENET_STD
    scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range (MAE)
    allow_pipe: bool = False  # allow `pipe:` shard URLs (they run shell commands)
    decode: Literal["worker", "device"] = "worker"  # device: JPEGs decoded on the GPU (nvJPEG), crops drawn on CPU

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class OptimConfig:
    epochs: int = 800  # length of the schedule (MAE: 800 or 1600)
    base_lr: float = 1.5e-4  # lr = base_lr x effective batch / 256
    weight_decay: float = 0.05  # not on biases, norms, position tables, tokens
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 40.0  # linear warm-up, then per-step cosine decay
    min_lr: float = 0.0
    clip_grad: float | None = None  # max gradient norm; None: no clipping
    accum_steps: int = 1  # gradient accumulation (micro-batches per optimizer step)
    max_steps: int | None = None  # stop early after this many optimizer steps (the schedule still spans `epochs`)

    def validate(self) -> None:
        if self.accum_steps < 1:
            raise ConfigError(f"optim.accum_steps must be >= 1, got {self.accum_steps}")


@dataclass
class RunConfig:
    dir: str = "runs/pretrain"  # run directory: config, metrics, checkpoints, images, encoder
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 where native and faster, else fp32
    compile: bool = False  # torch.compile each transformer block (regional; faster steps after slow first ones)
    peak_tflops: float | None = None  # peak TFLOP/s per device for MFU; None: GPU table / measured on CPU
    log_every: int = 50  # optimizer steps between metric reads (the only host syncs)
    ckpt_every: int = 1000  # optimizer steps between checkpoints (and one at the end)
    keep_last: int = 3  # checkpoints kept
    viz_every: int = 1000  # steps between reconstruction grids in RUN_DIR/images (0: never)
    viz_images: int = 8  # images in the grid (a fixed set)
    max_nonfinite: int = 10  # stop after this many non-finite steps in a row
    fresh: bool = False  # start over even if RUN_DIR has a checkpoint (old run moved aside)
    progress: bool = True  # tqdm progress bar on the main process
    probe_every: int = 0  # steps between online kNN probes of the encoder (0: off)
    probe_train: str = ""  # labeled memory bank for the probe (e.g. "bundled:train"); small is fine
    probe_val: str = ""  # labeled queries for the probe (e.g. "bundled:val")
    probe_k: int = 20  # neighbours that vote (cosine, temperature 0.07)

    def validate(self) -> None:
        for key in ("log_every", "ckpt_every", "keep_last", "max_nonfinite"):
            if getattr(self, key) < 1:
                raise ConfigError(f"run.{key} must be >= 1, got {getattr(self, key)}")
        if self.probe_every and not (self.probe_train and self.probe_val):
            raise ConfigError("run.probe_every is set but run.probe_train / run.probe_val are not: "
                              "give two labeled sources (e.g. run.probe_train=bundled:train run.probe_val=bundled:val)")


@dataclass
class PretrainConfig:
    """Everything ``maevit pretrain`` reads; a recipe YAML states only what differs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def _accelerator(cfg: PretrainConfig, precision: str):
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available

    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.optim.accum_steps,
        log_with="tensorboard" if is_tensorboard_available() else None,
        project_dir=cfg.run.dir,
    )


def _start_trackers(acc, cfg: PretrainConfig) -> None:
    """TensorBoard under RUN_DIR/tensorboard, once ``open_run`` has set RUN_DIR up (``run.fresh``
    moves an old run aside, and a writer opened before that would follow it)."""
    if acc.log_with:
        flat = {f"{s}.{k}": str(v) if isinstance(v, (list, tuple)) or v is None else v
                for s, sec in to_dict(cfg).items() for k, v in sec.items()}
        acc.init_trackers("tensorboard", config=flat)


def _loader(cfg: PretrainConfig, acc, *, batch_size: int | None = None, **kw):
    from maevit.data.stream import pretrain_loader

    d = cfg.data
    args = dict(
        img_size=cfg.model.img_size, batch_size=batch_size or d.batch_size, num_workers=d.num_workers,
        seed=cfg.run.seed, rank=acc.process_index, world_size=acc.num_processes, mode=d.mode,
        samples_per_epoch=d.samples_per_epoch, shuffle_buffer=d.shuffle_buffer, mean=d.mean, std=d.std,
        scale=d.scale, allow_pipe=d.allow_pipe, pin_memory=acc.device.type == "cuda", decode=d.decode,
    )
    return pretrain_loader(d.train, **{**args, **kw})


def train(cfg: PretrainConfig) -> dict[str, Any]:
    """Pretrain (or resume) the MAE described by ``cfg``; returns a summary.

    Returns:
        ``{"step", "epoch", "loss", "images_per_sec", "nonfinite_steps",
        "resumed_from", "run_dir", "encoder"}`` (``loss``: the last logged mean).

    Raises:
        NonFiniteLossError: ``run.max_nonfinite`` non-finite steps in a row.
    """
    from accelerate.utils import set_seed

    if not cfg.data.train:
        raise ConfigError("data.train is not set: pass data.train=SHARDS_OR_FOLDER (or data.train=bundled)")
    precision = throughput.resolve_precision(  # [throughput] auto: bf16 where native and the step is faster
        cfg.run.precision, cfg.run.dir, fresh=cfg.run.fresh, speed_check=lambda: throughput.bf16_speedup(
            create_mae(cfg.model.name, **cfg.model.overrides()), (3, cfg.model.img_size, cfg.model.img_size)))
    acc = _accelerator(cfg, precision.precision)
    logger.info("pretraining on %d process(es), device %s, precision %s", acc.num_processes, acc.device,
                f"auto -> {precision}" if cfg.run.precision == "auto" else cfg.run.precision)
    run, ckpt = runs.open_run(cfg.run.dir, acc, cfg, fresh=cfg.run.fresh)
    _start_trackers(acc, cfg)
    set_seed(cfg.run.seed)  # same init on every rank (DDP also broadcasts it)
    model = create_mae(cfg.model.name, **cfg.model.overrides())
    meter = throughput.meter_for(  # [throughput] FLOPs per image, peak, MFU (before compile / prepare)
        model, (3, cfg.model.img_size, cfg.model.img_size), acc.device, precision.precision,
        num_processes=acc.num_processes, peak=cfg.run.peak_tflops, log=acc.is_main_process)
    loader = _loader(cfg, acc)
    viz_imgs = viz_noise = None
    sharded = acc.distributed_type.value in ("FSDP", "DEEPSPEED")
    if cfg.run.viz_every and sharded:  # the grid runs the model on the main process only
        logger.warning("reconstruction grids are off under %s; use `maevit visualize RUN_DIR`", acc.distributed_type.value)
    if cfg.run.viz_every and acc.is_main_process and not sharded:  # a fixed set: whole images, first batch of a fixed stream
        viz_imgs = next(iter(_loader(cfg, acc, batch_size=cfg.run.viz_images, num_workers=0, rank=0,
                                     world_size=1, scale=(1.0, 1.0), shuffle_buffer=cfg.run.viz_images)))
        viz_noise = torch.rand(len(viz_imgs), model.num_patches, generator=torch.Generator().manual_seed(0))

    probe = None
    if cfg.run.probe_every and sharded:
        logger.warning("the online kNN probe is off under %s (it needs the whole encoder on each rank)",
                       acc.distributed_type.value)
    elif cfg.run.probe_every:  # every rank embeds its exactly-once share; features are gathered
        kw = dict(img_size=cfg.model.img_size, batch_size=cfg.data.batch_size, train=False, num_workers=0,
                  rank=acc.process_index, world_size=acc.num_processes, mean=cfg.data.mean, std=cfg.data.std)
        probe = (labeled_loader(cfg.run.probe_train, **kw), labeled_loader(cfg.run.probe_val, **kw))

    # schedule in optimizer steps; every rank has len(loader) batches per epoch
    accum = cfg.optim.accum_steps
    eff_batch = cfg.data.batch_size * acc.num_processes * accum
    steps_per_epoch = max(1, len(loader) // accum)
    total_steps = cfg.optim.epochs * steps_per_epoch
    last_step = min(total_steps, cfg.optim.max_steps or total_steps)
    peak_lr = scaled_lr(cfg.optim.base_lr, eff_batch)
    warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    optimizer = build_adamw(model.to(acc.device), peak_lr, cfg.optim.weight_decay, cfg.optim.betas)
    if cfg.run.compile:  # [throughput] regional: each block in place; parameter names stay the same
        logger.info("compiled %d blocks", throughput.compile_blocks(model))
    model, optimizer = acc.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    # masking noise from a generator of its own per rank: saved in checkpoints, untouched by data code
    mask_gen = torch.Generator(acc.device).manual_seed(cfg.run.seed * 1000 + acc.process_index)

    state = {"step": 0, "epoch": 0, "batch": 0, "nonfinite_steps": 0, "precision": precision.precision}
    if ckpt is not None:
        state.update(runs.load_checkpoint(acc, ckpt, generators={"mask": mask_gen}))
    step, epoch, batch = state["step"], state["epoch"], state["batch"]
    metrics = runs.MetricsLogger(run.metrics_path, enabled=acc.is_main_process,
                                 resume_step=step if ckpt is not None else None)
    logger.info("effective batch %d (= %d x %d processes x %d accumulation), lr %.3g, %d steps/epoch, %d steps%s",
                eff_batch, cfg.data.batch_size, acc.num_processes, accum, peak_lr, steps_per_epoch, total_steps,
                f" (stopping at {last_step})" if last_step < total_steps else "")

    # device-side accumulators: read only every log_every steps
    zero = lambda: torch.zeros((), device=acc.device)  # noqa: E731
    loss_sum, loss_n, bad_run, max_bad_run, bad_total = zero(), zero(), zero(), zero(), zero()
    bad_total += state["nonfinite_steps"]
    summary: dict[str, Any] = {"loss": float("nan"), "images_per_sec": 0.0}
    bar = _progress(cfg, acc, total=last_step, initial=step)
    t_log, step_log = time.perf_counter(), step
    saved_at = step if ckpt is not None else -1
    while step < last_step:
        loader.set_epoch(epoch)
        for imgs in meter.timed(_resume_iter(loader, batch)):  # [throughput] data-wait time
            imgs = imgs.to(acc.device, non_blocking=True)  # [B, C, H, W]
            with acc.accumulate(model):
                out = model(imgs, generator=mask_gen)
                acc.backward(out.loss)
                finite_loss = torch.isfinite(out.loss.detach())
                loss_sum += torch.where(finite_loss, out.loss.detach().float(), 0.0)
                loss_n += finite_loss
                if acc.sync_gradients:
                    set_lr(optimizer, cosine_lr(step, base_lr=peak_lr, warmup_steps=warmup,
                                                total_steps=total_steps, min_lr=cfg.optim.min_lr))
                    grad_norm = acc.clip_grad_norm_(params, cfg.optim.clip_grad or math.inf)
                    bad = ~torch.isfinite(grad_norm)  # same on every rank: gradients are all-reduced
                    optimizer.optimizer.found_inf = bad.float()  # fused AdamW skips the update on device
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not acc.sync_gradients:
                continue
            step += 1
            bad_run = (bad_run + 1) * bad
            max_bad_run, bad_total = torch.maximum(max_bad_run, bad_run), bad_total + bad
            bar.update(1)
            if step % cfg.run.log_every == 0 or step == last_step:
                img_s = eff_batch * (step - step_log) / (time.perf_counter() - t_log)
                frac_epoch = epoch + loader.state_dict()["batch"] / len(loader)
                summary = _log(acc, metrics, bar, step, frac_epoch, optimizer, loss_sum, loss_n, bad_total, img_s,
                               meter.fields(img_s))  # [throughput] tflops, mfu, data_wait
                loss_sum.zero_(), loss_n.zero_()
                t_log, step_log = time.perf_counter(), step
                if max_bad_run.item() >= cfg.run.max_nonfinite:
                    raise NonFiniteLossError(_nonfinite_message(cfg, step, int(max_bad_run.item())))
                max_bad_run.zero_()
            if viz_imgs is not None and (step % cfg.run.viz_every == 0 or step == last_step):
                _save_grid(acc, model, viz_imgs, viz_noise, cfg, run.images_dir / f"recon-{step:08d}.png")
            if probe is not None and (step % cfg.run.probe_every == 0 or step == last_step):
                knn = knn_accuracy(acc.unwrap_model(model).encoder, *probe, k=cfg.run.probe_k, accelerator=acc)
                metrics.log(step, **knn)
                acc.log({f"probe/{k}": v for k, v in knn.items()}, step=step)
            if step % cfg.run.ckpt_every == 0 or step == last_step:
                state.update(step=step, **loader.state_dict(), nonfinite_steps=int(bad_total.item()))
                runs.save_checkpoint(acc, run, step, state, keep_last=cfg.run.keep_last, generators={"mask": mask_gen})
                saved_at = step
            if step >= last_step:
                break
        else:  # epoch finished
            epoch, batch = epoch + 1, 0
    bar.close()
    metrics.close()

    encoder_path = run.root / "encoder.safetensors"
    full_sd = acc.get_state_dict(model)  # collective under FSDP / DeepSpeed: every rank calls it
    if acc.is_main_process:
        from maevit.train.checkpoint import export_encoder

        export_encoder(full_sd, encoder_path, model_name=cfg.model.name, img_size=cfg.model.img_size)
        logger.info("done: step %d, encoder weights in %s", step, encoder_path)
    acc.wait_for_everyone()
    acc.end_training()
    return {**summary, "step": step, "epoch": epoch, "nonfinite_steps": int(bad_total.item()),
            "resumed_from": str(ckpt) if ckpt else None, "run_dir": str(run.root), "encoder": str(encoder_path),
            "last_checkpoint": saved_at, "num_processes": acc.num_processes}


def _resume_iter(loader, start_batch: int):
    """Iterate this epoch from batch ``start_batch`` (the stream skips the rest exactly)."""
    if start_batch:
        loader.skip_batches(start_batch)
    return iter(loader)


def _progress(cfg: PretrainConfig, acc, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                disable=not (cfg.run.progress and acc.is_main_process))


def _log(acc, metrics, bar, step, epoch, optimizer, loss_sum, loss_n, bad_total, img_per_sec,
         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Reduce the device accumulators over ranks and write one metrics row (a host sync)."""
    totals = acc.reduce(torch.stack([loss_sum, loss_n]), reduction="sum").tolist()
    row = {
        "epoch": round(epoch, 4),
        "loss": totals[0] / totals[1] if totals[1] else float("nan"),
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_sec": round(img_per_sec, 2),
        "nonfinite_steps": int(bad_total.item()),
        **(extra or {}),
    }
    metrics.log(step, **row)
    acc.log({f"train/{k}": v for k, v in row.items() if v is not None}, step=step)
    bar.set_postfix(epoch=f"{epoch:.2f}", loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{img_per_sec:.0f}")
    return row


def _nonfinite_message(cfg: PretrainConfig, step: int, run_len: int) -> str:
    return (
        f"stopping at step {step}: {run_len} optimizer steps in a row had a non-finite loss or gradient "
        f"(run.max_nonfinite={cfg.run.max_nonfinite}); those steps were skipped, the weights are unchanged. "
        f"Try a lower optim.base_lr (now {cfg.optim.base_lr}), a longer optim.warmup_epochs, gradient "
        f"clipping (optim.clip_grad=1.0), or run.precision=fp32 / bf16 instead of {cfg.run.precision}; "
        f"then resume from the last checkpoint in {cfg.run.dir}. Also check the data for broken images."
    )


@torch.no_grad()
def _save_grid(acc, model, imgs, noise, cfg: PretrainConfig, path: Path) -> None:
    """Reconstruction grid of the fixed images (main process; the model is not put in eval
    mode: MAE pretraining has no dropout, and a mode switch would recompile a compiled model)."""
    from maevit.viz import save_reconstruction_grid

    with acc.autocast():
        save_reconstruction_grid(acc.unwrap_model(model), imgs.to(acc.device), path, noise=noise.to(acc.device),
                                 mean=cfg.data.mean, std=cfg.data.std)


def main(argv: list[str] | None = None) -> int:
    """``maevit pretrain RECIPE.yaml [key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="maevit pretrain",
        description="MAE pretraining. Re-running the same command on a run directory resumes it.",
        epilog="example: maevit pretrain pretrain/cifar10_vit_tiny.yaml data.train=SHARDS run.dir=runs/c10 optim.epochs=50",
    )
    parser.add_argument("recipe", nargs="?", help="recipe YAML (pretrain/*.yaml); omit to use the defaults")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.dir=RUN_DIR optim.epochs=50")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        recipe, overrides = None, [recipe, *overrides]
    # INFO from the main process only; Accelerate's per-file save messages stay quiet
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        cfg = load_config(PretrainConfig, recipe, overrides)
        result = train(cfg)
    except (ConfigError, NonFiniteLossError) as e:
        print(f"maevit pretrain: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    logger.info("run directory: %s", result["run_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
