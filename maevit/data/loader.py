"""The loader: `StreamLoader` (epochs, exact resume by batch skipping, skip statistics) and the
public constructors `pretrain_loader` / `labeled_loader`."""
from __future__ import annotations

import atexit
import logging
import weakref
from dataclasses import replace
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from .transforms import (
    DEFAULT_MAX_PIXELS,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    PretrainTransform,
    labeled_transform,
)
from .labels import label_map
from .sources import STAT_KEYS, DataSourceError, Source, _first_tar_has_labels, resolve_source
from .split import _Spec, _StreamDataset, batches_per_rank, select_fraction

log = logging.getLogger("maevit.data.stream")  # the name the warnings have always had


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------

def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C reaches every process of the terminal's group, and schedulers send SIGTERM / SIGUSR1 to every
    # process of a job: the training loop handles them (saves a checkpoint at the next step), so loader
    # workers must keep serving batches until it is done (they end with the loader, or when it dies)
    import signal

    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def _import_worker_modules() -> None:
    """Import, in this process, the modules the workers import lazily, so that forked workers inherit them:
    ``torchvision.transforms.v2.functional`` pulls in ``torch._dynamo`` (~1.9 s of CPU), and every epoch
    starts new workers, which would otherwise import it again each time."""
    import torchvision.io  # noqa: F401
    import torchvision.transforms.v2.functional  # noqa: F401


_WARMING: "weakref.WeakSet[StreamLoader]" = weakref.WeakSet()


@atexit.register  # runs before multiprocessing's exit hook (registered earlier), which would wait forever
def _close_warm_loaders() -> None:  # for workers that ignore SIGTERM (see _ignore_sigint)
    for loader in list(_WARMING):
        loader.close()


