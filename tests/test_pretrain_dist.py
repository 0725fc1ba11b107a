"""A real two-process pretraining run on CPU (torchrun + gloo).

The test writes 100 constant-colour images (the colour encodes the image id, and
survives crops, flips and JPEG) as 7 shards of unequal size, then runs this file
as the torchrun worker: it calls the `maevit` CLI (`maevit.cli.main(["pretrain", ...])`,
as `torchrun -m maevit.cli pretrain ...` does) while recording which images each
rank received and each rank's final parameters. Before that, a first attempt finds
the run directory locked by another process: both ranks must stop with its message.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
N_IMAGES, STEP = 100, 10  # colour levels STEP apart: id = R // STEP + 26 * (G // STEP)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _colour(i: int) -> tuple[int, int, int]:
    return (i % 25) * STEP + 5, (i // 25) * STEP + 5, 128


def _decode_ids(imgs: torch.Tensor) -> list[int]:
    rgb = (imgs.mean(dim=(2, 3)) * torch.tensor(STD) + torch.tensor(MEAN)) * 255  # [B, 3]
    return [int(r // STEP) + 25 * int(g // STEP) for r, g, _ in rgb.tolist()]


@pytest.mark.slow
def test_two_process_cpu_run(tmp_path):
    from maevit.data.shards import write_shards

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(N_IMAGES):
        Image.fromarray(np.full((32, 32, 3), _colour(i), np.uint8)).save(folder / f"{i:03d}.png")
    write_shards(str(folder), tmp_path / "shards", samples_per_shard=15, progress=False)  # 7 shards: 6 x 15 + 10
    assert len(list((tmp_path / "shards").glob("*.tar"))) == 7

    out = tmp_path / "worker"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "MAEVIT_TEST_OUT": str(out)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(tmp_path / "shards"), str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pretraining on 2 process(es)" in proc.stderr  # accelerator.num_processes == 2

    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    # precision=auto, in the refused (locked) attempt and in the run: rank 0 decides for all
    assert [s["precision"] for s in seen] == [["fp32", "fp32"], ["fp32", "fp32"]]
    # 100 images, 2 ranks x batch 4: 12 batches per rank per epoch, 2 epochs
    for epoch in range(2):
        ids = [s["ids"][epoch * 12 * 4:(epoch + 1) * 12 * 4] for s in seen]
        assert all(len(x) == 48 and len(set(x)) == 48 for x in ids)  # no repeats within a rank
        assert set(ids[0]).isdisjoint(ids[1])  # ranks read disjoint data
        assert set(ids[0]) | set(ids[1]) <= set(range(N_IMAGES))
    a, b = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # identical after 24 steps
    init = torch.load(out / "rank0_init.pt", weights_only=True)
    assert not torch.equal(init["decoder.pred.weight"], a["decoder.pred.weight"])  # and they did train
    assert (tmp_path / "run" / "checkpoints" / "step-00000024" / "random_states_1.pkl").is_file()
    assert (tmp_path / "run" / "encoder.safetensors").is_file()
    # a first attempt found the run directory locked by another process: only rank 0 looks at the lock, and
    # both ranks stopped with its message (none waited at a barrier for the other)
    assert [s["locked_rc"] for s in seen] == [2, 2]
    assert proc.stderr.count("maevit pretrain: error: run directory") == 2 and "process 4242 on host elsewhere" in proc.stderr


def _worker(shards: str, run_dir: str) -> int:
    """torchrun entry: run `maevit pretrain`, recording data ids and final weights per rank."""
    import maevit.data.stream as stream
    import maevit.train.pretrain as pretrain
    from maevit.cli import main

    out = Path(os.environ["MAEVIT_TEST_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ["RANK"])
    ids: list[int] = []
    models = []
    real_loader, real_create = stream.pretrain_loader, pretrain.create_mae

    class Recording:
        def __init__(self, loader):
            self.loader = loader

        def __getattr__(self, name):
            return getattr(self.loader, name)

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for imgs in self.loader:
                ids.extend(_decode_ids(imgs))
                yield imgs

    def create(*args, **kwargs):
        model = real_create(*args, **kwargs)
        models.append(model)
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, out / f"rank{rank}_init.pt")
        return model

    stream.pretrain_loader = lambda *a, **k: Recording(real_loader(*a, **k))
    pretrain.create_mae = create

    # run.precision=auto: were the ranks to decide differently (rank 1 "sees" bf16 units); the
    # main process's choice (fp32, so the test stays in fp32) must reach every rank
    from maevit.train import precision as throughput

    real_resolve, choices = throughput.resolve_precision, []
    throughput._gather_choice = lambda device: throughput.PrecisionChoice(
        "fp32" if rank == 0 else "bf16", f"rank {rank}'s own view")

    def resolve(*a, **k):
        choice = real_resolve(*a, **k)
        choices.append(choice.precision)
        return choice

    throughput.resolve_precision = resolve
    args = [
        "pretrain", "model.name=mae_vit_tiny_patch16", "model.img_size=32", "model.patch_size=8",
        "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=32",
        "model.decoder_depth=1", "model.decoder_num_heads=2", f"data.train={shards}", "data.batch_size=4",
        "data.num_workers=1", "data.shuffle_buffer=16", f"data.mean={list(MEAN)}", f"data.std={list(STD)}",
        "optim.epochs=2", "optim.warmup_epochs=0.5", "optim.base_lr=1.0e-2", f"run.dir={run_dir}",
        "run.log_every=4", "run.ckpt_every=10", "run.viz_every=0", "run.progress=false",
        "run.precision=auto",
    ]
    import maevit.dirlock as dirlock
    import maevit.train.runs as runs

    def locked(directory, **kwargs):
        assert rank == 0, "only the main process takes the lock"
        raise dirlock.DirLockedError(f"run directory {directory} is in use by process 4242 on host elsewhere.")

    runs.lock_dir = locked
    locked_rc = main(args)
    runs.lock_dir = dirlock.lock_dir
    models.clear()
    rc = main(args)
    torch.save(models[0].state_dict(), out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({"ids": ids, "locked_rc": locked_rc, "precision": choices}))
    return rc


if __name__ == "__main__":
    sys.exit(_worker(*sys.argv[1:3]))
