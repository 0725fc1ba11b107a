"""Streaming data for pretraining, fine-tuning and evaluation, built on webdataset: the public names.

One concept per module: :mod:`~maevit.data.sources` (what a source string
names), :mod:`~maevit.data.tars` (reading samples, error accounting),
:mod:`~maevit.data.split` (split arithmetic, the worker dataset),
:mod:`~maevit.data.loader` (``StreamLoader`` and the constructors); this module
re-exports what callers use and records the design.

Sources: a shard directory holding `dataset.json` (written by `maevit shards
write`), a `dataset.json` path or URL, a shard pattern (`train-{000000..000099}.tar`),
a glob, a list of shards / URLs, a plain image folder (unlabeled, or one
sub-folder per class), "bundled[:train|val]" (procedural shapes) or
"sample[:train|val]" (the CIFAR-10 photos shipped in the package, `data/sample.py`).

What webdataset gives us and we use: URL expansion (braces, `::`), tar member
iteration and grouping of members into samples, the shuffle buffer, and `gopen`
for `pipe:` URLs only. Remote shards (`s3://`, `gs://`, `az://`, `hf://`,
`http(s)://`, `memory://`, ...) are read by :mod:`~maevit.data.remote` (fsspec,
and a stdlib HTTP reader with Range-resume) with bounded read-ahead, timeouts and
retries; a shard that stays unreachable is counted like a truncated local tar.
What we write by hand, and why:

* **The exact-epoch split.** webdataset splits whole shards by node and worker,
  so ranks get different sample counts (DDP hangs when one rank stops early)
  and `with_epoch` counts per worker. Here, every epoch, the *units* (shards, or
  files of an image folder) are permuted from `(seed, epoch)` identically on
  all ranks and concatenated into one virtual sequence of T samples. Rank r
  takes the contiguous range `[r*S, (r+1)*S)` with `S = N*B` samples, `N`
  batches per rank (`N = T // (world*B)` with `drop_last=True`: fewer than
  world*B samples at the end of the permuted sequence are left out this epoch;
  with `drop_last=False`, `N = ceil(T / (world*B))` and the range wraps to the
  start of the sequence, repeating fewer than world*B samples). Inside a rank,
  logical worker `l` owns batches `b` with `b % W == l` and reads the contiguous
  sub-range holding exactly those batches' samples. A unit that straddles two
  ranges is read by both, each skipping the other's samples without decoding.
* **Error handling.** webdataset's `warn_and_continue` sleeps 0.5 s per bad
  sample. Here bad samples are counted, logged at a limited rate, never sleep
  and never raise. Unreadable tars and samples without an image are dropped
  before the shuffle, and the worker refills its quota by wrapping around its
  own range. Images that fail to *decode* (or exceed `max_pixels`) are
  replaced, in the same batch, by another sample of that batch (its own
  augmentation), so batch counts and the data of every later batch do not
  depend on decoding; this is what makes resume exact without decoding skipped
  batches.
* **Skip counts.** Counts are of samples, by kind (`STAT_KEYS`), each sample
  once per epoch under one kind however often a refill re-reads it:
  `corrupt_image` (the image does not decode), `oversized_image` (over
  `max_pixels`), `missing_image` (no image member), `missing_label` (labeled
  data without `.cls`), `bad_member` (the sample's image member could not be
  read from its tar), `unreadable_shard` (the sample never came out of its
  shard: the tar or file is unreadable, cut short, or holds fewer samples than
  its index lists). Each batch carries the counts of the samples skipped while
  it was made, so the main process adds them up exactly once
  (`StreamLoader.stats()`); batches skipped on resume carry none.
* **Decoding.** Only image members (PIL) and `.cls` / `.txt` / `.json` (text)
  are read. `.pyd`, `.pth`, `.pickle`, ... are never even extracted from the
  tar, so nothing is unpickled or `torch.load`-ed.
* **Determinism.** Every random choice (unit permutation, shuffle buffer,
  resampled shards, per-sample augmentation) is seeded from
  `(seed, epoch, rank, logical worker, position)`; nothing from pid or time.
  The stream is therefore a function of (seed, epoch, rank, world_size,
  num_workers, batch_size); resume needs the same values.
* **Epochs and workers.** Workers are *not* persistent: each `iter()` starts
  fresh workers that receive the current epoch and start batch (persistent
  workers would not see `set_epoch`). Worker start-up is paid once per epoch.

Resampled mode (`mode="resampled"`): each worker draws units with
replacement from `(seed, epoch, rank, worker)`, infinitely; an epoch is
`samples_per_epoch // (world*B)` batches per rank.

Evaluation (`labeled_loader(train=False)`): no shuffle, no wrap, no padding:
rank r takes samples `[r*T//world, (r+1)*T//world)` in source order; every
sample is yielded exactly once across ranks; ranks may differ by one batch.
`eval_loader` is the same for any source, labeled or not, with each sample's key.

Do not pass a `StreamLoader` to `accelerate.Accelerator.prepare()`: it is
already split by rank and Accelerate would re-shard or broadcast it.
"""
from __future__ import annotations

from .loader import StreamLoader, eval_loader, labeled_loader, pretrain_loader
from .sources import (
    INCOMPLETE_NAME,
    INDEX_NAME,
    STAT_KEYS,
    DataSourceError,
    DataSourceNotFoundError,
    IncompleteDatasetError,
    Source,
    Unit,
    check_complete,
    count_tar_samples,
    folder_source,
    read_index,
    resolve_source,
)
from .split import batches_per_rank, select_fraction
from .tars import TransformError

__all__ = [
    "INCOMPLETE_NAME", "INDEX_NAME", "STAT_KEYS", "DataSourceError", "DataSourceNotFoundError", "IncompleteDatasetError",
    "Source", "StreamLoader", "TransformError", "Unit", "batches_per_rank", "check_complete", "count_tar_samples",
    "eval_loader", "folder_source", "labeled_loader", "pretrain_loader", "read_index", "resolve_source", "select_fraction",
]
