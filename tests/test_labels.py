"""Class labels are matched by name between data sets and classifier files (issue 21)."""
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maevit.data.labels import ClassMismatchError, label_map
from maevit.data.shards import write_shards
from maevit.data.stream import labeled_loader

REPO = Path(__file__).resolve().parents[1]


def test_subset_maps_to_the_model_indices():
    assert label_map(["bee", "dog"], ["ant", "bee", "cat", "dog"], data="v", model="m") == (1, 3)


def test_reordered_and_numeric_names_map_by_name_not_position():
    # folder names sort as text: "10" < "2"; the model's list may be in any order
    assert label_map(["10", "2", "3"], ["2", "3", "10"], data="v", model="m") == (2, 0, 1)


def test_superset_is_refused_naming_both_differences():
    with pytest.raises(ClassMismatchError) as e:
        label_map(["ant", "bee", "emu"], ["ant", "bee", "cat"], data="val data", model="the training data")
    msg = str(e.value)
    assert "emu" in msg and "lacks cat" in msg and "val data" in msg and "the training data" in msg


def _tree(root: Path, classes, per_class=2, size=16):
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = np.full((size, size, 3), 20 * k + i, dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            (root / c / f"{i}.png").write_bytes(buf.getvalue())
    return root


@pytest.mark.parametrize("as_shards", [False, True])
def test_validation_subset_yields_the_training_indices(tmp_path, as_shards):
    train_names = ["ant", "bee", "cat", "dog"]
    val = _tree(tmp_path / "val", ["bee", "dog"])
    if as_shards:
        write_shards(str(val), tmp_path / "val_shards", progress=False)
        val = tmp_path / "val_shards"
    loader = labeled_loader(str(val), img_size=16, batch_size=4, train=False, num_workers=0,
                            class_names=train_names, classes_from="the training data")
    labels = sorted(int(y) for _, ys in loader for y in ys)
    assert labels == [1, 1, 3, 3]
    assert loader.class_names == train_names


def test_eval_of_a_classifier_on_data_with_unknown_classes_is_exit_2(tmp_path):
    from maevit.models import create_classifier
    from maevit.models.weights import header_of
    from maevit.train.finetune import export_classifier

    model = create_classifier("mae_vit_tiny_patch16", 2, img_size=16, patch_size=8, embed_dim=32, depth=1,
                              num_heads=2)
    path = tmp_path / "classifier.safetensors"
    export_classifier(model, path, header_of(model, "classifier", class_names=["ant", "bee"],
                                             mean=[0.5] * 3, std=[0.5] * 3))
    val = _tree(tmp_path / "val", ["ant", "emu"])
    proc = subprocess.run([sys.executable, "-m", "maevit.cli", "eval", str(path), "--data", str(val),
                           "--num-workers", "0", "--out", str(tmp_path / "ev")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "emu" in proc.stderr
