"""Command-line plumbing of the training commands: recipe + overrides -> config -> run -> summary,
and the exit codes (0 done, 1 stopped by the run's own state, 2 usage error, 130 interrupted)."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from maevit.config import ConfigError, format_config_keys, load_config, to_dict
from maevit.recipes import STAGES, resolve_recipe
from maevit.train.step import NonFiniteLossError
from maevit.train.stopping import TrainingInterrupted, ctrl_c_stops_training, stop_signal_name

logger = logging.getLogger("maevit")


@contextlib.contextmanager
def building_model():
    """Model-construction errors from config values (sizes that do not divide, unknown option values)
    become :class:`~maevit.models.ModelArgumentError` usage errors instead of tracebacks."""
    from maevit.models import ModelArgumentError

    try:
        yield
    except ValueError as e:
        if isinstance(e, usage_errors()):
            raise
        raise ModelArgumentError(f"cannot build the model: {e}") from e


def setup_logging() -> None:
    """INFO from the main process only; Accelerate's per-file messages stay quiet."""
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    import warnings

    # "warning: ..." rather than "path/to/file.py:123: UserWarning: ...\n  the source line"
    warnings.formatwarning = lambda msg, category, *a, **k: f"warning: {msg}\n"


def usage_errors() -> tuple[type[BaseException], ...]:
    """Everyday mistakes that get a one-paragraph message and exit code 2, never a traceback."""
    from maevit.data.labels import ClassMismatchError
    from maevit.data.stream import DataSourceError
    from maevit.models import CheckpointError, ModelArgumentError
    from maevit.train.runs import RunError

    return (ConfigError, ModelArgumentError, CheckpointError, DataSourceError, ClassMismatchError, RunError,
            FileNotFoundError)


def run_recipe_command(
    prog: str,
    description: str,
    cfg_cls: type,
    run: Callable[[Any], dict[str, Any]],
    argv: list[str] | None,
    *,
    summary: Callable[[dict[str, Any]], str],
    epilog: str = "",
    label_fraction_flag: bool = False,
) -> int:
    """``PROG [RECIPE] [key=value ...] [--print-config]``: load the config, run, print a summary.

    ``RECIPE`` is a YAML file or, for pretrain / finetune, a shipped recipe's name
    (:func:`maevit.recipes.resolve_recipe`), so the README's commands work from any folder.

    Usage errors (config keys, model names, checkpoints, data sources) print one
    paragraph and exit 2; non-finite training stops and out-of-memory errors
    print advice and exit 1; Ctrl-C exits 130 (after the loop saved a
    checkpoint, with the command that resumes). ``--help`` lists every config
    key with its type, default and comment, read from ``cfg_cls``.

    Args:
        label_fraction_flag: accept ``--label-fraction F`` as a shorthand for ``data.label_fraction=F``.
    """
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(f"{epilog}\n\n" if epilog else "") + "config keys (key=value overrides; type, default, meaning):\n"
        + format_config_keys(cfg_cls))
    p.add_argument("recipe", nargs="?", default=None,
                   help="recipe YAML, or the name of a shipped recipe (`maevit recipes` lists them; optional)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.epochs=10 run.dir=runs/x")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    if label_fraction_flag:
        p.add_argument("--label-fraction", type=float, default=None, help="= data.label_fraction (e.g. 0.1)")
    argv = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_intermixed_args(argv)
    recipe, overrides = a.recipe, list(a.overrides)
    if recipe is not None and "=" in recipe and not Path(recipe).exists():  # no recipe, only overrides
        recipe, overrides = None, [recipe, *overrides]
    if getattr(a, "label_fraction", None) is not None:
        overrides.append(f"data.label_fraction={a.label_fraction}")
    setup_logging()
    main_process = os.environ.get("RANK", "0") == "0"
    cfg = None
    try:
        stage = prog.split()[-1]  # "maevit pretrain" -> pretrain: a recipe name means a shipped recipe of it
        if recipe is not None and stage in STAGES:
            recipe = resolve_recipe(recipe, stage)
        cfg = load_config(cfg_cls, recipe, overrides)
        if a.print_config:
            import yaml

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None), end="")
            return 0
        from tqdm.contrib.logging import logging_redirect_tqdm

        with ctrl_c_stops_training(), logging_redirect_tqdm():  # log lines above the progress bar, not through it
            result = run(cfg)
    except usage_errors() as e:
        from maevit.train.runs import DiskFullError

        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, DiskFullError) else 2
    except NonFiniteLossError as e:
        print(f"{prog}: stopped: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        signame = stop_signal_name() or "SIGINT"
        if main_process:
            again = [x for x in argv if not x.startswith("run.fresh=")]  # fresh again would move this run aside
            again += ["run.fresh=false"] if cfg.run.fresh else []
            how = "the same command" if again == argv else "this command (without run.fresh=true)"
            cmd = shlex.join([*prog.split(), *again])
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by a launcher: the same launch line
                cmd = f"torchrun / accelerate launch ... -m maevit.cli {cmd.removeprefix('maevit ')}"
            what = "interrupted" if signame == "SIGINT" else f"preempted ({signame})"
            print(f"{prog}: {what} at step {e.step}; checkpoint saved in {e.checkpoint}. Resume with {how}:\n"
                  f"  {cmd}", file=sys.stderr)
        return 128 + int(getattr(signal, signame))  # 130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1
    except KeyboardInterrupt:  # before the training loop, a second Ctrl-C, or a command without checkpoints
        if main_process:
            run_cfg = getattr(cfg, "run", None)
            resumable = hasattr(run_cfg, "ckpt_every")
            print(f"{prog}: interrupted" + (f"; nothing saved since the last checkpoint in {run_cfg.dir}, if any "
                                            "(the same command resumes from it)" if resumable else ""),
                  file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as e:
        from maevit.train.memory import is_out_of_memory, oom_message

        if not is_out_of_memory(e):
            raise
        print(f"{prog}: error: {oom_message(getattr(getattr(cfg, 'data', None), 'batch_size', None))} "
              f"(torch said: {str(e).splitlines()[0][:200]})", file=sys.stderr)
        return 1
    if main_process:
        print(summary(result))
    return 0
