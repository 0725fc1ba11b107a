"""Config sections every training command shares, and the constants their defaults use.

``maevit pretrain``, ``finetune`` and ``probe`` each build their config from these
bases, adding or overriding only their own fields and defaults.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from maevit.config import ConfigError

IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)
Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class RunBase:
    """Run-directory fields every training command has (pretrain / finetune extend it)."""

    dir: str = "runs/run"  # run directory: config, metrics, checkpoints, images, weights
    seed: int = 0
    precision: Precision = "auto"  # auto: bf16 where native and faster (GPUs; CPUs with bf16 units), else fp32
    log_every: int = 50  # optimizer steps between metric rows (the only host syncs)
    keep_last: int = 2  # checkpoints kept
    max_nonfinite: int = 10  # stop after this many non-finite steps in a row
    fresh: bool = False  # start over even if RUN_DIR has a checkpoint (old run moved aside)
    progress: bool = True  # tqdm progress bar on the main process

    def validate(self) -> None:
        for key in ("log_every", "keep_last", "max_nonfinite"):
            if getattr(self, key) < 1:
                raise ConfigError(f"run.{key} must be >= 1, got {getattr(self, key)}")
