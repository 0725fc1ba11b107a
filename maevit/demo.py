"""``maevit demo``: pretrain the tiny MAE on the bundled images, then fine-tune it.

Runs ``pretrain/demo.yaml`` into ``OUT/pretrain`` (a few minutes on 2 CPU
cores), then -- when the fine-tuning stage is installed and
``finetune/demo.yaml`` exists -- fine-tunes the pretrained encoder into
``OUT/finetune``. Re-running resumes; ``--fresh`` starts over (old runs are
moved aside, never deleted).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _recipe(kind: str) -> Path:
    return REPO / kind / "demo.yaml"


def finetune_stage(encoder: Path, out: Path, fresh: bool) -> int | None:
    """The fine-tuning hook: run ``finetune/demo.yaml`` on ``encoder``; None when unavailable."""
    recipe = _recipe("finetune")
    if importlib.util.find_spec("maevit.train.finetune") is None or not recipe.is_file():
        return None
    from maevit.train.finetune import main_finetune

    return main_finetune([str(recipe), f"model.pretrained={encoder}", f"run.dir={out}", f"run.fresh={str(fresh).lower()}"])


def main(argv: list[str] | None = None) -> int:
    """``maevit demo [--out runs/demo] [--fresh] [--no-finetune] [key=value ...]``."""
    parser = argparse.ArgumentParser(prog="maevit demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="where the runs go (default: ./runs/demo)")
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    parser.add_argument("--no-finetune", action="store_true", help="pretraining only")
    parser.add_argument("overrides", nargs="*", help="pretraining overrides, e.g. optim.epochs=2")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from maevit.config import ConfigError, load_config
    from maevit.train.pretrain import PretrainConfig, train

    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    recipe = _recipe("pretrain")
    if not recipe.is_file():
        print(f"maevit demo: {recipe} not found; run the demo from a source checkout of maevit", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        cfg = load_config(PretrainConfig, recipe, [f"run.dir={out / 'pretrain'}", f"run.fresh={str(args.fresh).lower()}",
                                                   *args.overrides])
    except ConfigError as e:
        print(f"maevit demo: {e}", file=sys.stderr)
        return 2
    result = train(cfg)
    run_dir = Path(result["run_dir"])
    grids = sorted((run_dir / "images").glob("recon-*.png"))
    print("\npretraining done:")
    print(f"  reconstructions  {grids[-1] if grids else '(none: run.viz_every=0)'}")
    print(f"  metrics          {run_dir / 'metrics.jsonl'} (last loss {result['loss']:.4f})")
    print(f"  encoder weights  {result['encoder']}")
    if args.no_finetune:
        return 0
    rc = finetune_stage(Path(result["encoder"]), out / "finetune", args.fresh)
    if rc is None:
        print("fine-tuning stage not available (maevit.train.finetune or finetune/demo.yaml missing): skipped")
        return 0
    return rc


if __name__ == "__main__":
    sys.exit(main())
