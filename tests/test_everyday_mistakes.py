"""Everyday mistakes through the real commands: one paragraph, exit 2, no traceback, nothing written
(issue 21). Each case is a kind: a wrong kind of path, a folder one level off, an OS error."""
import errno
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maevit import cli

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.name=mae_vit_tiny_patch16", "model.img_size=32", "model.patch_size=8", "data.batch_size=4",
        "data.num_workers=0", "optim.max_steps=2", "run.progress=false", "run.precision=fp32"]
PRE = [*TINY, "model.embed_dim=32", "model.depth=1", "model.num_heads=2"]
FT = [*TINY, "model.args={embed_dim: 32, depth: 1, num_heads: 2}"]


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    root = tmp_path_factory.mktemp("mistakes")
    rng = np.random.default_rng(0)
    for top in ("tree", "high/top"):
        for c in ("ant", "bee"):
            (root / top / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / top / c / f"{i}.jpg")
    with tarfile.open(root / "tree.tar.gz", "w:gz") as tf:
        tf.add(root / "tree", arcname="tree")
    (root / "afile").write_text("not a folder")
    return root


CASES = [
    ("pretrain", PRE, "data.train=tree", "run.dir=afile", "is a file, not a folder"),
    ("pretrain", PRE, "data.train=tree.tar.gz", "run.dir=r1", "is a compressed archive"),
    ("pretrain", PRE, "data.train=tree", "model.mask_ratio=0.99", "keeps no mask unit out of 16"),
    ("pretrain", PRE, "data.train=nothing/*.tar", "run.dir=r2", "matches no file"),
    ("finetune", FT, "data.train=high", "run.dir=r3", "one level further down"),
    ("finetune", FT, "data.train=tree/ant", "run.dir=r4", "pass the folder above it"),
    ("finetune", FT, "data.train=tree/ant/0.jpg", "run.dir=r5", "is a single image"),
    ("finetune", FT, "data.train=tree", "data.val=tree.tar.gz", "is a compressed archive"),
    # a width the heads do not divide: timm checks it with an assert, which must not read as a bug
    ("pretrain", TINY, "data.train=tree", "model.embed_dim=32", "dim should be divisible by num_heads"),
    ("finetune", TINY, "data.train=tree", "model.args={embed_dim: 32, depth: 1}", "dim should be divisible by num_heads"),
]


@pytest.mark.parametrize("command,base,a,b,phrase", CASES, ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in CASES])
def test_mistake_is_one_paragraph_and_exit_2(place, command, base, a, b, phrase):
    proc = subprocess.run([sys.executable, "-m", "maevit.cli", command, *base, a, b], cwd=place,
                          capture_output=True, text=True, timeout=180, env={"PYTHONPATH": str(REPO),
                                                                            "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and phrase in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ": error: " in ln]
    assert len(errors) == 1, proc.stderr[-2000:]


@pytest.mark.parametrize("exn,code,phrase", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/ro/run"), 2, "permission denied: /data/ro/run"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x"), 2, "the file system is read-only: /mnt/ro/x"),
    (OSError(errno.ENOSPC, "No space left on device", "/full/x"), 1, "the disk is full"),
])
def test_os_errors_anywhere_in_a_command_are_one_paragraph(monkeypatch, capsys, exn, code, phrase):
    def failing(argv):
        raise exn

    monkeypatch.setitem(cli.COMMANDS, "fake", ("test_everyday_mistakes:_never", "a command that fails"))
    monkeypatch.setattr(sys.modules[__name__], "_never", failing, raising=False)
    assert cli.main(["fake"]) == code
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err


def test_a_bug_says_it_is_one(monkeypatch, capsys):
    def buggy(argv):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setitem(cli.COMMANDS, "fake", ("test_everyday_mistakes:_never", "a command with a bug"))
    monkeypatch.setattr(sys.modules[__name__], "_never", buggy, raising=False)
    assert cli.main(["fake"]) == 1
    err = capsys.readouterr().err
    assert "ZeroDivisionError" in err and "this is a bug in maevit" in err
