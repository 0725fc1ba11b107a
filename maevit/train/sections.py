"""Config sections every training command shares, and the constants their defaults use.

``maevit pretrain``, ``finetune`` and ``probe`` each build their config from these
bases, adding or overriding only their own fields and defaults (a field redeclared in a
command's section changes its default or its ``--help`` line there). A command's
section lists its keys in ``KEY_ORDER`` where its order differs from the bases' (the
order of ``--help``, ``--print-config`` and ``config.yaml``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from maevit.config import ConfigError
from maevit.train.trackers import Tracker

IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)
Precision = Literal["auto", "fp32", "bf16", "fp16"]
DEFAULT_IMG_SIZE = 224  # ImageNet's, when neither the config nor a weights file says


@dataclass
class RunSection:
    """``run``: where a command writes, with what seed and precision (the probe has only these)."""

    dir: str = "runs/run"  # run directory: config, metrics, checkpoints, images, weights
    seed: int = 0
    precision: Precision = "auto"  # auto: bf16 on GPUs with native bf16 and CPUs with AMX-bf16, else fp32
    fresh: bool = False  # start over even if RUN_DIR has a checkpoint (old run moved aside)
    # experiment tracker (Accelerate's): hyper-parameters, metrics, reconstruction grids, curves;
    # auto: tensorboard (RUN_DIR/tensorboard) where installed, else none (metrics.jsonl only)
    tracker: Tracker = "auto"

    def validate(self) -> None:
        if not str(self.dir).strip():
            raise ConfigError("run.dir is empty: name the folder this run writes to (e.g. run.dir=runs/my-run)")


@dataclass
class ModelSection:
    """``model``: which encoder, at what input size, with which extra constructor arguments."""

    name: str | None = None  # registered name; None: the one `pretrained` names
    img_size: int = 224  # input side in pixels (position tables are resampled)
    args: dict[str, Any] = field(default_factory=dict)  # encoder arguments on top of the file's


@dataclass
class ClassifierModelSection(ModelSection):
    """``model`` of the commands that train a classifier on a (pretrained) encoder: fine-tuning, probing."""

    pretrained: str | None = None  # RUN_DIR, encoder / classifier file, MAE .pth, HF / timm weights; None: scratch
    num_classes: int | None = None  # default: the number of classes in data.train
    global_pool: Literal["avg", "token"] = "avg"  # how the head pools the tokens
    img_size: int | None = None  # input side; None: the size `pretrained` was trained at (else 224)


@dataclass
class DataSection:
    """``data``: the training source and how it is batched and normalised."""

    train: str = ""  # shard dir / pattern, class-per-folder tree, or "bundled[:split]"
    batch_size: int = 64  # per process
    num_workers: int | None = None  # loader processes per rank; None: min(4, CPUs per process - 1)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # input normalisation: use the pretraining's
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class LabeledDataSection(DataSection):
    """``data`` of the commands that read labels: a validation source and a fixed fraction of the labels."""

    val: str | None = None  # evaluated during or after training; None = no evaluation
    label_fraction: float | None = None  # e.g. 0.1: a fixed, class-balanced subset of the labels
    label_seed: int = 0  # picks that subset
    mean: tuple[float, float, float] | None = None  # input normalisation; None: the pretraining's (else ImageNet's)
    std: tuple[float, float, float] | None = None  # None: the pretraining's (else ImageNet's)


@dataclass
class OptimSection:
    """``optim``: the schedule (linear warm-up, then per-step cosine) and weight decay."""

    epochs: int = 100  # length of the schedule
    weight_decay: float = 0.05  # not on biases, norms, position tables, tokens
    warmup_epochs: float = 5.0  # linear warm-up, then per-step cosine decay
    min_lr: float = 0.0  # the lr at the end of the cosine


@dataclass
class AdamWSection(OptimSection):
    """``optim`` of the AdamW commands (pretraining, fine-tuning): lr scaled with the batch, accumulation,
    clipping, an early stop."""

    base_lr: float = 1.5e-4  # lr = base_lr x effective batch / 256
    accum_steps: int = 1  # gradient accumulation (micro-batches per optimizer step)
    clip_grad: float | None = None  # max gradient norm; None: no clipping
    max_steps: int | None = None  # stop early after this many optimizer steps (the schedule still spans `epochs`)

    def validate(self) -> None:
        if self.accum_steps < 1:
            raise ConfigError(f"optim.accum_steps must be >= 1, got {self.accum_steps}")


@dataclass
class RunBase(RunSection):
    """``run`` of the commands on the loop with checkpoints (pretrain / finetune extend it)."""

    KEY_ORDER = ("dir", "seed", "precision", "log_every", "keep_last", "max_nonfinite", "fresh", "progress",
                 "hang_timeout")

    log_every: int = 50  # optimizer steps between metric rows (the only host syncs)
    keep_last: int = 2  # checkpoints kept
    max_nonfinite: int = 10  # stop after this many non-finite steps in a row
    progress: bool = True  # tqdm progress bar on the main process
    # seconds without a finished optimizer step before a rank ends the job, naming the rank that stopped
    # (a frozen process, a stuck file system); evaluation and checkpoints are not counted; 0: off
    hang_timeout: int = 1800

    def validate(self) -> None:
        super().validate()
        for key in ("log_every", "keep_last", "max_nonfinite"):
            if getattr(self, key) < 1:
                raise ConfigError(f"run.{key} must be >= 1, got {getattr(self, key)}")
