"""Typed configs: dataclasses are the schema; YAML recipes and ``key=value``
overrides are merged onto them and validated.

Order of precedence (lowest first): dataclass defaults, the recipe YAML,
command-line overrides. Unknown keys and wrong types raise ``ConfigError``
naming the key and the valid choices.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value that does not fit the schema."""


# ----------------------------------------------------------------------------- ranges


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric key accepts: ``lo`` / ``hi`` (None: unbounded), each end open or closed.

    A list value (e.g. ``data.mean``) is checked element by element. ``hint`` is added to the message
    when a value falls outside (e.g. "mean / std are on the 0-1 scale").
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    hint: str = ""

    def __contains__(self, x: float) -> bool:
        if x != x:  # NaN is in no range
            return False
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return not (self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi))

    def __str__(self) -> str:
        if self.lo is None and self.hi is None:
            return "any"
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


def _at_least(lo: float, hint: str = "") -> Range:
    return Range(lo, None, hint=hint)


def _positive(hint: str = "") -> Range:
    return Range(0, None, lo_open=True, hint=hint)


_UNIT = Range(0, 1)
_SCALE_HINT = "mean / std are on the 0-1 pixel scale: divide 0-255 figures by 255 (e.g. 123.7 -> 0.485)"

# One table for every numeric key of every command (pretrain, finetune, probe): the schema checks
# each value here at load time, and `--help` prints the range beside the key. A key missing here is
# a test failure (tests/test_config.py), so a new numeric key cannot go unchecked.
RANGES: dict[str, Range] = {
    # model
    "model.img_size": _at_least(1), "model.patch_size": _at_least(1), "model.embed_dim": _at_least(1),
    "model.depth": _at_least(1), "model.num_heads": _at_least(1), "model.decoder_embed_dim": _at_least(1),
    "model.decoder_depth": _at_least(1), "model.decoder_num_heads": _at_least(1),
    "model.mask_ratio": Range(0, 1, lo_open=True, hi_open=True,
                              hint="0 masks nothing (no loss) and 1 leaves the encoder nothing to see"),
    "model.num_classes": _at_least(2, "a classifier needs at least two classes"),
    "model.drop_path": Range(0, 1, hi_open=True),
    # data
    "data.batch_size": _at_least(1), "data.num_workers": _at_least(0), "data.samples_per_epoch": _at_least(1),
    "data.shuffle_buffer": _at_least(1), "data.max_pixels": _at_least(1),
    "data.mean": Range(0, 1, hint=_SCALE_HINT), "data.std": Range(0, 1, lo_open=True, hint=_SCALE_HINT),
    "data.scale": Range(0, 1, lo_open=True, hint="RandomResizedCrop area fractions"),
    "data.label_fraction": Range(0, 1, lo_open=True), "data.label_seed": _at_least(0),
    "data.re_prob": _UNIT, "data.mixup": _at_least(0), "data.cutmix": _at_least(0),
    "data.smoothing": Range(0, 1, hi_open=True),
    # optim
    "optim.epochs": _at_least(1), "optim.base_lr": _positive(), "optim.lr": _positive(),
    "optim.weight_decay": _at_least(0), "optim.betas": Range(0, 1, hi_open=True),
    "optim.warmup_epochs": _at_least(0), "optim.min_lr": _at_least(0), "optim.clip_grad": _positive(),
    "optim.accum_steps": _at_least(1), "optim.max_steps": _at_least(1),
    "optim.layer_decay": Range(0, 1, lo_open=True, hint="1.0 turns layer decay off"),
    # run
    "run.seed": _at_least(0), "run.log_every": _at_least(1), "run.keep_last": _at_least(1),
    "run.max_nonfinite": _at_least(1), "run.peak_tflops": _positive(), "run.ckpt_every": _at_least(0),
    "run.viz_every": _at_least(0), "run.viz_images": _at_least(1), "run.probe_every": _at_least(0),
    "run.probe_k": _at_least(1), "run.ema": Range(0, 1, lo_open=True, hi_open=True),
    "run.eval_every": _at_least(1), "run.hang_timeout": _at_least(0),
    # distill
    "distill.weight": _at_least(0), "distill.student_block": Range(hint="a block index; negative counts from the last block"), "distill.alpha": _UNIT,
    "distill.tau": _positive(),
}


