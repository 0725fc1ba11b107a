"""Knowledge distillation: at fine-tuning (DeiT), and optionally during MAE pretraining (DMAE).

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

During pretraining (DMAE, Bai et al., 2023; off by default): a frozen teacher
encoder (any encoder this toolkit loads) encodes the *same visible units* as
the student, and a linear projection of the student's patch tokens (the output
of one of its blocks, or of the encoder) is pulled towards the teacher's with
an L1 loss added to the pixel loss:
``loss = pixel loss + weight * |proj(student tokens) - teacher tokens|``. The
projection is trained with the MAE and saved in its training checkpoints (not
in its encoder or MAE files); the teacher is never trained nor saved.
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
from maevit.models.masking import Mask
from maevit.train.engine import Hook
from maevit.train.runs import RunDir

# --------------------------------------------------------------------------- config


@dataclass
class DistillConfig:
    """The fine-tune config's ``distill`` section (off unless ``teacher`` is set)."""

    teacher: str | None = None  # a classifier written by `maevit finetune` (RUN_DIR or .safetensors), or timm:<arch>
    weights: str | None = None  # weights of a timm:<arch> teacher (nothing is downloaded)
    type: Literal["hard", "soft"] = "hard"  # hard: CE with the teacher's argmax (DeiT); soft: KL at temperature tau
    alpha: float = 0.5  # weight of the distillation term; 1 - alpha on the label loss (DeiT: 0.5)
    tau: float = 1.0  # soft-distillation temperature (DeiT's soft runs: 3.0); unused by hard
    # images the distillation term also learns the teacher's answers on, their labels (if any) unused: e.g. the
    # whole training set when data.label_fraction keeps a few labels. Each step adds one batch of them
    unlabeled: str | None = None

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
        if self.unlabeled and not self.teacher:
            raise ConfigError(f"distill.unlabeled={self.unlabeled} needs a teacher to label those images: set "
                              "distill.teacher (a fine-tuned classifier) or leave distill.unlabeled out")
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
    labeled: int | None = None,
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
        labeled: the first ``labeled`` rows have ``targets``; the rest are images only the teacher
            labels (``distill.unlabeled``): the distillation term reads every row, the label term those.
    """
    cls_logits, dist_logits = (outputs, outputs) if isinstance(outputs, torch.Tensor) else outputs
    base = base_loss(cls_logits if labeled is None else cls_logits[:labeled], targets)
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
    def forward(self, images: torch.Tensor, mask: Mask | None = None) -> torch.Tensor:
        """Logits ``[B, C]`` for ``images`` normalised as the student's are; with a ``mask``
        (an encoder teacher, DMAE), the patch tokens ``[B, K, D]`` it gives the visible units."""
        images = self.normalize_input(images, self.student_mean, self.student_std)
        if mask is None:
            return self.model(images)
        return self.model.forward_masked(images, mask)[:, self.model.num_prefix_tokens:]


def resolve_teacher_file(path: str | os.PathLike) -> Path:
    """A fine-tune run directory -> its ``classifier.safetensors``; a file stays itself."""
    path = Path(path)
    if path.is_dir() and RunDir(path).classifier_path.is_file():
        return RunDir(path).classifier_path
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


class UnlabeledImages(Hook):
    """The images of ``distill.unlabeled``: one batch per call of :meth:`next`, epoch after epoch,
    for as long as the run lasts. Its position is saved with every checkpoint (``state["unlabeled"]``)
    and resumed from, so a resumed run draws the batches an uninterrupted one would have.

    Args:
        loader: this rank's stream of those images (``labeled_loader(..., images_only=True)``).
        source: what ``distill.unlabeled`` named, for messages.
    """

    def __init__(self, loader, source: str) -> None:
        if len(loader) == 0:
            raise ConfigError(f"distill.unlabeled={source} holds {loader.num_samples} image(s) per process, fewer than "
                              "one batch (data.batch_size): give it more images or leave it out")
        self.loader, self.source = loader, source
        self.position = {"epoch": 0, "batch": 0}
        self._batches = None

    def on_resume(self, loop, state: dict) -> None:
        self.position = dict(state.get("unlabeled", self.position))
        self._batches = None

    def before_checkpoint(self, loop, step: int) -> None:
        loop.state["unlabeled"] = dict(self.position)

    def next(self) -> torch.Tensor:
        """The next batch of images ``[B, C, H, W]`` (a new epoch when one ends)."""
        from maevit.train.inputs import batches_from

        for _ in range(2):  # the rest of this epoch, else the next one (a whole epoch without an image fails)
            if self._batches is None:
                self._batches = batches_from(self.loader, self.position["epoch"], self.position["batch"])
            images = next(self._batches, None)
            if images is not None:
                self.position = self.loader.state_dict()
                return images
            self._batches, self.position = None, {"epoch": self.position["epoch"] + 1, "batch": 0}
        raise RuntimeError(f"distill.unlabeled={self.source} gave no image in a whole epoch")


# --------------------------------------------------------------------------- during pretraining (DMAE)


@dataclass
class FeatureDistillConfig:
    """The pretrain config's ``distill`` section: DMAE-style feature distillation (off unless ``teacher`` is set)."""

    teacher: str | None = None  # a frozen encoder this toolkit loads: RUN_DIR, encoder / MAE / classifier file
    weight: float = 1.0  # weight of the L1 feature loss added to the pixel loss
    student_block: int | None = None  # student tokens: output of encoder.blocks[i] (ViT-like); None: the encoder's

    def validate(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"distill.weight must be >= 0, got {self.weight}")

    @property
    def enabled(self) -> bool:
        return bool(self.teacher)


