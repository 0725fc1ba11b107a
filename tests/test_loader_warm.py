"""The next epoch's loader workers start before the current epoch ends (no idle wait at epoch starts):
the batches are the same as a loader that starts each epoch cold, and a process that stops with a
next epoch already started exits at once (its workers ignore SIGTERM, see loader._ignore_sigint)."""
import subprocess
import sys

import pytest
import torch
from PIL import Image

from maevit.data import pretrain_loader


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    gen = torch.Generator().manual_seed(0)
    for i in range(96):
        pixels = torch.randint(0, 256, (12, 12, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{i:03d}.png")
    return root


@pytest.fixture
def _loader(folder):
    return lambda: pretrain_loader(str(folder), img_size=8, batch_size=8, num_workers=1, shuffle_buffer=16, seed=3)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [b.clone() for b in loader]


def test_warm_start_gives_the_same_batches_as_a_cold_start(_loader):
    warm = _loader()
    first = _epoch(warm, 0)
    assert warm._warm is not None and warm._warm[0].epoch == 1  # started during epoch 0
    second = _epoch(warm, 1)  # taken over
    cold = _loader()
    assert all(torch.equal(a, b) for a, b in zip(first, _epoch(cold, 0), strict=True))
    cold.close()
    assert all(torch.equal(a, b) for a, b in zip(second, _epoch(_loader(), 1), strict=True))


def test_a_warm_loader_for_another_epoch_is_discarded(_loader):
    loader = _loader()
    _epoch(loader, 0)
    again = _epoch(loader, 0)  # asks for epoch 0 again, not the warm epoch 1
    assert all(torch.equal(a, b) for a, b in zip(again, _epoch(_loader(), 0), strict=True))


def test_a_process_exits_with_a_next_epoch_started(folder):
    code = ("from maevit.data import pretrain_loader\n"
            f"l = pretrain_loader({str(folder)!r}, img_size=8, batch_size=8, num_workers=1, shuffle_buffer=16)\n"
            "n = sum(1 for _ in l)\n"
            "assert l._warm is not None\n"
            "print('done', n)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("done")
