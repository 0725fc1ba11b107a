"""Test helper, run by `accelerate launch ... tests/launch_worker.py OUT ARGS...`: `maevit pretrain ARGS`
on this rank, recording the ids of the keyed images it trains on (test_elastic.keyed_shards) in
OUT/ids-<processes>-<rank>.json."""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # the runs' data.mean / data.std


def main() -> int:
    import torch

    import maevit.data.stream as stream
    from maevit.cli import main as cli

    out, args = Path(sys.argv[1]), sys.argv[2:]
    out.mkdir(parents=True, exist_ok=True)
    ids: list[int] = []
    real = stream.pretrain_loader

    class Recording:
        def __init__(self, loader):
            self.loader = loader

        def __getattr__(self, name):
            return getattr(self.loader, name)

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for imgs in self.loader:
                rgb = ((imgs.mean(dim=(2, 3)) * torch.tensor(STD) + torch.tensor(MEAN)) * 255).round().long()
                ids.extend((rgb[:, 0] + 256 * rgb[:, 1]).tolist())
                yield imgs

    stream.pretrain_loader = lambda *a, **k: Recording(real(*a, **k))
    try:
        return cli(["pretrain", *args])
    finally:
        stream.pretrain_loader = real
        world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
        (out / f"ids-{world}-{rank}.json").write_text(json.dumps(ids))


if __name__ == "__main__":
    sys.exit(main())
