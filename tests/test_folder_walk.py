"""Image folders are walked safely and decisively: no symlink loops or duplicates, a mixed tree is
a warning that names the reading taken, and a folder of unreadable files is an error (issue 21)."""
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maevit.data.shards import write_shards
from maevit.data.stream import folder_source

REPO = Path(__file__).resolve().parents[1]


def _jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def _tree(root: Path, classes=("ant", "bee"), per_class=3) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            (root / c / f"{i}.jpg").write_bytes(_jpeg(hash((c, i)) % 1000))
    return root


def test_symlink_loop_is_walked_once(tmp_path):
    root = _tree(tmp_path / "tree")
    os.symlink(root, root / "ant" / "loop")  # points back up the tree
    os.symlink(root / "bee", root / "bee_again")  # the same folder twice
    src = folder_source(root)
    assert src.num_samples == 6
    assert len({os.path.realpath(u.url) for u in src.units}) == 6


def test_symlink_loop_in_shards_write_stores_each_image_once(tmp_path):
    root = _tree(tmp_path / "tree")
    os.symlink(root, root / "bee" / "loop")
    index = write_shards(str(root), tmp_path / "out", progress=False)
    assert index["total"] == 6 and index["classes"] == ["ant", "bee"]


def test_mixed_tree_warns_and_names_the_choice(tmp_path, caplog):
    root = _tree(tmp_path / "tree")
    (root / "loose.jpg").write_bytes(_jpeg(7))
    with caplog.at_level(logging.WARNING):
        src = folder_source(root)
    assert src.class_names is None and src.num_samples == 7
    assert "unlabeled" in caplog.text and "loose.jpg" in caplog.text


def test_folder_of_unreadable_images_is_an_error_not_zero_samples(tmp_path):
    root = tmp_path / "junk"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.jpg").write_bytes(b"not an image" * 10)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "maevit.cli", "shards", "write", str(root), str(out),
                           "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "none of the 3 images" in proc.stderr
    assert not (out / "dataset.json").exists()


@pytest.mark.parametrize("via", ["index", "glob"])
def test_unlabeled_shards_in_a_labeled_command_are_refused_up_front(tmp_path, via):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(6):
        (root / f"{i}.jpg").write_bytes(_jpeg(i))
    out = tmp_path / "shards"
    write_shards(str(root), out, progress=False)
    source = str(out) if via == "index" else str(out / "*.tar")
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "maevit.cli", "finetune", "model.name=mae_vit_tiny_patch16",
                           "model.img_size=32", "model.patch_size=8", f"data.train={source}", "model.num_classes=2",
                           "data.num_workers=0", f"run.dir={run_dir}", "run.progress=false", "--label-fraction", "0.5"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "has no labels" in proc.stderr
