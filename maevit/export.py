"""``maevit export SRC OUT.safetensors``: the encoder of any supported checkpoint, with its header.

SRC is a maevit run directory or file (the architecture comes from its header),
or a foreign file (published MAE ``.pth``, Hugging Face ViTMAE, timm weights)
together with ``--model NAME`` and, where it differs from the registered
model, its geometry (``img_size=32 patch_size=8 depth=4``). Plain-ViT exports load into timm strictly; the
command prints the line that does it.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """``maevit export SRC OUT.safetensors [--model NAME] [key=value ...]``."""
    parser = argparse.ArgumentParser(prog="maevit export", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="checkpoint file or run directory")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument("--model", default=None, help="registered name (needed for files that do not name theirs)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="encoder arguments, for files that do not say theirs (e.g. img_size=32 patch_size=8 depth=4)")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    if not args.out.endswith(".safetensors"):
        parser.error(f"output must end in .safetensors, got {args.out!r}")

    from maevit.models import create_classifier, export_encoder, read_header
    from maevit.models.weights import timm_load_line
    from maevit.train.command import usage_errors

    from maevit.config import ConfigError, parse_overrides

    try:
        kw = parse_overrides(args.overrides)
        encoder = create_classifier(args.model, 0, pretrained=args.src, global_pool=None, **kw)
        out = export_encoder(encoder, args.out)
    except (*usage_errors(), ConfigError) as e:
        print(f"maevit export: error: {e}", file=sys.stderr)
        return 2
    header = read_header(out)
    print(f"wrote {out}: {header['model_name']} encoder, {len(encoder.state_dict())} tensors\n{encoder.load_report}")
    line = timm_load_line(header, out)
    print(f"load it in timm: {line}" if line else
          f"rebuild it: maevit.create_classifier(None, NUM_CLASSES, pretrained={str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
