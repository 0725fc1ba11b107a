"""`maevit probe` end to end: the LARS lr rule and the accuracy it reaches."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]


@pytest.fixture(scope="module")
def colour_classes(tmp_path_factory):
    """4 classes told apart by colour (plus noise): train 48, val 16 images per class, 32 px."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("val", 16)):
        for c, colour in enumerate(COLOURS):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                arr = np.clip(np.array(colour)[None, None] + rng.normal(0, 25, (32, 32, 3)), 0, 255)
                Image.fromarray(arr.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("batch", [16, 64])
def test_probe_peak_lr_is_optim_lr_at_any_batch_and_reaches_full_accuracy(colour_classes, tmp_path, capsys,
                                                                           monkeypatch, batch):
    """LARS scales each step by |w| / |grad|: its lr is not scaled down with the batch (which starved
    small-batch probes). A random encoder's pooled features separate these colours: at the right lr
    the probe gets every val image right in 10 epochs; at optim.lr x 16 / 256 it does not (75%)."""
    from timm.optim import Lars

    from maevit.train.probe import main_probe

    torch.set_num_threads(1)
    lrs = []
    real_step = Lars.step

    def step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Lars, "step", step)
    assert main_probe(["model.name=mae_vit_tiny_patch16", "model.img_size=32",
                       "model.args={patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}",
                       f"data.train={colour_classes / 'train'}", f"data.val={colour_classes / 'val'}",
                       "data.num_workers=0", f"data.batch_size={batch}", "optim.epochs=10", "optim.warmup_epochs=1",
                       f"run.dir={tmp_path / 'probe'}"]) == 0
    summary = capsys.readouterr().out
    out = {"top1": float(re.search(r"val top-1 ([\d.]+)%", summary).group(1))}
    assert max(lrs) == pytest.approx(6.4)  # the peak of warm-up + cosine is optim.lr itself
    assert len(lrs) == 10 * (192 // batch)
    if batch == 16:
        assert out["top1"] == 100.0
