"""The data side of a training command: this rank's loaders, worker count, classes, and one
line on what an epoch is."""
from __future__ import annotations

import logging
import os
from typing import Any

from maevit.config import ConfigError

logger = logging.getLogger("maevit")


def resolve_num_workers(configured: int | None) -> int:
    """``data.num_workers``; None (the default) picks ``min(4, CPUs per process - 1)`` and says so."""
    if configured is not None:
        return configured
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    n = max(0, min(4, per_process - 1))
    logger.info("data.num_workers: %d loader worker(s) per process (auto, %d CPU(s) here)", n, cpus)
    return n


def describe_data(loader, batch_size: int, num_processes: int, label_fraction: float | None = None,
                  label_seed: int = 0) -> str:
    """One line on what an epoch of training data is: samples, batches, and what is left out."""
    n, per_epoch = loader.num_samples, len(loader) * batch_size * num_processes
    what = f"{n} samples"
    if label_fraction is not None and label_fraction < 1:
        what = (f"{n} labeled samples (data.label_fraction={label_fraction:g}: a class-balanced subset fixed by "
                f"data.label_seed={label_seed})")
    left = n - per_epoch
    tail = (f"; the {left} that do not fill a batch are left out of each epoch (different ones each epoch)"
            if left > 0 else "")
    return f"training data: {what}, {len(loader)} batches of {batch_size} per process per epoch{tail}"


def stream_args(data: Any, *, img_size: int, seed: int) -> dict[str, Any]:
    """The loader arguments a ``data`` section sets, named in one place: batch size, workers (resolved),
    normalisation, the image-size limit where the section has one; with the model's input size and the
    run's seed."""
    out = dict(img_size=img_size, batch_size=data.batch_size, num_workers=resolve_num_workers(data.num_workers),
               seed=seed, mean=data.mean, std=data.std)
    if hasattr(data, "max_pixels"):
        out["max_pixels"] = data.max_pixels
    return out


def label_args(data: Any) -> dict[str, Any]:
    """The label subset a labeled ``data`` section picks (``label_fraction``, ``label_seed``)."""
    return dict(label_fraction=data.label_fraction, label_seed=data.label_seed)


def unlabeled_for_rank(data: Any, acc, *, img_size: int, seed: int, **override: Any):
    """This rank's unlabeled stream (pretraining) from a ``data`` section; ``override`` changes single
    arguments (the fixed set of the reconstruction grids)."""
    from maevit.data.stream import pretrain_loader

    args = dict(
        img_size=img_size, batch_size=data.batch_size, num_workers=data.num_workers or 0, seed=seed,
        rank=acc.process_index, world_size=acc.num_processes, mode=data.mode, samples_per_epoch=data.samples_per_epoch,
        shuffle_buffer=data.shuffle_buffer, mean=data.mean, std=data.std, scale=data.scale, allow_pipe=data.allow_pipe,
        pin_memory=acc.device.type == "cuda", max_pixels=data.max_pixels, decode=data.decode,
    )
    return pretrain_loader(data.train, **{**args, **override})


def labeled_for_rank(source: str, acc, *, img_size: int, batch_size: int, train: bool, num_workers: int, seed: int,
                     label_fraction: float | None = None, label_seed: int = 0, **transform):
    """This rank's labeled stream (already split by rank: never passed to ``accelerator.prepare``)."""
    from maevit.data.stream import labeled_loader

    return labeled_loader(
        source, img_size=img_size, batch_size=batch_size, train=train, num_workers=num_workers, seed=seed,
        rank=acc.process_index, world_size=acc.num_processes, label_fraction=label_fraction, label_seed=label_seed,
        **transform,
    )


def num_classes_of(configured: int | None, loader) -> int:
    """``model.num_classes``, defaulting to (and checked against) the classes of the training data."""
    names = getattr(loader, "class_names", None)
    if names is not None and len(names) < 2:
        raise ConfigError(
            f"the training data has {len(names)} class ({', '.join(map(str, names))}): a classifier needs at least "
            f"two. If the class folders are one level further down (FOLDER/{names[0] if names else 'X'}/CLASS/IMAGE), "
            f"pass that folder as data.train.")
    if configured is None:
        if not names:
            raise ConfigError("model.num_classes is not set and the training data has no class names; set it")
        return len(names)
    if names and len(names) > configured:
        raise ConfigError(f"model.num_classes={configured} but the data has {len(names)} classes")
    return configured


def batches_from(loader, epoch: int, start_batch: int):
    """Iterate epoch ``epoch`` of a stream from batch ``start_batch`` (the stream skips the rest exactly)."""
    loader.set_epoch(epoch)
    if start_batch:
        loader.skip_batches(start_batch)
    return iter(loader)