def check_range(key: str, value: Any) -> None:
    """Raise ``ConfigError`` when ``value`` (a number or a list of numbers) is outside ``RANGES[key]``."""
    rng = RANGES.get(key)
    if rng is None or value is None or isinstance(value, bool):
        return
    items = value if isinstance(value, (list, tuple)) else [value]
    bad = [x for x in items if isinstance(x, (int, float)) and not isinstance(x, bool) and x not in rng]
    if bad:
        shown = list(value) if isinstance(value, (list, tuple)) else value
        hint = f"; {rng.hint}" if rng.hint else ""
        each = "each value of " if isinstance(value, (list, tuple)) else ""
        raise ConfigError(f"{each}{key} must be {'in ' if rng.lo is not None and rng.hi is not None else ''}{rng}, "
                          f"got {shown}{hint}")


def ranged(kind: type, rng: Range):
    """An argparse ``type=`` that reads ``kind`` and checks ``rng`` (for the options of ``shards``, ``eval``,
    ``visualize``): a value outside is argparse's one-line usage error and exit 2."""
    import argparse

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if value not in rng:
            both = rng.lo is not None and rng.hi is not None
            raise argparse.ArgumentTypeError(f"must be {'in ' if both else ''}{rng}, got {text}"
                                             + (f" ({rng.hint})" if rng.hint else ""))
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


# words that mean "no value" on the command line and in recipes (YAML reads only null / ~ as null)
NULL_WORDS = frozenset({"null", "Null", "NULL", "none", "None", "NONE", "~", ""})


# names other toolkits use for a key, mapped to ours: difflib alone would offer
# `min_lr` for `lr`, where the key meant is `base_lr`
ALIASES: dict[str, tuple[str, ...]] = {
    "lr": ("base_lr", "lr"), "blr": ("base_lr",), "learning_rate": ("base_lr", "lr"), "wd": ("weight_decay",),
    "warmup": ("warmup_epochs",), "warmup_steps": ("warmup_epochs",), "bs": ("batch_size",),
    "batch": ("batch_size",), "workers": ("num_workers",), "output_dir": ("dir",),
    "arch": ("name",), "steps": ("max_steps",), "clip": ("clip_grad",),
}


