"""Knowledge distillation at fine-tuning (DeiT): losses, the config section and a frozen teacher.

DeiT (Touvron et al., 2021) adds a distillation token whose head learns from a
teacher, next to the class token's head that learns from the labels:

    loss = (1 - alpha) * base_loss(cls_logits, targets) + alpha * distillation(dist_logits, teacher_logits)

with *hard* distillation (cross-entropy against the teacher's argmax; DeiT's
choice, alpha 0.5, best with a CNN teacher) or *soft* distillation (KL between
the softened distributions at temperature tau, scaled by tau^2). ``targets`` are
the batch's (mixup / cutmix) targets and the teacher sees the same augmented
images, as in DeiT. A student without a distillation head (a plain ViT) gets
the same logits in both terms: classic knowledge distillation.

timm 1.0.26+ ships this as ``timm.task.TokenDistillationTask``; it is not used
as a whole because it wraps the student itself (its own DDP set-up, where
Accelerate owns devices and processes here) and reads the student's input
normalisation from a ``pretrained_cfg`` that maevit encoders do not have. Its
teacher wrapper, ``DistillationTeacher`` (eval mode, conversion between the
student's and the teacher's input normalisation), is reused by :class:`Teacher`.
The loss formulas follow timm's task and DeiT's code; the one difference from
DeiT's code is the soft loss's reduction: the mean over samples (timm's
``batchmean``, a true KL per sample) where DeiT divides the summed KL by
``batch x classes``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from timm.task.distillation import DistillationTeacher
from torch import nn

from maevit.config import ConfigError

# --------------------------------------------------------------------------- config


@dataclass
class DistillConfig:
    """The fine-tune config's ``distill`` section (off unless ``teacher`` is set)."""

    teacher: str | None = None  # a classifier written by `maevit finetune` (RUN_DIR or .safetensors), or timm:<arch>
    weights: str | None = None  # weights of a timm:<arch> teacher (nothing is downloaded)
    type: Literal["hard", "soft"] = "hard"  # hard: CE with the teacher's argmax (DeiT); soft: KL at temperature tau
    alpha: float = 0.5  # weight of the distillation term; 1 - alpha on the label loss (DeiT: 0.5)
    tau: float = 1.0  # soft-distillation temperature (DeiT's soft runs: 3.0); unused by hard

    def validate(self) -> None:
        if self.type not in ("hard", "soft"):
            raise ConfigError(f"distill.type={self.type!r}: use 'hard' (DeiT) or 'soft'")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"distill.alpha must be in [0, 1], got {self.alpha}")
        if self.tau <= 0:
            raise ConfigError(f"distill.tau must be positive, got {self.tau}")
        if self.teacher and self.teacher.startswith("timm:") and not self.weights:
            raise ConfigError(
                f"distill.teacher={self.teacher} has no weights: maevit downloads nothing, and an untrained "
                "teacher teaches nothing. Fine-tune it first (`maevit finetune model.name=" + self.teacher
                + " ...`) and pass its RUN_DIR/classifier.safetensors as distill.teacher, or give its weights "
                "file as distill.weights"
            )
        if self.weights and not (self.teacher or "").startswith("timm:"):
            raise ConfigError("distill.weights is for a timm:<arch> teacher; a maevit classifier file carries its "
                              "own architecture (set distill.teacher to the file and leave distill.weights out)")

    @property
    def enabled(self) -> bool:
        return bool(self.teacher)

    def loss(self, outputs, targets: torch.Tensor, teacher_logits: torch.Tensor,
             base_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The training loss of this section's :func:`distillation_loss` (type, alpha, tau)."""
        return distillation_loss(outputs, targets, teacher_logits, base_loss, kind=self.type, alpha=self.alpha,
                                 tau=self.tau).loss


# --------------------------------------------------------------------------- losses


def hard_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``student_logits [B, C]`` against the teacher's argmax (DeiT's hard distillation)."""
    return F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))


def soft_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """``tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))``, mean over the batch.

    The ``tau^2`` keeps the gradient's scale independent of the temperature (Hinton et al.).
    """
    log_p_student = F.log_softmax(student_logits.float() / tau, dim=-1)  # [B, C]
    log_p_teacher = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * tau**2


class DistillLoss(NamedTuple):
    """``loss`` (what is optimised) and its two terms (for logging)."""

    loss: torch.Tensor
    base: torch.Tensor
    distill: torch.Tensor


def distillation_loss(
    outputs: torch.Tensor | Sequence[torch.Tensor],
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    base_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    kind: Literal["hard", "soft"] = "hard",
    alpha: float = 0.5,
    tau: float = 1.0,
) -> DistillLoss:
    """``(1 - alpha) * base_loss(cls_logits, targets) + alpha * distillation(dist_logits, teacher_logits)``.

    Args:
        outputs: ``(cls_logits, dist_logits)`` (a DeiT in distilled training), or one
            ``[B, C]`` tensor used for both terms (a student without a distillation head).
        targets: labels ``[B]`` or mixup / cutmix soft targets ``[B, C]``, whatever ``base_loss`` takes.
        teacher_logits: ``[B, C]`` for the same (augmented) images.
        base_loss: the label loss (e.g. timm's ``SoftTargetCrossEntropy``).
        kind: ``hard`` or ``soft``.
        alpha: weight of the distillation term.
        tau: temperature of the soft term.
    """
    cls_logits, dist_logits = (outputs, outputs) if isinstance(outputs, torch.Tensor) else outputs
    base = base_loss(cls_logits, targets)
    if kind == "hard":
        dist = hard_distillation_loss(dist_logits, teacher_logits)
    elif kind == "soft":
        dist = soft_distillation_loss(dist_logits, teacher_logits, tau)
    else:
        raise ValueError(f"kind={kind!r}: use 'hard' or 'soft'")
    return DistillLoss((1.0 - alpha) * base + alpha * dist, base.detach(), dist.detach())


# --------------------------------------------------------------------------- teacher


class Teacher(DistillationTeacher):
    """A frozen classifier: always in eval mode, no parameter takes a gradient, forward under ``no_grad``.

    Keep it outside the modules handed to the optimizer and to checkpointing
    (and outside ``accelerator.prepare``): it is rebuilt from its file on resume.
    Call it under the run's autocast so it runs at the run's precision.

    Args:
        model: the teacher classifier.
        mean, std: the input normalisation the teacher was trained with.
        student_mean, student_std: the normalisation of the images it is given.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float],
                 student_mean: Sequence[float], student_std: Sequence[float]) -> None:
        super().__init__(model)
        c = len(mean)
        self.mean_kd = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)  # the teacher's normalisation
        self.std_kd = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
        self.register_buffer("student_mean", torch.tensor(student_mean, dtype=torch.float32).view(1, c, 1, 1),
                             persistent=False)
        self.register_buffer("student_std", torch.tensor(student_std, dtype=torch.float32).view(1, c, 1, 1),
                             persistent=False)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "Teacher":
        """Stays in eval mode whatever is asked (a parent's ``.train()`` must not wake dropout / batch norm)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` for ``images`` normalised as the student's are."""
        return self.model(self.normalize_input(images, self.student_mean, self.student_std))


