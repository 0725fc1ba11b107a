"""MAE pretraining: ``maevit pretrain RECIPE.yaml key=value ...``.

Accelerate owns devices, processes, precision and gradient accumulation, so the
same command runs on one CPU, ``accelerate launch`` on N GPUs, or ``torchrun``
over several nodes. The data stream is already split by rank, so it is *not*
passed to ``accelerator.prepare`` (which would re-shard it).

Pretraining is a task (:class:`PretrainTask`) on the one training loop
(:mod:`maevit.train.engine`): it builds the MAE and the stream, gives the loss of
a batch (the masked-pixel loss, plus DMAE's feature term with ``distill.teacher``),
draws reconstruction grids and runs the online kNN probe as hooks, and exports
the encoder. The loop never waits for the device inside a step, skips non-finite
steps on the device, and resumes a run directory exactly.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from maevit.config import ConfigError, fill_unset, to_dict
from maevit.data.transforms import DEFAULT_MAX_PIXELS
from maevit.models import create_mae, export_encoder, family_defaults
from maevit.models.weights import header_of
from maevit.train import runs
from maevit.train.command import building_model, run_recipe_command
from maevit.train.curves import PRETRAIN_PANELS
from maevit.train.distill import FeatureDistillConfig, StudentTokens, build_feature_teacher, feature_distill_loss
from maevit.train.engine import Hook, Loop, Setup, Task, fit, summary_fields
from maevit.train.inputs import describe_data, resolve_num_workers, unlabeled_for_rank
from maevit.train.memory import log_memory_estimate
from maevit.train.optim import build_adamw, param_groups
from maevit.train.perf import compile_blocks, meter_for
from maevit.train.precision import make_accelerator, resolve_run_precision
from maevit.train.trackers import log_image_file
from maevit.train.schedule import plan_for
from maevit.train.sections import IMAGENET_MEAN, IMAGENET_STD, AdamWSection, DataSection, ModelSection, RunBase
from maevit.train.step import NonFiniteLossError

logger = logging.getLogger("maevit.pretrain")
__all__ = ["PretrainConfig", "train", "main", "NonFiniteLossError"]


@dataclass
class ModelConfig(ModelSection):
    KEY_ORDER = ("name", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "args", "decoder_embed_dim",
                 "decoder_depth", "decoder_num_heads", "mask_ratio", "norm_pix_loss")

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
class DataConfig(DataSection):
    KEY_ORDER = ("train", "batch_size", "num_workers", "mode", "samples_per_epoch", "shuffle_buffer", "mean", "std",
                 "scale", "allow_pipe", "max_pixels", "decode")

    train: str = ""  # shard dir / pattern / URL, image folder, or "bundled"
    batch_size: int = 64  # per process; effective batch = this x processes x optim.accum_steps
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
class OptimConfig(AdamWSection):
    KEY_ORDER = ("epochs", "base_lr", "weight_decay", "betas", "warmup_epochs", "min_lr", "clip_grad", "accum_steps",
                 "max_steps")

    epochs: int = 800  # length of the schedule (MAE: 800 or 1600)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas (MAE: 0.9, 0.95)
    warmup_epochs: float = 40.0


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


def _probe_loaders(cfg: PretrainConfig, acc):
    """Labeled loaders of the online kNN probe: every rank embeds its exactly-once share."""
    from maevit.data.stream import labeled_loader

    kw = dict(img_size=cfg.model.img_size, batch_size=cfg.data.batch_size, train=False, num_workers=0,
              rank=acc.process_index, world_size=acc.num_processes, mean=cfg.data.mean, std=cfg.data.std)
    bank = labeled_loader(cfg.run.probe_train, **kw)
    return bank, labeled_loader(cfg.run.probe_val, class_names=bank.class_names,
                                classes_from=f"the probe's memory bank {cfg.run.probe_train}", **kw)


class PretrainTask(Task):
    """MAE pretraining on the loop: the masked-pixel loss (plus DMAE feature distillation when
    ``distill.teacher`` is set); reconstruction grids and the online kNN probe as hooks; the encoder
    weights as the result."""

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg

    def resolve(self, cfg: PretrainConfig) -> PretrainConfig:
        return fill_unset(cfg, family_defaults(cfg.model.name, "pretrain"))  # the model's settings where unset

    def build(self):
        from accelerate.utils import set_seed

        cfg = self.cfg
        if not cfg.data.train:
            raise ConfigError("data.train is not set: pass data.train=SHARDS_OR_FOLDER (or data.train=bundled)")
        set_seed(cfg.run.seed)  # same init on every rank (DDP also broadcasts it)
        with building_model():  # before open_run: a bad name or size changes no files
            model = self.model = create_mae(cfg.model.name, **cfg.model.overrides())
        img_shape = (3, *model.encoder.img_size)  # the loader's RGB images
        self.precision = resolve_run_precision(cfg.run)  # auto: from the hardware, the same for every run
        acc = self.acc = make_accelerator(self.precision, cfg.optim.accum_steps, cfg.run.dir, cfg.run.tracker)
        logger.info("pretraining on %d process(es), device %s, precision %s", acc.num_processes, acc.device,
                    self.precision)
        self.meter = meter_for(  # FLOPs per image, peak, MFU (before compile / prepare)
            model, img_shape, acc.device, self.precision, num_processes=acc.num_processes, peak=cfg.run.peak_tflops,
            log=acc.is_main_process)
        workers = resolve_num_workers(cfg.data.num_workers)
        self.meter.in_process_data = workers == 0
        self.loader = unlabeled_for_rank(  # before open_run too: a bad source changes no files
            cfg.data, acc, img_size=cfg.model.img_size, seed=cfg.run.seed, num_workers=workers)
        self.sharded = acc.distributed_type.value in ("FSDP", "DEEPSPEED")
        self.probe = _probe_loaders(cfg, acc) if cfg.run.probe_every and not self.sharded else None
        return acc, model

    def start(self, run: runs.RunDir) -> Setup:
        cfg, acc, model, o = self.cfg, self.acc, self.model, self.cfg.optim
        logger.info("%s", describe_data(self.loader, cfg.data.batch_size, acc.num_processes))
        if self.sharded and (cfg.run.viz_every or cfg.run.probe_every):  # both need the whole model on one process
            logger.warning("reconstruction grids and the online probe are off under %s; use `maevit visualize "
                           "RUN_DIR`", acc.distributed_type.value)
        hooks: list[Hook] = []
        if cfg.run.viz_every and acc.is_main_process and not self.sharded:  # a fixed set: whole images, 1st batch
            imgs = next(iter(unlabeled_for_rank(cfg.data, acc, img_size=cfg.model.img_size, seed=cfg.run.seed,
                                                batch_size=cfg.run.viz_images, num_workers=0, rank=0, world_size=1,
                                                scale=(1.0, 1.0), shuffle_buffer=cfg.run.viz_images)))
            hooks.append(_Grids(imgs, cfg, run))
        sched, eff_batch = plan_for(o, self.loader, cfg.data.batch_size, acc.num_processes)
        if acc.is_main_process:
            log_memory_estimate(acc, model, (cfg.data.batch_size, model.encoder.in_chans, *model.encoder.img_size),
                                self.precision)
        optimizer = build_adamw(model.to(acc.device), sched.peak_lr, o.weight_decay, o.betas)
        self.teacher = proj = None  # DMAE: a frozen teacher encoder (never trained or saved), a trained projection
        if cfg.distill.enabled:
            self.teacher = build_feature_teacher(cfg.distill, model.encoder, student_mean=cfg.data.mean,
                                                 student_std=cfg.data.std, device=acc.device)
            self.student_tokens = StudentTokens(model.encoder, cfg.distill.student_block)
            proj = torch.nn.Linear(model.encoder.num_features, self.teacher.model.num_features).to(acc.device)
            for group in param_groups(proj, o.weight_decay):
                optimizer.add_param_group(group)
            logger.info("distilling features from %s (weight %g)", self.teacher.source, cfg.distill.weight)
        if cfg.run.compile:  # regional: each repeated block in place; parameter names stay the same
            logger.info("compiled %d blocks", compile_blocks(model))
        if proj is None:
            model, optimizer = acc.prepare(model, optimizer)
        else:  # the projection is saved in the training checkpoints beside the MAE (model_1.safetensors)
            model, proj, optimizer = acc.prepare(model, proj, optimizer)
        self.model, self.proj = model, proj
        params = [p for p in model.parameters() if p.requires_grad] + (list(proj.parameters()) if proj else [])
        # masking noise from a generator of its own per rank: saved in checkpoints, untouched by data code
        self.mask_gen = torch.Generator(acc.device).manual_seed(cfg.run.seed * 1000 + acc.process_index)
        if self.probe is not None:
            hooks.append(_KnnProbe(self.probe, cfg.run))
        logger.info("effective batch %d (= %d x %d processes x %d accumulation), peak lr %.3g after %d warm-up steps, "
                    "%d steps/epoch, %d steps%s", eff_batch, cfg.data.batch_size, acc.num_processes, o.accum_steps,
                    sched.peak_lr, sched.warmup_steps, sched.steps_per_epoch, sched.total_steps,
                    f" (stopping at {sched.last_step})" if sched.last_step < sched.total_steps else "")
        return Setup(acc=acc, run=run, model=model, optimizer=optimizer, params=params, loader=self.loader,
                     schedule=sched, eff_batch=eff_batch, meter=self.meter, precision=self.precision,
                     header=header_of(acc.unwrap_model(model), "mae"), clip_grad=o.clip_grad,
                     generators={"mask": self.mask_gen}, hooks=hooks, panels=PRETRAIN_PANELS)

    def loss(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        acc, model = self.acc, self.model
        imgs = imgs.to(acc.device, non_blocking=True)  # [B, C, H, W]
        if self.teacher is None:
            return {"loss": model(imgs, generator=self.mask_gen).loss}
        # one mask for both: the teacher encodes the student's visible units
        mask = acc.unwrap_model(model).random_mask(imgs.shape[0], generator=self.mask_gen, device=acc.device)
        out = model(imgs, mask=mask)
        with acc.autocast():
            distill = feature_distill_loss(self.student_tokens(out.latent), self.teacher(imgs, mask), self.proj)
        return {"loss": out.loss + self.cfg.distill.weight * distill, "loss_pixel": out.loss, "loss_distill": distill}

    def advice(self) -> str:
        cfg = self.cfg
        return (f"Try a lower optim.base_lr (now {cfg.optim.base_lr}), a longer optim.warmup_epochs, gradient "
                f"clipping (optim.clip_grad=1.0), or run.precision=fp32 / bf16 instead of {cfg.run.precision}; then "
                f"resume from the last checkpoint in {cfg.run.dir}. Also check the data for broken images.")

    def export(self, loop: Loop) -> dict[str, Any]:
        acc, cfg = self.acc, self.cfg
        encoder_path = loop.run.encoder_path
        full_sd = acc.get_state_dict(self.model)  # collective under FSDP / DeepSpeed: every rank calls it
        if acc.is_main_process:
            export_encoder(acc.unwrap_model(self.model), encoder_path, state_dict=full_sd, mean=list(cfg.data.mean),
                           std=list(cfg.data.std))
            logger.info("done: step %d, encoder weights in %s", loop.step, encoder_path)
        knn = next((h.knn for h in loop.s.hooks if isinstance(h, _KnnProbe)), {})
        return {"loss": float("nan"), "images_per_sec": 0.0, **loop.row, **knn, **summary_fields(loop),
                "nonfinite_steps": int(loop.guard.bad_total.item()), "encoder": str(encoder_path),
                "last_checkpoint": loop.saved_at, "precision": self.precision}


class _Grids(Hook):
    """Reconstruction grids of a fixed set of images with a fixed mask, every ``run.viz_every`` steps."""

    def __init__(self, imgs: torch.Tensor, cfg: PretrainConfig, run: runs.RunDir) -> None:
        self.imgs, self.cfg, self.dir = imgs, cfg, run.images_dir

    @torch.no_grad()
    def after_log(self, loop: Loop) -> None:
        if loop.step % self.cfg.run.viz_every and loop.step != loop.s.schedule.last_step:
            return
        from maevit.viz import save_reconstruction_grid

        # the model is not put in eval mode: MAE pretraining has no dropout, and a mode switch would
        # recompile a compiled model
        path = self.dir / f"recon-{loop.step:08d}.png"
        try:  # a picture never stops a run (a full disk, an image library problem): a warning
            with loop.acc.autocast():
                save_reconstruction_grid(loop.acc.unwrap_model(loop.model), self.imgs.to(loop.acc.device), path,
                                         seed=0, mean=self.cfg.data.mean, std=self.cfg.data.std)
            log_image_file(loop.acc, "reconstruction", path, loop.step)
        except Exception as exn:  # noqa: BLE001
            logger.warning("could not draw %s (%s: %s); training goes on without it", path, type(exn).__name__,
                           str(exn).strip().splitlines()[0][:200] if str(exn).strip() else "")


class _KnnProbe(Hook):
    """The online kNN probe of the encoder: at step 0 (the random encoder) and every ``run.probe_every`` steps."""

    def __init__(self, loaders, run_cfg: RunConfig) -> None:
        self.loaders, self.cfg, self.knn = loaders, run_cfg, {}

    def on_start(self, loop: Loop) -> None:
        if loop.step == 0:
            self.probe(loop)  # the baseline: the randomly initialised encoder

    def after_log(self, loop: Loop) -> None:
        if loop.step % self.cfg.probe_every == 0 or loop.step == loop.s.schedule.last_step:
            self.probe(loop)

    def probe(self, loop: Loop) -> None:
        from maevit.train.knn import knn_accuracy

        self.knn.update(knn_accuracy(loop.acc.unwrap_model(loop.model).encoder, *self.loaders, k=self.cfg.probe_k,
                                     accelerator=loop.acc))
        loop.log(loop.step, "probe/", **self.knn)
        logger.info("kNN probe at step %d: top-1 %.2f%%  top-5 %.2f%%", loop.step, self.knn["knn_top1"],
                    self.knn["knn_top5"])


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
    return fit(PretrainTask(cfg))


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
