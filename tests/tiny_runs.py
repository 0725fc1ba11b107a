"""Overrides for a pretraining run that takes milliseconds per step (shared by the CLI / training tests)."""

# 32 px images, 8 px patches (16 patches), width 32, one block each side
TINY_PRETRAIN = [
    "model.name=mae_vit_tiny_patch16", "model.img_size=32", "model.patch_size=8", "model.embed_dim=32",
    "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=32", "model.decoder_depth=1",
    "model.decoder_num_heads=2", "data.train=bundled:train", "data.batch_size=8", "data.num_workers=0",
    "data.shuffle_buffer=64", "optim.epochs=1", "optim.warmup_epochs=0.05", "optim.base_lr=1.0e-3",
    "run.progress=false", "run.viz_every=0", "run.precision=fp32",
]
