"""The ``maevit`` command. Each subcommand lives in its own module and parses
its own arguments; this file only dispatches, so importing it stays cheap."""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module:function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("maevit.train.pretrain:main", "MAE pretraining from a recipe (Accelerate)"),
    "finetune": ("maevit.train.finetune:main_finetune", "fine-tune a pretrained encoder for classification"),
    "probe": ("maevit.train.probe:main_probe", "linear probe on a frozen encoder"),
    "eval": ("maevit.train.evaluate:main_eval", "evaluate a classifier: top-1/5, per class, confusion matrix"),
    "visualize": ("maevit.visualize:main", "reconstruction grids from an MAE checkpoint"),
    "shards": ("maevit.data.shards:main", "write / inspect / check webdataset shards"),
    "export": ("maevit.export:main", "export encoder weights with their architecture (timm-loadable where timm can)"),
    "demo": ("maevit.demo:main", "MAE-pretrained vs from scratch on the shipped photos, in minutes"),
    "models": ("maevit.cli:main_models", "list registered models"),
    "embed": ("maevit.embed:main", "features of every image of a data source (pooled or the patch grid), resumable"),
    "knn": ("maevit.embed:main_knn", "kNN top-1 / top-5 of query embeddings against a labeled bank"),
    "recipes": ("maevit.recipes:main_recipes", "list the shipped recipes (`maevit pretrain NAME` runs one)"),
}


def main_models(argv: list[str]) -> int:
    """``maevit models [PATTERN]``: registered models, their family, decoder and description; for one
    exact name also the pretraining and fine-tuning settings registered with it (what unset config
    values become)."""
    import argparse

    p = argparse.ArgumentParser(prog="maevit models", description=main_models.__doc__)
    p.add_argument("pattern", nargs="?", default="", help="substring or glob, e.g. 'swin' or 'mae_vit_*_patch16'")
    a = p.parse_args(argv)
    from maevit.models import list_models, model_info

    names = list_models(a.pattern)
    width = max(map(len, names), default=0)
    for name in names:
        e = model_info(name)
        print(f"{name:<{width}}  {e.family:<6}  decoder {e.decoder.embed_dim}x{e.decoder.depth}  {e.doc}")
    if names == [a.pattern]:  # one model: its defaults, as the config keys they fill
        import json

        from maevit.models import family_defaults

        for stage in ("pretrain", "finetune"):
            values = " ".join(f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}"
                              for k, v in family_defaults(a.pattern, stage).items())
            print(f"  {stage} defaults: {values}")
    return 0


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: maevit COMMAND [ARGS...]    (maevit --version)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`maevit COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("maevit")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    """``maevit COMMAND ...``; bare ``maevit`` prints the usage and exits 2. Ctrl-C in any command exits
    130 without a traceback (training commands save a checkpoint first)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        import torch

        print(f"maevit {_version()} (torch {torch.__version__})")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        print(f"maevit: unknown command {name!r}.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = COMMANDS[name]
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
        func = getattr(module, func_name)
    except (ImportError, AttributeError) as e:
        if module_name in str(e) or func_name in str(e):
            print(f"maevit: command {name!r} is not available in this version ({e})", file=sys.stderr)
            return 2
        raise
    try:
        return int(func(rest) or 0)
    except KeyboardInterrupt:
        print(f"maevit {name}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a folder that is read-only, a file where a folder belongs, a full disk, ...
        from maevit.os_errors import describe_os_error, exit_code_of

        paragraph = describe_os_error(e)
        if paragraph is None:
            raise
        print(f"maevit {name}: error: {paragraph}", file=sys.stderr)
        return exit_code_of(e)
    except Exception:  # everyday mistakes were answered above: what is left is a bug of maevit's
        import traceback

        traceback.print_exc()
        print(f"maevit {name}: this is a bug in maevit (maevit {_version()}), not a mistake in what you passed: "
              "please report it with the traceback above and the command line.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
