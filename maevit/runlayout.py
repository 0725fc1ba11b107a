"""The names inside a run directory, in one place (see :mod:`maevit.train.runs`, which owns the layout).

A module of constants so that :mod:`maevit.models` (which finds weights inside
run directories) and :mod:`maevit.train` share the names without ``models``
importing ``train``. Paths are built by :class:`maevit.train.runs.RunDir`; code
outside ``maevit.train.runs`` reads these names, it never spells them.
"""
from __future__ import annotations

CONFIG_FILE = "config.yaml"  # the resolved config
METRICS_FILE = "metrics.jsonl"  # one JSON object per line, each with "step"
CURVES_FILE = "curves.png"  # training curves drawn from the metrics
IMAGES_DIR = "images"  # PNGs written during training (reconstruction grids)
PROGRESS_DIR = ".progress"  # rank-R.json: each rank's last step, for the hang watchdog (maevit.train.watchdog)
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"  # in CHECKPOINTS_DIR: text, the name of the newest complete checkpoint
CKPT_PREFIX = "step-"  # checkpoint directories: step-00001200
STATE_FILE = "trainer_state.json"  # in a checkpoint: the loop's counters and the weights' header; written last
EMA_PREFIX = "ema-"  # in CHECKPOINTS_DIR: ema-00001200.safetensors, EMA weights beside a checkpoint
TRASH_PREFIX = ".trash-"  # a checkpoint being deleted
TMP_PREFIX = ".tmp-"  # a checkpoint being written
DAMAGED_PREFIX = "damaged-"  # a checkpoint that failed its content check, moved aside (never deleted)
# files in a checkpoint directory that hold training state, not model weights (Accelerate's
# names and the per-rank generators_<rank>.safetensors)
STATE_FILE_PREFIXES = ("optimizer", "scheduler", "scaler", "random_states", "sampler", "custom_checkpoint",
                       "generators")

# what each command exports at the top of its run directory
ENCODER_FILE = "encoder.safetensors"  # maevit pretrain
CLASSIFIER_FILE = "classifier.safetensors"  # maevit finetune
CLASSIFIER_EMA_FILE = "classifier_ema.safetensors"  # maevit finetune with run.ema
PROBE_HEAD_FILE = "probe_head.safetensors"  # maevit probe
EVAL_FILE = "eval.json"  # maevit eval: top-1 / top-5, per class, confusion (beside the classifier by default)
