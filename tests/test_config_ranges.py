"""Every numeric key is range-checked at load time, from one table (``maevit.config.RANGES``);
``None`` / ``null`` / ``~`` mean null on the command line; a ``#`` in a value is text."""
import subprocess
import sys
from pathlib import Path

import pytest

from maevit.config import RANGES, ConfigError, config_keys, load_config, parse_overrides
from maevit.train.finetune import FinetuneConfig
from maevit.train.pretrain import PretrainConfig
from maevit.train.probe import ProbeConfig

COMMANDS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "probe": ProbeConfig}
REPO = Path(__file__).resolve().parents[1]


def _numeric_keys(cls):
    """(key, default) of every leaf whose type holds an int or a float (lists of them too)."""
    for key, shown_type, default, _ in config_keys(cls):
        values = default if isinstance(default, (list, tuple)) else [default]
        if "int" in shown_type or "float" in shown_type or (
                shown_type == "list" and values and all(isinstance(v, (int, float)) for v in values)):
            yield key, default


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_numeric_key_has_a_range(command):
    missing = [k for k, _ in _numeric_keys(COMMANDS[command]) if k not in RANGES]
    assert not missing, f"numeric keys without a range in maevit.config.RANGES: {missing}"


def _outside(rng, default):
    """A value just outside ``rng`` of the default's shape."""
    if rng.lo is not None:
        x = rng.lo if rng.lo_open else rng.lo - 1
    else:
        x = rng.hi if rng.hi_open else rng.hi + 1
    if isinstance(default, (list, tuple)):
        return [default[0], x, *default[2:]] if len(default) > 1 else [x]
    return int(x) if isinstance(default, int) and float(x).is_integer() else x


CASES = sorted({(name, key) for name, cls in COMMANDS.items() for key, _ in _numeric_keys(cls)
                if key in RANGES and (RANGES[key].lo is not None or RANGES[key].hi is not None)})


@pytest.mark.parametrize("command,key", CASES)
def test_value_outside_its_range_is_refused_naming_the_key(command, key):
    cls = COMMANDS[command]
    default = dict((k, d) for k, d in _numeric_keys(cls))[key]
    bad = _outside(RANGES[key], default)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + " must be"):
        load_config(cls, None, [f"{key}={bad}", "data.train=x"])


@pytest.mark.parametrize("word", ["None", "none", "null", "Null", "~"])
def test_null_words_mean_null(word):
    cfg = load_config(FinetuneConfig, None, [f"data.auto_augment={word}", f"run.ema={word}", "data.train=x"])
    assert cfg.data.auto_augment is None and cfg.run.ema is None


def test_hash_in_a_value_is_text_not_a_comment():
    assert parse_overrides(["run.dir=runs/#3", "data.train=a #b"]) == {"run": {"dir": "runs/#3"},
                                                                        "data": {"train": "a #b"}}


def test_nan_is_in_no_range():
    with pytest.raises(ConfigError, match="optim.base_lr"):
        load_config(PretrainConfig, None, ["optim.base_lr=.nan", "data.train=x"])


def test_0_255_mean_gets_the_hint():
    with pytest.raises(ConfigError, match="divide 0-255 figures by 255"):
        load_config(PretrainConfig, None, ["data.mean=[123.7, 116.3, 103.5]", "data.train=x"])


def test_help_shows_the_ranges():
    out = subprocess.run([sys.executable, "-m", "maevit.cli", "pretrain", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60).stdout
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("model.mask_ratio"))
    assert "(range (0, 1))" in line


@pytest.mark.parametrize("override", ["model.mask_ratio=0", "model.mask_ratio=1.0", "optim.epochs=0",
                                      "data.std=[0.2, 0, 0.2]"])
def test_out_of_range_on_the_command_line_is_exit_2_before_any_file(tmp_path, override):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "maevit.cli", "pretrain", "data.train=sample:train",
                           f"run.dir={run_dir}", override], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and override.split("=")[0] in proc.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("argv,phrase", [
    (["shards", "write", "x", "y", "--quality", "0"], "--quality: must be in [1, 100], got 0"),
    (["shards", "write", "x", "y", "--samples-per-shard", "0"], "--samples-per-shard: must be >= 1"),
    (["eval", "x", "--data", "y", "--batch-size", "-3"], "--batch-size: must be >= 1"),
    (["visualize", "x", "--mask-ratio", "1.5"], "--mask-ratio: must be in (0, 1)"),
    (["visualize", "x", "--num-images", "many"], "expected an integer"),
])
def test_options_of_the_other_commands_are_range_checked(argv, phrase):
    proc = subprocess.run([sys.executable, "-m", "maevit.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and phrase in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