def resolve_teacher_file(path: str | os.PathLike) -> Path:
    """A fine-tune run directory -> its ``classifier.safetensors``; a file stays itself."""
    path = Path(path)
    if path.is_dir() and (path / "classifier.safetensors").is_file():
        return path / "classifier.safetensors"
    if not path.exists():
        raise FileNotFoundError(
            f"distill.teacher={path} does not exist: pass a run directory of `maevit finetune` (it holds "
            "classifier.safetensors), a classifier .safetensors file, or timm:<arch> with distill.weights"
        )
    if path.is_dir():
        raise FileNotFoundError(f"distill.teacher={path} is a directory without classifier.safetensors: is the "
                                "teacher's fine-tuning finished? Pass the run directory once it has written it")
    return path


def build_teacher(
    cfg: DistillConfig,
    *,
    num_classes: int,
    student_mean: Sequence[float],
    student_std: Sequence[float],
    device: torch.device | str = "cpu",
) -> Teacher:
    """The frozen teacher of ``cfg`` (``cfg.enabled`` must be true).

    Args:
        cfg: the ``distill`` section.
        num_classes: the student's classes (the teacher must predict the same ones).
        student_mean, student_std: the student's input normalisation.
        device: where the teacher runs.

    Raises:
        ValueError: a teacher for another number of classes, or not a classifier.
    """
    from maevit.models.classifier import create_classifier
    from maevit.models.weights import read_header

    if cfg.teacher.startswith("timm:"):
        model = create_classifier(cfg.teacher, num_classes, pretrained=cfg.weights, global_pool=None)
        mean, std = model.pretrained_cfg.get("mean"), model.pretrained_cfg.get("std")  # timm's, for its weights
        source = f"{cfg.teacher} with {cfg.weights}"
    else:
        path = resolve_teacher_file(cfg.teacher)
        header = read_header(path)
        if header.get("kind") != "classifier" or not header.get("num_classes"):
            raise ValueError(
                f"distill.teacher={path} is not a classifier written by `maevit finetune` (its header says kind="
                f"{header.get('kind')!r}): fine-tune the teacher first and pass its classifier file, or pass "
                "timm:<arch> with distill.weights for other timm weights"
            )
        if header["num_classes"] != num_classes:
            raise ValueError(
                f"the teacher {path} predicts {header['num_classes']} classes, the student {num_classes}: "
                "distil from a teacher fine-tuned on the same labels"
            )
        model = create_classifier(None, num_classes, pretrained=path, global_pool=None)
        mean, std = header.get("mean", student_mean), header.get("std", student_std)
        source = str(path)
    teacher = Teacher(model, mean, std, student_mean, student_std).to(device)
    teacher.source = source
    return teacher
