"""What there is to watch while a run trains: the progress bar and its log-line twin (the tracker:
:mod:`maevit.train.trackers`)."""
from __future__ import annotations

import logging

logger = logging.getLogger("maevit")


def progress_bar(enabled: bool, total: int | None, initial: int = 0, unit: str = "step", desc: str | None = None):
    """A tqdm bar with ETA (main process; ``run.progress=false`` turns it off for log files)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True, disable=not enabled)


def report_progress(bar, step: int, total: int, **values: float) -> None:
    """Latest metrics: on the bar, or (bar off, e.g. in a log file) as one log line."""
    shown = {k: (f"{v:.2e}" if k == "lr" else f"{v:.4g}") for k, v in values.items() if v is not None}
    if bar.disable:
        logger.info("step %d/%d  %s", step, total, "  ".join(f"{k} {v}" for k, v in shown.items()))
    else:
        bar.set_postfix(shown, refresh=False)