class StreamLoader:
    """Iterable over batches of one rank; see the module docstring for the split rules.

    Yields `images [B, 3, H, W]` (float32, normalized) for pretraining, or
    `(images, labels [B] int64)` for labeled data.

    Attributes:
        num_samples: samples in the source (after `label_fraction`), all ranks together.
        class_names: class names (labeled sources) or None.
        batch_size, rank, world_size, num_workers, epoch.
    """

    def __init__(self, spec: _Spec, source: Source, *, pin_memory: bool = False, prefetch_factor: int = 2) -> None:
        if source.num_samples == 0:
            raise DataSourceError(
                f"{source.description} has no readable samples (see the warnings above for why); check that it "
                f"is the data you meant, or rewrite it with `maevit shards write`.")
        if spec.mode != "eval" and batches_per_rank(spec) == 0:
            most = source.num_samples // spec.world_size
            raise DataSourceError(
                f"{source.description}: {source.num_samples} samples are fewer than one batch of "
                f"{spec.batch_size} per process ({spec.world_size} process(es)): lower the batch size "
                f"(data.batch_size) to at most {most}, or use more data."
            )
        self._spec, self._source = spec, source
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.class_names = source.class_names
        self.num_samples = source.num_samples
        self.batch_size, self.rank, self.world_size = spec.batch_size, spec.rank, spec.world_size
        self.num_workers = spec.num_workers  # (part of the data layout an elastic resume replays)
        self._skipped = dict.fromkeys(STAT_KEYS, 0)
        self._position = 0  # batches yielded in the current epoch (state_dict)
        self._warm: tuple[_Spec, Any] | None = None  # the next epoch's loader, started before this one ends

    @property
    def epoch(self) -> int:
        return self._spec.epoch

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) if self.class_names is not None else None

    def __len__(self) -> int:
        return batches_per_rank(self._spec)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next `iter()` streams (reshuffles units, buffer and augmentation)."""
        self._spec.epoch = int(epoch)

    def skip_batches(self, n: int) -> None:
        """Make the next `iter()` start at batch `n` of the epoch, with the data an uninterrupted
        run would see from there. Skipped batches are read but not decoded."""
        if n < 0:
            raise ValueError(f"skip_batches(n) needs n >= 0, got {n}.")
        self._spec.start_batch = int(n)

    def set_elastic(self, resume: Any) -> None:
        """Stream the rest of epoch ``resume.epoch`` without the samples a run on ``resume.world`` processes
        had seen (an :class:`~maevit.data.elastic.ElasticResume`; see that module). Batch positions of that
        epoch stay in this loader's units (``resume.offset`` is where the rest starts)."""
        self._spec.elastic = resume

    def state_dict(self) -> dict[str, int]:
        """Position to resume from: `{"epoch", "batch"}` (batches already yielded this epoch)."""
        return {"epoch": self._spec.epoch, "batch": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_epoch(state["epoch"])
        self.skip_batches(state["batch"])

    def stats(self) -> dict[str, int]:
        """Samples skipped so far by the batches this loader yielded, by kind (`STAT_KEYS`;
        all epochs, all workers of this rank; each sample once per epoch)."""
        return dict(self._skipped)

    def _loader(self, spec: _Spec) -> Any:
        ds = _StreamDataset(spec)
        if spec.num_workers <= 0:
            return iter(ds)
        _import_worker_modules()
        return iter(DataLoader(
            ds, batch_size=None, num_workers=spec.num_workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor, persistent_workers=False,
            # A private generator: creating the loader must not consume the training RNG.
            generator=torch.Generator().manual_seed(spec.seed),
            worker_init_fn=_ignore_sigint,
        ))

    def _warm_next_epoch(self, spec: _Spec) -> None:
        """Start the workers of epoch ``spec.epoch + 1`` now, so that they open their shards and fill their
        shuffle buffers while the last batches of this epoch train (else every epoch starts with an idle
        wait: ~1 s per epoch on 2 cores, 12% of a 7-step fine-tuning epoch). The next ``iter()`` takes it
        over when it asks for exactly that epoch from its start; anything else discards it. DataLoader's
        ``persistent_workers`` cannot do this: it keeps the dataset object, and a stream's epoch, position
        and elastic plan live in the dataset."""
        nxt = replace(spec, epoch=spec.epoch + 1, start_batch=0)
        self._warm = (nxt, self._loader(nxt))
        _WARMING.add(self)

    def close(self) -> None:
        """Stop the workers of a next epoch started in advance (if any); the loader stays usable."""
        self._warm = None  # the last reference: the DataLoader iterator shuts its workers down

    def _take_warm(self, spec: _Spec) -> Any:
        warm, self._warm = self._warm, None
        if warm is not None and warm[0] == spec:
            return warm[1]
        return self._loader(spec)

    def __iter__(self) -> Iterator[Any]:
        labeled = self._spec.labeled
        for item in self.records():
            if len(item["images"]) == 0:
                continue
            yield (item["images"], item["labels"]) if labeled else item["images"]

    def records(self) -> Iterator[dict[str, Any]]:
        """Every batch of the epoch as ``{"images", "labels", "keys", "order"}``, in order, including batches
        left empty by unreadable samples (so a caller can count batches: ``maevit embed`` writes parts of a
        fixed number of batches). Labels are -1 for unlabeled data. In eval mode (``eval_loader``), ``keys``
        are the samples' keys and ``order`` ints that sort them into source order: with loader workers,
        batch b comes from worker b % W, which reads its own contiguous stretch of the source, so batches
        arrive interleaved (empty lists in other modes)."""
        spec = replace(self._spec)  # snapshot: set_epoch during iteration affects the next one only
        self._spec.start_batch = 0  # skip_batches applies to one iteration
        self._position = spec.start_batch
        before, yielded = dict(self._skipped), 0
        total = batches_per_rank(spec) if spec.mode != "eval" else None
        ahead = max(2, spec.num_workers * self.prefetch_factor)  # batches before the end to start the next epoch
        for item in self._take_warm(spec):
            for k, v in item["skipped"].items():
                self._skipped[k] += v
            self._position += 1
            yielded += len(item["images"]) > 0
            if (total is not None and spec.num_workers > 0 and self._warm is None and spec.elastic is None
                    and self._position == max(spec.start_batch + 1, total - ahead)):
                self._warm_next_epoch(spec)
            yield item
        if yielded == 0 and spec.start_batch == 0 and batches_per_rank(spec) > 0:
            # a whole pass without one sample: another pass would find the same (and loop forever)
            kinds = {k: self._skipped[k] - before.get(k, 0) for k in self._skipped}
            why = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in kinds.items() if v) or "no sample was read"
            raise DataSourceError(
                f"{self._source.description}: a whole pass (epoch {spec.epoch}, process {spec.rank}) found no "
                f"readable sample ({why}). Stopping instead of repeating it: check the data with "
                f"`maevit shards check`, or rewrite it with `maevit shards write`.")


# ---------------------------------------------------------------------------------------------
# Public constructors
# ---------------------------------------------------------------------------------------------

