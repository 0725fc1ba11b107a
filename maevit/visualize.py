"""Reconstruction grids: ``maevit visualize CHECKPOINT --data SRC --out grid.png``; with ``--features``,
PCA maps of the encoder's patch features.

The command around :func:`maevit.viz.save_reconstruction_grid` (the MAE from any
checkpoint) and :func:`maevit.viz.save_feature_pca_grid` (any encoder: a run, a file
or a model folder): images from the run's own data (or ``--data``), one PNG.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from maevit.config import RANGES, Range, ranged
from maevit.train.runs import RunDir, run_root_of
from maevit.viz import IMAGENET_MEAN, IMAGENET_STD, save_reconstruction_grid


def main(argv: list[str] | None = None) -> int:
    """``maevit visualize CHECKPOINT [--data SRC] [--out grid.png]``."""
    parser = argparse.ArgumentParser(prog="maevit visualize", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a pretraining run directory, a checkpoints/step-* directory, or MAE weights")
    parser.add_argument("--data", help="images to show (shards, folder, 'sample:val', 'bundled'); default: the run's data.train")
    parser.add_argument("--out", default="reconstruction.png", help="output PNG")
    parser.add_argument("--model", help="model name, for weights files that do not name theirs (see `maevit models`)")
    parser.add_argument("--img-size", type=ranged(int, Range(1)), help="default: the file's")
    parser.add_argument("--num-images", type=ranged(int, Range(1)), default=8)
    parser.add_argument("--mask-ratio", type=ranged(float, RANGES["model.mask_ratio"]), default=None,
                        help="default: the model's")
    parser.add_argument("--seed", type=ranged(int, Range(0)), default=0, help="picks the images and the masks")
    parser.add_argument("--features", action="store_true",
                        help="PCA maps of the encoder's patch features instead of reconstructions (any encoder, "
                             "classifier or MAE; DINOv2-style: first component, foreground, three components as RGB)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from maevit.data.stream import pretrain_loader, resolve_source
    from maevit.models import create_classifier, create_mae, read_header
    from maevit.train.command import setup_logging, usage_errors
    from maevit.viz import save_feature_pca_grid

    setup_logging()
    try:
        header = read_header(args.checkpoint)
        if args.features:
            size = {} if args.img_size is None else {"img_size": args.img_size}
            model = create_classifier(args.model, 0, pretrained=args.checkpoint, global_pool=None, **size).eval()
            img_size = model.img_size[0]
        elif header.get("kind") == "classifier":
            raise ValueError(f"{args.checkpoint} holds a fine-tuned classifier, which has no decoder to reconstruct "
                             "with: pass a pretraining run directory or an MAE checkpoint")
        else:
            overrides = {k: v for k, v in (("img_size", args.img_size), ("mask_ratio", args.mask_ratio))
                         if v is not None}
            model = create_mae(args.model, checkpoint=args.checkpoint, **overrides).eval()
            img_size = model.encoder.img_size[0]
        data, mean, std = _run_data(args.checkpoint, header)
        data = args.data or data
        if not data:
            raise ValueError("pass --data SRC (shards, an image folder, 'sample:val' or 'bundled'): the checkpoint does not say "
                             "which data it was trained on")
        source = resolve_source(data)
        num_images = min(args.num_images, source.num_samples)  # a small folder: all of it
        loader = pretrain_loader(source, img_size=img_size, batch_size=num_images, num_workers=0,
                                 seed=args.seed, scale=(1.0, 1.0), shuffle_buffer=num_images, mean=mean, std=std)
        imgs = next(iter(loader))
    except (*usage_errors(), ValueError) as e:
        print(f"maevit visualize: error: {e}", file=sys.stderr)
        return 2
    if args.features:
        path = save_feature_pca_grid(model, imgs, args.out, mean=mean, std=std)
        print(f"wrote {path} ({len(imgs)} rows: original | 1st component | foreground | PCA of the foreground)")
        return 0
    path = save_reconstruction_grid(model, imgs, args.out, seed=args.seed, mean=mean, std=std)
    print(f"wrote {path} ({len(imgs)} rows: original | masked | reconstruction | reconstruction + visible)")
    return 0


def _run_data(checkpoint: str, header: dict) -> tuple[str | None, Sequence[float], Sequence[float]]:
    """(data.train, mean, std) of the pretraining run a checkpoint belongs to, where it says."""
    import yaml

    from maevit.models.weights import find_weights_file

    run_dir = run_root_of(find_weights_file(checkpoint))
    if run_dir is not None:
        data = (yaml.safe_load(RunDir(run_dir).config_path.read_text()) or {}).get("data") or {}
        return data.get("train"), data.get("mean", IMAGENET_MEAN), data.get("std", IMAGENET_STD)
    return None, header.get("mean", IMAGENET_MEAN), header.get("std", IMAGENET_STD)


if __name__ == "__main__":
    sys.exit(main())
