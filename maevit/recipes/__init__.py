"""The recipes shipped with maevit: where they are, what each is for, and a recipe argument -> its file.

One source of truth: the repository's top-level ``pretrain/`` and ``finetune/`` folders, where users
and the README look for them. A wheel carries the same files as ``maevit/recipes/<stage>/`` (setup.py
maps the folders into this package), so an installed maevit is the complete toolkit; a source
checkout, an editable install or ``PYTHONPATH`` reads the top-level folders themselves.
"""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

STAGES = ("pretrain", "finetune")


def recipe_root() -> Path:
    """The folder holding ``pretrain/`` and ``finetune/``: this package in an installed wheel, the
    repository's top level in a source checkout (where this package holds no recipes of its own)."""
    here = Path(__file__).resolve().parent
    return here if (here / STAGES[0]).is_dir() else here.parents[1]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One shipped recipe: ``maevit STAGE NAME`` runs it."""

    stage: str   # "pretrain" or "finetune"
    name: str    # file name without .yaml, e.g. "cifar10_swin"
    path: Path
    model: str   # its model.name ("-" when the recipe leaves the config default)
    about: str   # first sentence of its leading comment


def _about(text: str) -> str:
    """First sentence of a recipe's leading comment block (the recipes open with what they are for)."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    words = " ".join(lines)
    end = words.find(". ")
    return words if end < 0 else words[: end + 1]


def _read(stage: str, path: Path) -> Recipe:
    import yaml

    text = path.read_text()
    data = yaml.safe_load(text) or {}
    model = (data.get("model") or {}).get("name") if isinstance(data, dict) else None
    return Recipe(stage, path.stem, path, str(model or "-"), _about(text))


def list_recipes(stage: str | None = None) -> list[Recipe]:
    """The shipped recipes of ``stage`` (both stages when None), sorted by stage then name."""
    root = recipe_root()
    return [_read(s, p) for s in STAGES if stage in (None, s) for p in sorted((root / s).glob("*.yaml"))]


def _split(text: str, stage: str) -> tuple[str, str]:
    """``NAME``, ``NAME.yaml``, ``STAGE/NAME(.yaml)`` -> (stage, name); a bare name is the command's stage."""
    head, _, tail = text.replace("\\", "/").rpartition("/")
    name = tail.removesuffix(".yaml").removesuffix(".yml")
    return (head if head in STAGES else stage), name


def resolve_recipe(text: str, stage: str) -> Path:
    """A recipe argument of ``maevit STAGE`` -> the file to load.

    An existing file wins (any path, as before); otherwise a shipped recipe by name:
    ``cifar10_swin``, ``cifar10_swin.yaml`` or ``pretrain/cifar10_swin.yaml`` (the form the
    README uses, so its commands work from any folder once maevit is installed).

    Raises:
        maevit.config.ConfigError: neither a file nor a shipped recipe; the message lists the
            closest shipped names and the command that lists all of them.
    """
    from maevit.config import ConfigError

    if Path(text).is_file():
        return Path(text)
    where, name = _split(text, stage)
    path = recipe_root() / where / f"{name}.yaml"
    if name and path.is_file():
        return path
    names = [r.name for r in list_recipes(where)]
    near = difflib.get_close_matches(name, names, n=4, cutoff=0.5) or [n for n in names if name and name in n][:4]
    other = [s for s in STAGES if s != where and (recipe_root() / s / f"{name}.yaml").is_file()]
    hint = (f" The closest {where} recipes: {', '.join(near)}." if near else "")
    hint += (f" ({name} is a {other[0]} recipe: `maevit {other[0]} {name}`.)" if other else "")
    raise ConfigError(f"recipe {text!r}: no such file, and no shipped {where} recipe of that name.{hint} "
                      f"`maevit recipes` lists the {len(list_recipes())} shipped recipes.")


def main_recipes(argv: list[str]) -> int:
    """``maevit recipes [PATTERN]``: the shipped recipes, one line each (stage, name, model, what it is
    for); ``maevit pretrain NAME`` / ``maevit finetune NAME`` run one, ``--path`` shows where they are."""
    import argparse
    import fnmatch
    import shutil
    import sys
    import textwrap

    p = argparse.ArgumentParser(prog="maevit recipes", description=main_recipes.__doc__)
    p.add_argument("pattern", nargs="?", default="", help="substring or glob of the name, e.g. 'cifar10' or '*swin*'")
    p.add_argument("--path", action="store_true", help="print each recipe's file instead of its description")
    a = p.parse_args(argv)
    found = [r for r in list_recipes()
             if not a.pattern or a.pattern in r.name or fnmatch.fnmatch(r.name, a.pattern)]
    if not found:
        print(f"maevit recipes: no recipe matches {a.pattern!r}; `maevit recipes` lists all of them",
              file=sys.stderr)
        return 2
    name_w, model_w = max(len(r.name) for r in found), max(len(r.model) for r in found)
    room = max(40, shutil.get_terminal_size().columns - (8 + name_w + model_w + 6))
    for r in found:  # one line each; on a terminal the description is cut to its width (grep gets it whole)
        what = r.path if a.path else textwrap.shorten(r.about, room, placeholder=" ...") if sys.stdout.isatty() \
            else r.about
        print(f"{r.stage:<8}  {r.name:<{name_w}}  {r.model:<{model_w}}  {what}")
    return 0