def _check_rank(rank: int, world_size: int, batch_size: int, num_workers: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}.")
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}.")


def _pretrain_transform(decode: str) -> type:
    if decode == "device":
        from .device_decode import DeviceDecodeTransform

        return DeviceDecodeTransform
    return PretrainTransform


def pretrain_loader(
    source: Any,
    *,
    img_size: int | Sequence[int],
    batch_size: int,
    num_workers: int = 2,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    mode: str = "exact",
    samples_per_epoch: int | None = None,
    shuffle_buffer: int = 1000,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    scale: tuple[float, float] = (0.2, 1.0),
    allow_pipe: bool = False,
    drop_last: bool = True,
    draft: bool = True,
    pin_memory: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    decode: str = "worker",
) -> StreamLoader:
    """MAE pretraining stream: crop-aware RandomResizedCrop + flip + normalize.

    Args:
        source: shard dir / dataset.json / pattern / list / URL / image folder / "bundled[:split]".
        img_size: output size (int or (H, W)).
        batch_size: per-rank batch size.
        num_workers: DataLoader worker processes (0: in this process).
        seed: base seed; the stream is a function of (seed, epoch, rank, world_size, num_workers).
        rank, world_size: this process and the number of processes.
        mode: "exact" (each sample once per epoch, see module docstring) or "resampled".
        samples_per_epoch: epoch length for "resampled" (all ranks together; default: dataset size).
        shuffle_buffer: samples held for shuffling (raw bytes, before decoding).
        mean, std: normalization.
        scale: RandomResizedCrop area range.
        allow_pipe: accept `pipe:` shard URLs (they run shell commands).
        drop_last: True: leave out the incomplete tail; False: wrap around to fill it.
        draft: crop-aware reduced-scale JPEG decoding.
        pin_memory: pin batches (GPU training).
        max_pixels: images with more pixels are skipped and counted (`oversized_image`); None / 0: no limit.
        decode: "worker" (decode + crop in the loader workers) or "device": workers only draw the
            crop and flip; JPEGs are decoded by `batch.to(device)` (see `maevit.data.device_decode`).

    Returns:
        A `StreamLoader` yielding float tensors `[B, 3, H, W]` (with decode="device", batches
        whose `.to(device)` gives that tensor).
    """
    if mode not in ("exact", "resampled"):
        raise ValueError(f"mode must be 'exact' or 'resampled', got {mode!r}.")
    if decode not in ("worker", "device"):
        raise ValueError(f"decode must be 'worker' or 'device', got {decode!r}.")
    _check_rank(rank, world_size, batch_size, num_workers)
    src = resolve_source(source, allow_pipe=allow_pipe, need_counts=mode == "exact")
    if mode == "resampled" and samples_per_epoch is None and not src.counts_known:
        raise DataSourceError("mode='resampled' on shards without counts needs samples_per_epoch "
                              "(data.samples_per_epoch, all processes together).")
    spec = _Spec(
        src.units, batch_size, seed, rank, world_size, num_workers, mode, drop_last, shuffle_buffer,
        samples_per_epoch, False, _pretrain_transform(decode)(img_size, scale=scale, draft=draft),
        tuple(mean), tuple(std), max_pixels=max_pixels,
    )
    return StreamLoader(spec, src, pin_memory=pin_memory)


