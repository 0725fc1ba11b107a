"""The FSDP layout of the README, on CPU: 2 processes (torchrun + gloo), FSDP2.

Accelerate only switches to FSDP on GPU-type backends (its `state.py` never sets
`DistributedType.FSDP` for `MULTI_CPU`), so `maevit pretrain` under FSDP cannot
run in CI. What can run on CPU is what Accelerate does underneath with the
README's config: `fully_shard` on every timm `Block` (encoder and decoder) and the
root, a sharded `torch.distributed.checkpoint` save of model and optimizer
(`SHARDED_STATE_DICT`), a load into a fresh sharded model, and the gathered full
state dict that `maevit pretrain` exports as `encoder.safetensors`.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SIZE = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=2)


@pytest.mark.slow
def test_fsdp2_sharded_checkpoint_round_trip(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "returned a view tensor" not in proc.stderr  # MAEOutput fields are safe under FSDP2

    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard per rank
    losses = [torch.load(tmp_path / f"losses{r}.pt", weights_only=True) for r in range(2)]
    # step 4 after resuming from the step-3 checkpoint == step 4 of the uninterrupted run, on both ranks
    for lo in losses:
        assert torch.equal(lo["resumed"], lo["straight"][3])

    import timm
    from safetensors.torch import load_file

    enc = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            embed_dim=32, depth=2, num_heads=2)
    enc.load_state_dict(load_file(str(tmp_path / "encoder.safetensors")), strict=True)


def _sharded_mae(seed: int):
    from timm.models.vision_transformer import Block
    from torch.distributed.fsdp import fully_shard

    from maevit.models.registry import create_mae

    torch.manual_seed(seed)
    model = create_mae("mae_vit_tiny_patch16", **SIZE)
    for module in model.modules():  # fsdp_transformer_layer_cls_to_wrap: Block
        if isinstance(module, Block):
            fully_shard(module)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)


def _step(model, opt, rank: int, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * i + rank)  # each rank its own data and masks
    imgs = torch.randn(4, 3, 32, 32, generator=g)
    out = model(imgs, generator=g)
    out.loss.backward()
    opt.step()
    opt.zero_grad()
    return out.loss.detach()


def _worker(out_dir: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict,
    )

    from maevit.models import export_encoder

    out = Path(out_dir)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, opt = _sharded_mae(0)
    straight = [_step(model, opt, rank, i) for i in range(3)]
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(out / "ckpt"))
    straight.append(_step(model, opt, rank, 3))

    resumed_model, resumed_opt = _sharded_mae(1)  # different init: everything must come from the checkpoint
    msd, osd = get_state_dict(resumed_model, resumed_opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(out / "ckpt"))
    set_state_dict(resumed_model, resumed_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    resumed = _step(resumed_model, resumed_opt, rank, 3)
    torch.save({"straight": torch.stack(straight), "resumed": resumed}, out / f"losses{rank}.pt")

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:  # what pretrain does with accelerator.get_state_dict(model) under FSDP
        export_encoder(model, out / "encoder.safetensors", state_dict=full)  # the gathered weights, the model's header
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
