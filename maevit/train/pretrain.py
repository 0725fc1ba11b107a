"""MAE pretraining: ``maevit pretrain RECIPE.yaml key=value ...``.

Accelerate owns devices, processes, precision and gradient accumulation, so the
same command runs on one CPU, ``accelerate launch`` on N GPUs, or ``torchrun``
over several nodes. The data stream is already split by rank, so it is *not*
passed to ``accelerator.prepare`` (which would re-shard it).

The loop never waits for the device inside a step (:class:`~maevit.train.common.StepGuard`):
losses are summed on the device and read every ``run.log_every`` steps; a step
whose gradient is not finite is skipped on the device and counted. Re-running
the same command on a run directory resumes it exactly.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from maevit.config import ConfigError, fill_unset, to_dict
from maevit.data.transforms import DEFAULT_MAX_PIXELS
from maevit.models import create_mae, export_encoder, family_defaults
from maevit.models.weights import header_of
from maevit.train import runs, throughput
from maevit.train.common import (
    IMAGENET_MEAN, IMAGENET_STD, NonFiniteLossError, RunBase, StepGuard, TrainingInterrupted, batches_from,
    building_model, check_resumable, describe_data, log_memory_estimate, make_accelerator, plan_schedule,
    progress_bar, report_progress,
    resolve_num_workers, resolve_run_precision, run_recipe_command, start_trackers, stop_requested,
)
from maevit.train.curves import PRETRAIN_PANELS, save_run_curves
from maevit.train.distill import FeatureDistillConfig, StudentTokens, build_feature_teacher, feature_distill_loss
from maevit.train.optim import build_adamw, param_groups

logger = logging.getLogger("maevit.pretrain")
__all__ = ["PretrainConfig", "train", "main", "NonFiniteLossError"]


@dataclass
class ModelConfig:
    name: str = "mae_vit_base_patch16"  # a registered model (`maevit models`)
    img_size: int = 224  # input side in pixels (also the crop size of the data)
    patch_size: int | None = None  # pixel side of a patch; None: the model's own
    embed_dim: int | None = None  # encoder width; None: the model's own
    depth: int | None = None  # encoder blocks; None: the model's own
    num_heads: int | None = None  # attention heads; None: the model's own
    args: dict[str, Any] = field(default_factory=dict)  # more encoder arguments, e.g. {pos_encoding: rope}
    decoder_embed_dim: int | None = None  # decoder size; None: the size registered with the model
    decoder_depth: int | None = None  # decoder blocks; None: the registered size
    decoder_num_heads: int | None = None  # decoder heads; None: the registered size
    mask_ratio: float | None = None  # fraction of mask units removed; None: the model's (`maevit models NAME`)
    norm_pix_loss: bool | None = None  # per-patch normalised pixel targets; None: the model's (MAE: true)

    def overrides(self) -> dict[str, Any]:
        """Arguments for ``create_mae`` (fields left at None keep the model's value)."""
        out = {k: v for k, v in to_dict(self).items() if k not in ("name", "args") and v is not None}
        return {**self.args, **out}


@dataclass
class DataConfig:
    train: str = ""  # shard dir / pattern / URL, image folder, or "bundled"
    batch_size: int = 64  # per process; effective batch = this x processes x optim.accum_steps
    num_workers: int | None = None  # loader processes per rank; None: min(4, CPUs per process - 1)
    mode: Literal["exact", "resampled"] = "exact"  # exact epochs, or sample shards with replacement
    samples_per_epoch: int | None = None  # resampled mode: epoch length (None: dataset size)
    shuffle_buffer: int = 1000  # samples in the shuffle buffer of each worker
    mean: tuple[float, float, float] = IMAGENET_MEAN  # normalisation of the input images
    std: tuple[float, float, float] = IMAGENET_STD  # (use the same mean / std when fine-tuning)
    scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range (MAE)
    allow_pipe: bool = False  # allow `pipe:` shard URLs (they run shell commands)
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # larger images are skipped and counted (64 MP); None: no limit
    decode: Literal["worker", "device"] = "worker"  # device: JPEGs decoded on the GPU (nvJPEG), crops drawn on CPU

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0 (or null: automatic), got {self.num_workers}")


@dataclass
class OptimConfig:
    epochs: int = 800  # length of the schedule (MAE: 800 or 1600)
    base_lr: float = 1.5e-4  # lr = base_lr x effective batch / 256
    weight_decay: float = 0.05  # not on biases, norms, position tables, tokens
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas (MAE: 0.9, 0.95)
    warmup_epochs: float = 40.0  # linear warm-up, then per-step cosine decay
    min_lr: float = 0.0  # the lr at the end of the cosine
    clip_grad: float | None = None  # max gradient norm; None: no clipping
    accum_steps: int = 1  # gradient accumulation (micro-batches per optimizer step)
    max_steps: int | None = None  # stop early after this many optimizer steps (the schedule still spans `epochs`)

    def validate(self) -> None:
        if self.accum_steps < 1:
            raise ConfigError(f"optim.accum_steps must be >= 1, got {self.accum_steps}")


@dataclass
class RunConfig(RunBase):
    dir: str = "runs/pretrain"
    keep_last: int = 3
    compile: bool = False  # torch.compile each repeated block (regional; faster steps after slow first ones)
    peak_tflops: float | None = None  # peak TFLOP/s per device for MFU; None: GPU table / measured on CPU
    ckpt_every: int = 1000  # optimizer steps between checkpoints (and one at the end)
    viz_every: int = 1000  # steps between reconstruction grids in RUN_DIR/images (0: never)
    viz_images: int = 8  # images in the grid (a fixed set)
    probe_every: int = 0  # steps between online kNN probes of the encoder (0: off)
    probe_train: str = ""  # labeled memory bank for the probe (e.g. "bundled:train"); small is fine
    probe_val: str = ""  # labeled queries for the probe (e.g. "bundled:val")
    probe_k: int = 20  # neighbours that vote (cosine, temperature 0.07)

    def validate(self) -> None:
        super().validate()
        if self.ckpt_every < 1:
            raise ConfigError(f"run.ckpt_every must be >= 1, got {self.ckpt_every}")
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
    distill: FeatureDistillConfig = field(default_factory=FeatureDistillConfig)  # DMAE-style; off by default


def _loader(cfg: PretrainConfig, acc, **kw):
    from maevit.data.stream import pretrain_loader

    d = cfg.data
    args = dict(
        img_size=cfg.model.img_size, batch_size=d.batch_size, num_workers=d.num_workers or 0, seed=cfg.run.seed,
        rank=acc.process_index, world_size=acc.num_processes, mode=d.mode, samples_per_epoch=d.samples_per_epoch,
        shuffle_buffer=d.shuffle_buffer, mean=d.mean, std=d.std, scale=d.scale, allow_pipe=d.allow_pipe,
        pin_memory=acc.device.type == "cuda", max_pixels=d.max_pixels,
        decode=d.decode,
    )
    return pretrain_loader(d.train, **{**args, **kw})


def _probe_loaders(cfg: PretrainConfig, acc):
    """Labeled loaders of the online kNN probe: every rank embeds its exactly-once share."""
    from maevit.data.stream import labeled_loader

    kw = dict(img_size=cfg.model.img_size, batch_size=cfg.data.batch_size, train=False, num_workers=0,
              rank=acc.process_index, world_size=acc.num_processes, mean=cfg.data.mean, std=cfg.data.std)
    return labeled_loader(cfg.run.probe_train, **kw), labeled_loader(cfg.run.probe_val, **kw)


def _advice(cfg: PretrainConfig) -> str:
    return (f"Try a lower optim.base_lr (now {cfg.optim.base_lr}), a longer optim.warmup_epochs, gradient clipping "
            f"(optim.clip_grad=1.0), or run.precision=fp32 / bf16 instead of {cfg.run.precision}; then resume from "
            f"the last checkpoint in {cfg.run.dir}. Also check the data for broken images.")


def train(cfg: PretrainConfig) -> dict[str, Any]:
    """Pretrain (or resume) the MAE described by ``cfg``; returns a summary.

    Returns:
        ``{"step", "epoch", "loss", "images_per_sec", "nonfinite_steps", "skipped", "resumed_from", "run_dir",
        "encoder", "last_checkpoint", "num_processes"}`` (``loss``: the last logged mean; ``skipped``: bad
        samples skipped since step 0, by kind).

    Raises:
        NonFiniteLossError: ``run.max_nonfinite`` non-finite steps in a row.
        maevit.train.runs.RunError: the run directory is in use, the disk filled up, or the
            checkpoint cannot be resumed (the message says what to do).
    """
    from accelerate.utils import set_seed

    from maevit.train.knn import knn_accuracy

    if not cfg.data.train:
        raise ConfigError("data.train is not set: pass data.train=SHARDS_OR_FOLDER (or data.train=bundled)")
    cfg = fill_unset(cfg, family_defaults(cfg.model.name, "pretrain"))  # the model's settings where unset
    set_seed(cfg.run.seed)  # same init on every rank (DDP also broadcasts it)
    with building_model():  # before open_run: a bad name or size changes no files
        model = create_mae(cfg.model.name, **cfg.model.overrides())
    img_shape = (3, *model.encoder.img_size)  # the loader's RGB images
    precision = resolve_run_precision(  # auto: bf16 where native and this model's step is faster (global RNG kept)
        cfg.run, speed_check=lambda: throughput.bf16_speedup(model, img_shape))
    acc = make_accelerator(precision, cfg.optim.accum_steps, cfg.run.dir)
    logger.info("pretraining on %d process(es), device %s, precision %s", acc.num_processes, acc.device, precision)
    meter = throughput.meter_for(  # FLOPs per image, peak, MFU (before compile / prepare)
        model, img_shape, acc.device, precision, num_processes=acc.num_processes, peak=cfg.run.peak_tflops,
        log=acc.is_main_process)
    check_resumable(cfg.run.dir, model, cfg, cfg.run.fresh)
    workers = resolve_num_workers(cfg.data.num_workers)
    loader = _loader(cfg, acc, num_workers=workers)  # before open_run too: a bad data source changes no files
    sharded = acc.distributed_type.value in ("FSDP", "DEEPSPEED")
    probe = _probe_loaders(cfg, acc) if cfg.run.probe_every and not sharded else None
    run, ckpt = runs.open_run(cfg.run.dir, acc, cfg, fresh=cfg.run.fresh)
    start_trackers(acc, cfg)
    logger.info("%s", describe_data(loader, cfg.data.batch_size, acc.num_processes))
    if sharded and (cfg.run.viz_every or cfg.run.probe_every):  # both need the whole model on one process
        logger.warning("reconstruction grids and the online probe are off under %s; use `maevit visualize RUN_DIR`",
                       acc.distributed_type.value)
    viz_imgs = None
    if cfg.run.viz_every and acc.is_main_process and not sharded:  # a fixed set: whole images, first batch
        viz_imgs = next(iter(_loader(cfg, acc, batch_size=cfg.run.viz_images, num_workers=0, rank=0, world_size=1,
                                     scale=(1.0, 1.0), shuffle_buffer=cfg.run.viz_images)))

    o = cfg.optim
    eff_batch = cfg.data.batch_size * acc.num_processes * o.accum_steps
    sched = plan_schedule(epochs=o.epochs, batches_per_epoch=len(loader), accum_steps=o.accum_steps,
                          warmup_epochs=o.warmup_epochs, base_lr=o.base_lr, effective_batch=eff_batch,
                          min_lr=o.min_lr, max_steps=o.max_steps)
    if acc.is_main_process:
        log_memory_estimate(acc, model, (cfg.data.batch_size, model.encoder.in_chans, *model.encoder.img_size),
                            precision)
    optimizer = build_adamw(model.to(acc.device), sched.peak_lr, o.weight_decay, o.betas)
    teacher = proj = None  # DMAE: a frozen teacher encoder (never trained or saved) and a trained projection
    if cfg.distill.enabled:
        teacher = build_feature_teacher(cfg.distill, model.encoder, student_mean=cfg.data.mean,
                                        student_std=cfg.data.std, device=acc.device)
        student_tokens = StudentTokens(model.encoder, cfg.distill.student_block)
        proj = torch.nn.Linear(model.encoder.num_features, teacher.model.num_features).to(acc.device)
        for group in param_groups(proj, o.weight_decay):
            optimizer.add_param_group(group)
        logger.info("distilling features from %s (weight %g)", teacher.source, cfg.distill.weight)
    if cfg.run.compile:  # regional: each repeated block in place; parameter names stay the same
        logger.info("compiled %d blocks", throughput.compile_blocks(model))
    if proj is None:
        model, optimizer = acc.prepare(model, optimizer)
    else:  # the projection is saved in the training checkpoints beside the MAE (model_1.safetensors)
        model, proj, optimizer = acc.prepare(model, proj, optimizer)
    params = [p for p in model.parameters() if p.requires_grad] + (list(proj.parameters()) if proj is not None else [])
    # masking noise from a generator of its own per rank: saved in checkpoints, untouched by data code
    mask_gen = torch.Generator(acc.device).manual_seed(cfg.run.seed * 1000 + acc.process_index)
    header = header_of(acc.unwrap_model(model), "mae")

    state = {"step": 0, "epoch": 0, "batch": 0, "nonfinite_steps": 0, "precision": precision}  # kept on resume
    if ckpt is not None:
        state.update(runs.load_checkpoint(acc, ckpt, generators={"mask": mask_gen}))
    step, epoch, batch = state["step"], state["epoch"], state["batch"]
    skips = runs.SkipTally(acc, loader, state.get("skipped"))  # bad samples by kind, all ranks, since step 0
    metrics = runs.MetricsLogger(run.metrics_path, enabled=acc.is_main_process,
                                 resume_step=step if ckpt is not None else None)
    logger.info("effective batch %d (= %d x %d processes x %d accumulation), peak lr %.3g after %d warm-up steps, "
                "%d steps/epoch, %d steps%s", eff_batch, cfg.data.batch_size, acc.num_processes, o.accum_steps,
                sched.peak_lr, sched.warmup_steps, sched.steps_per_epoch, sched.total_steps,
                f" (stopping at {sched.last_step})" if sched.last_step < sched.total_steps else "")

    guard = StepGuard(acc.device, state["nonfinite_steps"])
    summary: dict[str, Any] = {"loss": float("nan"), "images_per_sec": 0.0}
    knn: dict[str, float] = {}

    def run_probe() -> None:
        knn.update(knn_accuracy(acc.unwrap_model(model).encoder, *probe, k=cfg.run.probe_k, accelerator=acc))
        metrics.log(step, **knn)
        acc.log({f"probe/{k}": v for k, v in knn.items()}, step=step)
        logger.info("kNN probe at step %d: top-1 %.2f%%  top-5 %.2f%%", step, knn["knn_top1"], knn["knn_top5"])

    bar = progress_bar(cfg.run.progress and acc.is_main_process, sched.last_step, step)
    t_log, step_log, saved_at = time.perf_counter(), step, step if ckpt is not None else -1
    batches_per_epoch = sched.steps_per_epoch * o.accum_steps  # a ragged tail of micro-batches is skipped
    stopping = False
    if probe is not None and step == 0:
        run_probe()  # the baseline: the randomly initialised encoder
    while step < sched.last_step and not stopping:
        if batch >= batches_per_epoch:  # also after a resume at the very end of an epoch
            epoch, batch = epoch + 1, 0
        for imgs in meter.timed(batches_from(loader, epoch, batch)):  # data-wait time
            imgs = imgs.to(acc.device, non_blocking=True)  # [B, C, H, W]
            with acc.accumulate(model):
                if teacher is None:
                    loss = model(imgs, generator=mask_gen).loss
                else:  # one mask for both: the teacher encodes the student's visible units
                    mask = acc.unwrap_model(model).random_mask(imgs.shape[0], generator=mask_gen, device=acc.device)
                    out = model(imgs, mask=mask)
                    with acc.autocast():
                        distill = feature_distill_loss(student_tokens(out.latent), teacher(imgs, mask), proj)
                    loss = out.loss + cfg.distill.weight * distill
                acc.backward(loss)
                guard.add_loss(loss)
                guard.step(acc, optimizer, params, sched.lr(step), o.clip_grad)
            batch = loader.state_dict()["batch"]  # the stream's position: what a resume skips to
            if not acc.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if step % cfg.run.log_every == 0 or step == sched.last_step:
                row = guard.read(acc, cfg.run.max_nonfinite, _advice(cfg))
                img_s = eff_batch * (step - step_log) / (time.perf_counter() - t_log)
                summary = _log(acc, metrics, bar, step, sched.last_step, epoch + batch / len(loader), optimizer, row,
                               img_s, skips.totals(), meter.fields(img_s))  # tflops, mfu, data_wait
                t_log, step_log = time.perf_counter(), step
            if viz_imgs is not None and (step % cfg.run.viz_every == 0 or step == sched.last_step):
                _save_grid(acc, model, viz_imgs, cfg, run.images_dir / f"recon-{step:08d}.png")
            if probe is not None and (step % cfg.run.probe_every == 0 or step == sched.last_step):
                run_probe()
            # Ctrl-C on any rank: every rank saves and stops after this step (at the last step: the run ends anyway)
            stopping = stop_requested(acc) and step < sched.last_step
            if step % cfg.run.ckpt_every == 0 or step == sched.last_step or stopping:
                state.update(step=step, epoch=epoch, batch=batch, nonfinite_steps=int(guard.bad_total.item()),
                             skipped=skips.totals(), model=header)
                runs.save_checkpoint(acc, run, step, state, keep_last=cfg.run.keep_last, generators={"mask": mask_gen})
                saved_at = step
                if acc.is_main_process:
                    save_run_curves(run.root, PRETRAIN_PANELS)
            if stopping or step >= sched.last_step or batch >= batches_per_epoch:
                break
        else:
            batch = batches_per_epoch  # the stream ended
    bar.close()
    metrics.close()
    skipped = skips.report()
    if stopping:
        acc.end_training()
        run.unlock()
        raise TrainingInterrupted(step, run.checkpoints_dir / f"{runs.CKPT_PREFIX}{step:08d}")

    encoder_path = run.root / "encoder.safetensors"
    full_sd = acc.get_state_dict(model)  # collective under FSDP / DeepSpeed: every rank calls it
    if acc.is_main_process:
        export_encoder(acc.unwrap_model(model), encoder_path, state_dict=full_sd, mean=list(cfg.data.mean),
                       std=list(cfg.data.std))
        logger.info("done: step %d, encoder weights in %s", step, encoder_path)
    acc.wait_for_everyone()
    acc.end_training()
    run.unlock()
    return {**summary, **knn, "step": step, "epoch": epoch, "nonfinite_steps": int(guard.bad_total.item()),
            "skipped": skipped,
            "resumed_from": str(ckpt) if ckpt else None, "run_dir": str(run.root), "encoder": str(encoder_path),
            "last_checkpoint": saved_at, "num_processes": acc.num_processes, "precision": precision,
            "curves": str(run.root / "curves.png") if (run.root / "curves.png").is_file() else None}


def _log(acc, metrics, bar, step, last_step, epoch, optimizer, row, img_per_sec,
         skipped: dict[str, int], speed: dict[str, Any]) -> dict[str, Any]:
    """One metrics row (already reduced over ranks) to metrics.jsonl, the tracker and the bar (or the log)."""
    row = {"epoch": round(epoch, 4), "loss": row["loss"], "lr": optimizer.param_groups[0]["lr"],
           "images_per_sec": round(img_per_sec, 2), "nonfinite_steps": row["nonfinite_steps"], **speed}
    metrics.log(step, **row, skipped=skipped)  # bad samples skipped since step 0, by kind
    acc.log({**{f"train/{k}": v for k, v in row.items() if v is not None}, **{f"train/skipped_{k}": v for k, v in skipped.items()}},
            step=step)
    if acc.is_main_process:
        report_progress(bar, step, last_step, epoch=epoch, loss=row["loss"], lr=row["lr"], img_s=img_per_sec,
                        skipped=row["nonfinite_steps"] or None)
    return row


@torch.no_grad()
def _save_grid(acc, model, imgs, cfg: PretrainConfig, path: Path) -> None:
    """Reconstruction grid of the fixed images with a fixed mask (main process; the model is not put
    in eval mode: MAE pretraining has no dropout, and a mode switch would recompile a compiled model)."""
    from maevit.viz import save_reconstruction_grid

    with acc.autocast():
        save_reconstruction_grid(acc.unwrap_model(model), imgs.to(acc.device), path, seed=0,
                                 mean=cfg.data.mean, std=cfg.data.std)


def _summary(result: dict[str, Any]) -> str:
    lines = [f"pretraining done at step {result['step']} (last logged loss {result['loss']:.4f})"]
    if "knn_top1" in result:
        lines.append(f"  kNN probe        top-1 {result['knn_top1']:.2f}%  top-5 {result['knn_top5']:.2f}%")
    lines += [f"  run directory    {result['run_dir']}", f"  encoder weights  {result['encoder']}"]
    if result.get("curves"):
        lines.append(f"  curves           {result['curves']}")
    lines += ["next:", f"  maevit visualize {result['run_dir']} --out recon.png",
              f"  maevit finetune model.pretrained={result['run_dir']} data.train=LABELED data.val=LABELED_VAL",
              f"  maevit probe model.pretrained={result['run_dir']} data.train=LABELED data.val=LABELED_VAL"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``maevit pretrain [RECIPE.yaml] [key=value ...]``."""
    return run_recipe_command(
        "maevit pretrain", "MAE pretraining. Re-running the same command on a run directory resumes it.",
        PretrainConfig, train, argv, summary=_summary,
        epilog="example: maevit pretrain pretrain/cifar10_vit_tiny.yaml data.train=SHARDS run.dir=runs/c10 "
               "optim.epochs=50",
    )


if __name__ == "__main__":
    sys.exit(main())