def eval_loader(
    source: Any,
    *,
    img_size: int | Sequence[int],
    batch_size: int,
    num_workers: int = 2,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    interpolation: str = "bicubic",
    crop_pct: float | None = None,
    allow_pipe: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> StreamLoader:
    """Every sample once, in source order, with the evaluation transform of `labeled_loader(train=False)`;
    labeled or not (labels -1 when the source has none). `records()` adds each sample's key.

    For commands that read a whole source as it is (``maevit embed``); unreadable samples are dropped
    and counted, as in evaluation.
    """
    _check_rank(0, 1, batch_size, num_workers)
    src = resolve_source(source, allow_pipe=allow_pipe, need_counts=True)
    labeled = src.class_names is not None or (not src.indexed and any(u.kind == "tar" for u in src.units)
                                              and _first_tar_has_labels(src))
    tf = labeled_transform(img_size, False, mean=mean, std=std, interpolation=interpolation, crop_pct=crop_pct)
    spec = _Spec(src.units, batch_size, 0, 0, 1, num_workers, "eval", False, 0, None, labeled, tf, tuple(mean),
                 tuple(std), max_pixels=max_pixels)
    return StreamLoader(spec, src)


def labeled_loader(
    source: Any,
    *,
    img_size: int | Sequence[int],
    batch_size: int,
    train: bool,
    num_workers: int = 2,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    label_fraction: float | None = None,
    label_seed: int = 0,
    shuffle_buffer: int = 1000,
    drop_last: bool | None = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    re_prob: float = 0.25,
    color_jitter: float | None = None,
    scale: tuple[float, float] | None = None,
    hflip: float = 0.5,
    interpolation: str = "bicubic",
    crop_pct: float | None = None,
    allow_pipe: bool = False,
    pin_memory: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    class_names: Sequence[str] | None = None,
    classes_from: str = "the model",
    images_only: bool = False,
) -> StreamLoader:
    """Labeled stream for fine-tuning (train=True) or evaluation (train=False).

    train=True: exact epochs like `pretrain_loader` with timm's training transform.
    train=False: resize + center crop, source order, every sample exactly once across
    ranks, no padding (ranks may differ by one batch; the last batch may be short).

    Args:
        source: a labeled source: class-per-folder tree, shards with `.cls`, "bundled:train|val".
        img_size: output size.
        batch_size: per-rank batch size.
        train: training augmentation + shuffling, or evaluation.
        num_workers, seed, rank, world_size, shuffle_buffer, allow_pipe, pin_memory, max_pixels: as in
            `pretrain_loader`.
        label_fraction: use a fixed class-balanced fraction of the labels (e.g. 0.1).
        label_seed: picks that subset; kept separate from `seed` so runs with different seeds
            see the same labeled samples.
        drop_last: train only (default True); eval never drops.
        mean, std, auto_augment, re_prob, color_jitter, scale, hflip, interpolation, crop_pct:
            transform options (see `transforms.labeled_transform`).
        class_names: the model's classes (e.g. the training data's, or a classifier file's): labels
            are mapped to them by name, and a class outside them is an error before any batch.
        classes_from: what ``class_names`` come from, for that error message.
        images_only: the same stream of the images alone, labeled or not (a teacher labels them:
            ``distill.unlabeled``); ``label_fraction`` and ``class_names`` do not apply.

    Returns:
        A `StreamLoader` yielding `(images [B, 3, H, W], labels [B] int64)` (`images` alone with
        ``images_only``).
    """
    _check_rank(rank, world_size, batch_size, num_workers)
    src = resolve_source(source, allow_pipe=allow_pipe, need_counts=True)
    mapping = None
    if not images_only:  # labels: the data has them, mapped to the model's classes, maybe a subset
        if src.class_names is None and (src.indexed or not any(u.kind == "tar" for u in src.units)
                                        or not _first_tar_has_labels(src)):
            hint = ""
            if src.description.startswith("image folder "):
                hint = (f" If {src.description[len('image folder '):]} is the folder of one class, pass the folder "
                        f"above it (the one whose sub-folders are the classes).")
            raise DataSourceError(
                f"{src.description} has no labels (unlabeled data given to a labeled command): labeled data is a "
                f"class-per-folder tree (root/<class>/<image>) or shards with .cls members (`maevit shards write` of "
                f"a class-per-folder tree writes them).{hint}"
            )
        if class_names is not None and src.class_names is not None:
            mapping = label_map(src.class_names, class_names, data=src.description, model=classes_from)
        elif class_names is not None:
            log.warning("%s carries no class names: its integer labels are taken as indices into %s's classes",
                        src.description, classes_from)
        if label_fraction is not None and label_fraction < 1:
            src = select_fraction(src, label_fraction, label_seed)
        if mapping is not None:  # the loader reports the model's classes: its labels are now theirs
            src = replace(src, class_names=list(class_names))
    tf = labeled_transform(
        img_size, train, mean=mean, std=std, auto_augment=auto_augment, re_prob=re_prob,
        color_jitter=color_jitter, scale=scale, hflip=hflip, interpolation=interpolation, crop_pct=crop_pct,
    )
    spec = _Spec(
        src.units, batch_size, seed, rank, world_size, num_workers, "exact" if train else "eval",
        True if drop_last is None else drop_last, shuffle_buffer, None, not images_only, tf, tuple(mean), tuple(std),
        max_pixels=max_pixels, label_map=mapping,
    )
    return StreamLoader(spec, src, pin_memory=pin_memory)