def _close(name: str, choices) -> str:
    """The "Did you mean ...?" hint for a misspelled key: known aliases first, then close spellings."""
    choices = list(choices)
    close = [c for c in ALIASES.get(name.lower(), ()) if c in choices]
    close += [c for c in difflib.get_close_matches(name, choices, n=3, cutoff=0.5) if c not in close]
    return f" Did you mean {', '.join(repr(c) for c in close[:3])}?" if close else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return the converted value."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        if isinstance(value, str) and value in NULL_WORDS and type(None) in options:
            # `key=None` means off, unless "none" is itself one of the key's choices
            literal = [c for o in options if get_origin(o) is Literal for c in get_args(o)]
            return value if value in literal else None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not a {' or '.join(_type_name(o) for o in options)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as the number it means
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: cannot read {value!r} as {_type_name(tp)}")


def config_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a config section in the order it shows them: its ``KEY_ORDER`` (a section built
    from shared bases keeps its own order of keys), else definition order; fields it does not
    name follow, in definition order."""
    fields = list(dataclasses.fields(cls))
    order = getattr(cls, "KEY_ORDER", None)
    if not order:
        return fields
    rank = {name: i for i, name in enumerate(order)}
    return sorted(fields, key=lambda f: rank.get(f.name, len(rank)))


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, validating keys and types."""
    hints = get_type_hints(cls)
    names = [f.name for f in config_fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(
                f"unknown config key {prefix + str(key)!r}.{_close(str(key), names)} "
                f"Valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
        check_range(f"{prefix}{key}", kwargs[key])
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) of a config dataclass."""

    def plain(v):
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in config_fields(type(v))}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def fill_unset(cfg: T, values: typing.Mapping[str, Any]) -> T:
    """A copy of ``cfg`` with each dotted key of ``values`` set where ``cfg`` leaves it None.

    Fields that default to None mean "the model's own setting"; this puts the model's setting
    (e.g. :func:`maevit.models.registry.family_defaults`) there, so a saved config states the
    value every run used. Values already set (a recipe, the command line) are kept.

    Raises:
        ConfigError: a key the config does not have, or a value of the wrong type.
    """
    data = to_dict(cfg)
    for dotted, value in values.items():
        node = data
        *sections, last = dotted.split(".")
        for part in sections:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            raise ConfigError(f"fill_unset: {type(cfg).__name__} has no key {dotted!r}")
        if node[last] is None:
            node[last] = value
    return from_dict(type(cfg), data)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part!r} is not a section")
    node[parts[-1]] = value


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``update`` wins; nested mappings are merged."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: typing.Iterable[str]) -> dict[str, Any]:
    """``["optim.lr=1e-3", "data.train=a.tar"]`` -> nested dict; values read as YAML."""
    data: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.epochs=50)")
        key, raw = item.split("=", 1)
        if "#" in raw and not raw.lstrip().startswith(("[", "{", "'", '"')):
            _set_dotted(data, key.strip(), raw)  # text, not a YAML comment: run.dir=runs/#3 keeps "#3"
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)}); "
                              "quote it: key='\"value\"'") from None
        _set_dotted(data, key.strip(), value)
    return data


def _yaml_problem(e: Exception) -> str:
    """One line from a YAML error: what and where."""
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{what} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else what


def load_config(
    cls: type[T], recipe: str | Path | None = None, overrides: typing.Iterable[str] = ()
) -> T:
    """Defaults <- recipe YAML <- ``key=value`` overrides, validated into ``cls``."""
    data: dict[str, Any] = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            tag = " (Python tags like !!python/object are never read: recipes are plain YAML)" if "python/" in str(e) else ""
            raise ConfigError(f"recipe {str(path)!r} is not plain YAML: {_yaml_problem(e)}{tag}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"recipe {str(path)!r} must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    data = merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def make_config(cls: type[T], **sections: typing.Mapping[str, Any]) -> T:
    """A config from Python values, section by section: defaults <- ``sections``, with the same checks as
    a recipe (keys, types, ranges). For code that builds configs (the demo, benchmarks)::

        make_config(PretrainConfig, model={"name": "mae_vit_tiny_patch16", "img_size": 32}, run={"dir": "runs/x"})
    """
    return from_dict(cls, {name: dict(values) for name, values in sections.items()})


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as plain YAML (atomically)."""
    from maevit.fileio import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- help text


def _field_comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the source of ``cls`` and its bases: the trailing ``# comment``
    of a field's line, else the comment lines right above it (the first class in the MRO wins)."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    out: dict[str, str] = {}
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (e.g. defined in a REPL)
            continue
        comments: dict[int, str] = {}
        code_lines: set[int] = set()
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
            elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                code_lines.add(tok.start[0])
        for node in ast.parse(src).body[0].body:
            if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
                continue
            name = node.target.id
            text = comments.get(node.end_lineno) or comments.get(node.lineno)
            if not text:  # a block of comment lines right above the field
                above, line = [], node.lineno - 1
                while line in comments and line not in code_lines:
                    above.insert(0, comments[line])
                    line -= 1
                text = " ".join(above)
            if len(text) > 110 and ". " in text:  # a long explanation: its first sentence
                text = text.split(". ")[0] + "."
            if text and name not in out:
                out[name] = text
    return out


def _show_type(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(c) for c in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _show_type(a) for a in get_args(tp))
    if origin in (list, tuple):
        return "list"
    if origin is dict:
        return "mapping"
    return _type_name(tp)


def config_keys(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """``(key, type, default, comment)`` of every leaf field of config dataclass ``cls``.

    Read from the dataclasses themselves (defaults of a default instance, comments
    from the source), so ``--help`` can never drift from the schema.
    """
    obj, hints, comments = cls(), get_type_hints(cls), _field_comments(cls)
    rows = []
    for f in config_fields(cls):
        tp, value = hints[f.name], getattr(obj, f.name)
        if dataclasses.is_dataclass(tp):
            rows += config_keys(tp, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", _show_type(tp), value, comments.get(f.name, "")))
    return rows


def format_config_keys(cls: type) -> str:
    """The config keys of ``cls`` as aligned text lines: key, type, default, comment."""

    def show(v: Any) -> str:
        if isinstance(v, tuple):
            v = list(v)
        return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()

    def with_range(key: str, comment: str) -> str:
        return f"{comment} (range {RANGES[key]})".strip() if key in RANGES else comment

    rows = [(k, t, show(d), with_range(k, c)) for k, t, d, c in config_keys(cls)]
    wk, wt, wd = (min(34, max(len(r[i]) for r in rows)) for i in range(3))
    return "\n".join(f"  {k:<{wk}}  {t:<{wt}}  {d:<{wd}}  {c}".rstrip() for k, t, d, c in rows)
