"""Experiment trackers by name (``run.tracker``): the one Accelerate starts, the pip line when it is not
installed, and the images of a run (reconstruction grids, curves) sent to it.

Accelerate owns the trackers (``Accelerator(log_with=...)``, ``init_trackers``, ``log``): this module
only maps maevit's config onto it. Accelerate has an image call for some trackers (``log_images``);
for the others the tracker's own call is used (:func:`log_image_file` says which), because an image
that reaches TensorBoard but not MLflow would make the choice of tracker change what a run records.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from maevit.config import ConfigError, to_dict

logger = logging.getLogger("maevit")

# run.tracker -> the pip package that provides it
PACKAGES: dict[str, str] = {
    "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet-ml", "aim": "aim",
    "clearml": "clearml", "dvclive": "dvclive",
}
Tracker = Literal["auto", "none", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive"]
PROJECT = "maevit"  # the project / experiment name in W&B, MLflow, Comet, ClearML


def tracker_available(name: str) -> bool:
    """Whether ``name``'s package is importable here (Accelerate's own check)."""
    import accelerate.utils

    return bool(getattr(accelerate.utils, f"is_{name}_available")())


def resolve_tracker(name: str) -> str | None:
    """``run.tracker`` -> the name for ``Accelerator(log_with=...)``, or None for no tracker.

    ``auto`` is TensorBoard where it is installed, else none (what maevit always did).

    Raises:
        ConfigError: a tracker that is not installed, with the pip command that installs it.
    """
    if name == "none":
        return None
    if name == "auto":
        return "tensorboard" if tracker_available("tensorboard") else None
    if name not in PACKAGES:
        raise ConfigError(f"run.tracker={name!r}: not a tracker maevit knows; choose one of "
                          f"auto, none, {', '.join(PACKAGES)}")
    if not tracker_available(name):
        raise ConfigError(f"run.tracker={name}: {name} is not installed in this environment; install it with "
                          f"`pip install {PACKAGES[name]}`, or choose another tracker (run.tracker=none logs to "
                          "metrics.jsonl only)")
    return name


def _init_kwargs(name: str, run_dir: Path) -> tuple[str, dict[str, Any]]:
    """(project name, keyword arguments of the tracker) for a run in ``run_dir``: everything a tracker
    writes locally goes inside the run directory, and the run is named after it."""
    if name == "tensorboard":  # Accelerate's TensorBoard writes to project_dir / project name
        return "tensorboard", {}
    kwargs = {
        "wandb": {"name": run_dir.name, "dir": str(run_dir)},
        "mlflow": {"run_name": run_dir.name},
        # no DVC experiment commits: a training command never writes to the user's Git repository
        "dvclive": {"dir": str(run_dir / "dvclive"), "save_dvc_exp": False},
        "aim": {},  # its repository: the run directory (Accelerate passes it)
        "comet_ml": {},
        "clearml": {},
    }[name]
    return PROJECT, kwargs


def start_trackers(acc, cfg: Any) -> None:
    """Start the run's tracker, once ``open_run`` has set RUN_DIR up (``run.fresh`` moves an old run aside,
    and a writer opened before that would follow it), with the resolved config as its hyper-parameters.

    Raises:
        ConfigError: the tracker failed to start (e.g. W&B without a login), with what it said.
    """
    if not acc.log_with:
        return
    name = str(acc.log_with[0])
    flat = {f"{s}.{k}": str(v) if isinstance(v, (list, tuple, dict)) or v is None else v
            for s, sec in to_dict(cfg).items() if isinstance(sec, dict) for k, v in sec.items()}
    project, kwargs = _init_kwargs(name, Path(cfg.run.dir))
    try:
        acc.init_trackers(project, config=flat, init_kwargs={name: kwargs})
    except Exception as exn:  # not logged in, no server, a store it refuses: the user's setup, said as such
        first = str(exn).strip().splitlines()[0][:400] if str(exn).strip() else ""
        raise ConfigError(f"run.tracker={name}: {name} could not start ({type(exn).__name__}: {first}). Set it up as "
                          f"its documentation says (login, server or environment variables), or choose another "
                          "tracker (run.tracker=none logs to metrics.jsonl only)") from exn


def log_image_file(acc, tag: str, path: str | os.PathLike, step: int) -> None:
    """Send the PNG at ``path`` (a reconstruction grid, the curves) to the run's tracker as image ``tag``.

    A picture never stops a run: a tracker that fails to take it gets a warning.
    """
    if not acc.is_main_process or not acc.trackers or not Path(path).is_file():
        return
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        img = np.asarray(im.convert("RGB"))  # [H, W, 3] uint8
    for tracker in acc.trackers:
        try:
            _send(tracker, tag, img, Path(path), step)
        except Exception as exn:  # noqa: BLE001
            logger.warning("could not send %s to %s (%s: %s)", path, tracker.name, type(exn).__name__,
                           str(exn).strip().splitlines()[0][:200] if str(exn).strip() else "")


def _send(tracker, tag: str, img, path: Path, step: int) -> None:
    """One image to one tracker: Accelerate's ``log_images`` where it has one, else the tracker's own call."""
    name = tracker.name
    if name == "tensorboard":
        tracker.log_images({tag: img[None]}, step=step, dataformats="NHWC")
    elif name == "wandb":
        tracker.log_images({tag: [img]}, step=step)
    elif name in ("aim", "clearml"):
        tracker.log_images({tag: img}, step=step)
    elif name == "mlflow":  # no image call in Accelerate's MLflow tracker: MLflow's own, as a step image
        import mlflow

        mlflow.log_image(img, key=tag, step=step)
    elif name == "comet_ml":
        tracker.tracker.log_image(img, name=tag, step=step)
    elif name == "dvclive":
        tracker.tracker.log_image(f"{tag}.png", path)
    else:
        logger.debug("no image call for tracker %s: %s stays a file", name, path)
