"""``maevit export SRC OUT``: the encoder of any supported checkpoint, as one file or as a model folder.

SRC is a maevit run directory or file (the architecture comes from its header),
or a foreign file (published MAE ``.pth``, Hugging Face ViTMAE, timm weights)
together with ``--model NAME`` and, where it differs from the registered
model, its geometry (``img_size=32 patch_size=8 depth=4``).

Formats: ``OUT.safetensors`` (default): the encoder with a maevit header; plain-ViT
exports load into timm strictly and the command prints the line that does it.
``--format timm OUT_DIR``: a timm model folder (``config.json``, ``model.safetensors``,
``README.md``) that ``timm.create_model("local-dir:OUT_DIR", pretrained=True)`` loads
strictly, for every family timm has: the encoder, or a fine-tuned classifier with its
head and class names. ``--format hf OUT_DIR``: a plain-ViT MAE with its
decoder as a ``transformers`` ``ViTMAEForPreTraining`` folder. maevit's own commands read
both folders wherever they read a weights file.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

FORMATS = ("safetensors", "timm", "hf")


def main(argv: list[str] | None = None) -> int:
    """``maevit export SRC OUT [--format safetensors|timm|hf] [--model NAME] [key=value ...]``."""
    parser = argparse.ArgumentParser(prog="maevit export", description=__doc__.splitlines()[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("src", help="checkpoint file, model folder or run directory")
    parser.add_argument("out", help="output .safetensors file, or folder for --format timm / hf")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="safetensors (default when OUT ends in .safetensors), timm or hf (a model folder)")
    parser.add_argument("--model", default=None, help="registered name (needed for files that do not name theirs)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="encoder arguments, for files that do not say theirs (e.g. img_size=32 patch_size=8 depth=4)")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    fmt = args.format or ("safetensors" if args.out.endswith(".safetensors") else None)
    if fmt is None:
        parser.error(f"OUT {args.out!r} does not end in .safetensors: pass --format timm or --format hf to write a "
                     "model folder there, or name a .safetensors file")
    if fmt == "safetensors" and not args.out.endswith(".safetensors"):
        parser.error(f"output must end in .safetensors, got {args.out!r}")
    if fmt != "safetensors" and args.out.endswith(".safetensors"):
        parser.error(f"--format {fmt} writes a folder; OUT {args.out!r} ends in .safetensors: name a folder")

    from maevit.config import ConfigError, parse_overrides
    from maevit.export_folder import ExportFormatError
    from maevit.train.command import usage_errors

    try:
        kw = parse_overrides(args.overrides)
        return _EXPORTS[fmt](args.src, args.out, args.model, kw)
    except (*usage_errors(), ConfigError, ExportFormatError, FileExistsError) as e:
        print(f"maevit export: error: {e}", file=sys.stderr)
        return 2


def _export_file(src: str, out: str, model: str | None, kw: dict[str, Any]) -> int:
    from maevit.models import create_classifier, export_encoder, read_header
    from maevit.models.weights import timm_load_line

    encoder = create_classifier(model, 0, pretrained=src, global_pool=None, **kw)
    path = export_encoder(encoder, out)
    header = read_header(path)
    print(f"wrote {path}: {header['model_name']} encoder, {len(encoder.state_dict())} tensors\n{encoder.load_report}")
    line = timm_load_line(header, path)
    print(f"load it in timm: {line}" if line else
          f"rebuild it: maevit.create_classifier(None, NUM_CLASSES, pretrained={str(path)!r})")
    return 0


def _export_timm(src: str, out: str, model: str | None, kw: dict[str, Any]) -> int:
    """A classifier (a fine-tuning run or file) keeps its head and class names; anything else gives its encoder."""
    from maevit.export_folder import timm_folder_line, write_timm_folder
    from maevit.models import create_classifier, read_header
    from maevit.train.evaluate import load_classifier

    classes = None
    if read_header(src).get("kind") == "classifier":
        net, header = load_classifier(src, name=model, img_size=kw.pop("img_size", None))
        classes = header.get("class_names") or [str(i) for i in range(net.num_classes)]
        what = f"classifier ({len(classes)} classes)"
    else:
        net = create_classifier(model, 0, pretrained=src, global_pool=None, **kw)
        what = "encoder"
    prep = preprocessing_of(src)
    line = timm_folder_line(out)
    folder = write_timm_folder(net, out, preprocessing=prep, class_names=classes,
                               card=lambda h: _card(h, src, "timm", f"import timm\nmodel = {line}", prep))
    report = f"\n{net.load_report}" if getattr(net, "load_report", None) else ""
    print(f"wrote {folder}: {net.model_name} {what} as a timm model folder (config.json, model.safetensors, "
          f"README.md){report}\nload it in timm: {line}")
    return 0


def _export_hf(src: str, out: str, model: str | None, kw: dict[str, Any]) -> int:
    from maevit.export_folder import hf_folder_line, write_hf_folder
    from maevit.models import create_mae, read_header

    import importlib.util

    from maevit.export_folder import ExportFormatError

    if importlib.util.find_spec("transformers") is None:
        raise ExportFormatError("`--format hf` writes the folder with Hugging Face transformers, which is not "
                                "installed: pip install transformers")
    kind = read_header(src).get("kind")
    if kind in ("encoder", "classifier"):
        raise ExportFormatError(
            f"{src} holds an encoder{' with a classifier head' if kind == 'classifier' else ''} without the MAE "
            "decoder; `--format hf` writes a full ViTMAEForPreTraining: pass the pretraining run directory or one "
            "of its checkpoints")
    mae = create_mae(model, checkpoint=src, **kw).eval()
    prep = preprocessing_of(src)
    line = hf_folder_line(out)
    folder = write_hf_folder(mae, out, preprocessing=prep,
                             card=lambda h: _card(h, src, "transformers", f"import transformers\nmodel = {line}", prep))
    print(f"wrote {folder}: {mae.encoder.model_name} MAE (encoder + decoder) as a transformers ViTMAEForPreTraining "
          f"folder\nload it: {line}")
    return 0


_EXPORTS = {"safetensors": _export_file, "timm": _export_timm, "hf": _export_hf}


def preprocessing_of(src: str) -> dict[str, Any]:
    """Mean / std (the file's header, else its run's ``data.mean`` / ``data.std``, else ImageNet's),
    interpolation and crop_pct of maevit's evaluation transform (timm's defaults: bicubic, 0.875)."""
    from timm.data import DEFAULT_CROP_PCT

    from maevit.train.file_defaults import recorded_inputs
    from maevit.train.sections import IMAGENET_MEAN, IMAGENET_STD

    found = recorded_inputs(src)
    return {"mean": tuple(found["mean"] or IMAGENET_MEAN), "std": tuple(found["std"] or IMAGENET_STD),
            "interpolation": "bicubic", "crop_pct": DEFAULT_CROP_PCT}


def _card(header: dict, src: str, library: str, code: str, prep: dict) -> str:
    from maevit.model_card import model_card, run_facts
    from maevit.models.weights import find_weights_file
    from maevit.train.runs import run_root_of

    run = run_root_of(find_weights_file(src))
    return model_card(header, run_facts(run) if run is not None else None, library=library, load_code=code,
                      source=src, preprocessing=prep)


if __name__ == "__main__":
    sys.exit(main())
