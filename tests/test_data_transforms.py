"""Transforms (crop-aware decoding, RandomResizedCrop) and the bundled dataset."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from maevit.data import bundled
from maevit.data.transforms import PretrainTransform, decode_crop, draft_box, open_image, rrc_params


def _smooth_jpeg(w=640, h=480) -> bytes:
    """A large smooth image with distinct regions, so a misplaced crop is easy to detect."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 127 + 120 * np.sin(xx / 37.0)
    g = 127 + 120 * np.cos(yy / 29.0)
    b = 255 * ((xx - 0.6 * w) ** 2 + (yy - 0.4 * h) ** 2 < (0.2 * h) ** 2)
    arr = np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.mark.parametrize("box", [(40, 100, 300, 360), (0, 0, 480, 640), (250, 333, 161, 203), (13, 21, 77, 99)])
def test_crop_aware_decode_matches_full_decode(box):
    data = _smooth_jpeg()
    img = open_image(data)
    img.draft("RGB", (80, 60))
    assert img.size == (80, 60)  # draft really decodes at 1/8 scale for this image
    snapped, s = draft_box(box, (640, 480), (32, 32))
    assert s > 1 and all(abs(a - b) < s for a, b in zip(snapped[:2], box[:2]))
    assert all(abs(a - b) <= s for a, b in zip(snapped[2:], box[2:]))
    fast = np.asarray(decode_crop(data, box, (32, 32), draft=True), dtype=np.float32)
    full = np.asarray(decode_crop(data, snapped, (32, 32), draft=False), dtype=np.float32)
    assert np.abs(fast - full).mean() < 1.5  # the same region: only resampling differences
    top, left, h, w = snapped
    if left + w + w // 4 <= 640:  # a box shifted by a quarter of its width is clearly different
        moved = np.asarray(decode_crop(data, (top, left + w // 4, h, w), (32, 32), draft=False), dtype=np.float32)
        assert np.abs(moved - full).mean() > 10 * np.abs(fast - full).mean()


def test_rrc_params_bounds_and_determinism():
    boxes = [rrc_params(640, 480, np.random.default_rng(s), (0.2, 1.0)) for s in range(200)]
    for top, left, h, w in boxes:
        assert 0 <= top and 0 <= left and top + h <= 480 and left + w <= 640
        assert 0.2 * 640 * 480 * 0.95 <= h * w <= 640 * 480
    assert boxes[:5] == [rrc_params(640, 480, np.random.default_rng(s), (0.2, 1.0)) for s in range(5)]
    assert len(set(boxes)) > 190


def test_pretrain_transform_deterministic_per_rng():
    data = _smooth_jpeg(320, 240)
    tf = PretrainTransform(16)
    a = tf(data, np.random.default_rng(7))
    assert a.shape == (3, 16, 16) and a.dtype.is_floating_point is False
    assert (a == tf(data, np.random.default_rng(7))).all()
    assert not (a == tf(data, np.random.default_rng(8))).all()


def test_bundled_dataset_deterministic_and_complete(tmp_path, monkeypatch):
    root = bundled.bundled_dataset(tmp_path / "b1")
    assert (root / "bundled.json").is_file()
    for split, per_class in bundled.SPLITS.items():
        for c in bundled.CLASSES:
            assert len(os.listdir(root / split / c)) == per_class
    again = bundled.bundled_dataset(tmp_path / "b2")
    for rel in ("train/ring/0003.png", "val/dots/0049.png", "train/circle/0000.png"):
        assert (root / rel).read_bytes() == (again / rel).read_bytes()
    img = Image.open(root / "train/checker/0001.png")
    assert img.size == (32, 32) and img.mode == "RGB"
    # A directory without the completion marker is never mistaken for the dataset.
    (tmp_path / "half" / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="bundled.json"):
        bundled.bundled_dataset(tmp_path / "half")
    # MAEVIT_CACHE decides the default root; "bundled:val" resolves under it.
    monkeypatch.setenv("MAEVIT_CACHE", str(tmp_path / "cache"))
    assert bundled.default_root() == tmp_path / "cache" / "bundled-v1"


def test_bundled_classes_are_separable():
    """Cheap proxy for learnability: nearest class-mean on simple shift-invariant features."""
    rng = np.random.default_rng(0)

    def feats(img: np.ndarray) -> np.ndarray:
        g = img.astype(np.float32).mean(-1)
        g = (g - g.mean()) / (g.std() + 1e-6)
        spec = np.abs(np.fft.fft2(g))[:8, :8].ravel()  # translation-invariant texture / size cues
        return spec / (np.linalg.norm(spec) + 1e-6)

    xs = {c: np.stack([feats(bundled.render(c, rng)) for _ in range(60)]) for c in bundled.CLASSES}
    means = np.stack([x[:40].mean(0) for x in xs.values()])
    correct = sum(
        int(np.argmin(((means - f) ** 2).sum(1)) == ci) for ci, x in enumerate(xs.values()) for f in x[40:]
    )
    assert correct / (20 * len(bundled.CLASSES)) > 0.5  # chance is 0.1


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "original"])
def test_randaugment_posterize_at_full_magnitude_does_not_fail(spec):
    # timm asks for 0 bits at magnitude 10 (PosterizeIncreasing); Pillow >= 10 raises on 0 bits
    from timm.data.auto_augment import AugmentOp

    from maevit.data.transforms import labeled_transform

    t = labeled_transform(32, train=True, auto_augment=spec)
    ops = [op for step in t.transforms for group in (getattr(step, "ops", None) or getattr(step, "policy", []))
           for op in (group if isinstance(group, (list, tuple)) else [group]) if isinstance(op, AugmentOp)]
    posterize_ops = [op for op in ops if op.name.startswith("Posterize")]
    assert posterize_ops, f"no posterize op in {spec}"
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    for op in posterize_ops:
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10.0, 0.0
        bits = op.level_fn(10.0, op.hparams)[0]
        out = np.asarray(op(img))
        if bits <= 0:
            assert out.max() == 0  # no bit kept: black
        else:
            assert (out & ((1 << (8 - bits)) - 1) == 0).all()  # only the top `bits` bits survive