class StudentTokens:
    """The student's patch tokens for feature distillation: the output of ``encoder.blocks[block]``
    (read by a forward hook, so the encoder's code is untouched), or of the encoder itself.

    Args:
        encoder: the MAE's encoder.
        block: a block index (negative counts from the end), or None for the encoder's output.
    """

    def __init__(self, encoder: nn.Module, block: int | None) -> None:
        self.prefix = encoder.num_prefix_tokens
        self.block = block
        self._out: torch.Tensor | None = None
        if block is not None:
            blocks = getattr(encoder, "blocks", None)
            if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not -len(blocks) <= block < len(blocks):
                have = f"{len(blocks)} blocks" if isinstance(blocks, (nn.Sequential, nn.ModuleList)) else "no `blocks`"
                raise ConfigError(
                    f"distill.student_block={block}: {type(encoder).__name__} has {have}; pass a block index of a "
                    "ViT-like encoder, or distill.student_block=null to distil the encoder's output"
                )
            blocks[block].register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args, output: torch.Tensor) -> None:
        self._out = output

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        """``latent`` (the MAE's ``[B, prefix + K, D]``) -> the chosen ``[B, K, D]`` patch tokens."""
        tokens = latent if self.block is None else self._out
        if tokens is None or tokens.shape[:2] != latent.shape[:2]:
            raise RuntimeError(f"block {self.block} gave no visible-token output of the latent's shape "
                               f"{tuple(latent.shape)}: use distill.student_block=null for this encoder")
        return tokens[:, self.prefix:]


def build_feature_teacher(
    cfg: FeatureDistillConfig,
    student: nn.Module,
    *,
    student_mean: Sequence[float],
    student_std: Sequence[float],
    device: torch.device | str = "cpu",
) -> Teacher:
    """The frozen encoder of ``cfg.teacher``, checked to encode the student's masks.

    Raises:
        ValueError: a teacher whose patches or mask units differ from the student's.
    """
    from maevit.models.classifier import create_classifier
    from maevit.models.weights import read_header

    header = read_header(cfg.teacher)
    model = create_classifier(None, 0, pretrained=cfg.teacher, global_pool=None)  # the file names its encoder
    if not hasattr(model, "forward_masked"):
        raise ValueError(f"distill.teacher={cfg.teacher} is not an encoder with a masked path (a timm classifier?): "
                         "pass an MAE run, an encoder or a classifier file of a registered model")
    mine = (tuple(student.img_size), student.patch_size, student.mask_unit)
    theirs = (tuple(model.img_size), model.patch_size, model.mask_unit)
    if mine != theirs:
        raise ValueError(
            f"the teacher {cfg.teacher} sees (img_size, patch_size, mask_unit) = {theirs}, the student {mine}: "
            "the teacher encodes the student's visible units, so both need the same patches and mask units"
        )
    mean, std = header.get("mean", student_mean), header.get("std", student_std)
    teacher = Teacher(model, mean, std, student_mean, student_std).to(device)
    teacher.source = str(cfg.teacher)
    return teacher


def feature_distill_loss(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, proj: nn.Module) -> torch.Tensor:
    """Mean L1 between ``proj(student_tokens) [B, K, Dt]`` and ``teacher_tokens [B, K, Dt]``."""
    return F.l1_loss(proj(student_tokens).float(), teacher_tokens.float())
