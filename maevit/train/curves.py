"""Training curves as one PNG: ``RUN_DIR/curves.png``, drawn from ``metrics.jsonl``.

Drawn with PIL (already a dependency; matplotlib is not), one panel per
quantity, x = optimizer step. Pretraining shows the loss, the learning rate
and the online kNN probe; fine-tuning the loss, the learning rate and the
validation accuracy. Rewritten at every checkpoint and at the end, so a
running job's picture is never more than one checkpoint old.
"""
from __future__ import annotations

import logging

import math
import os
from pathlib import Path
from typing import Any, Sequence

from maevit.fileio import save_image_atomic

PRETRAIN_PANELS = (("loss (masked patches)", ("loss",)), ("learning rate", ("lr",)),
                   ("online kNN accuracy (%)", ("knn_top1", "knn_top5")))
FINETUNE_PANELS = (("training loss", ("loss",)), ("learning rate", ("lr",)),
                   ("validation accuracy (%)", ("val_top1", "val_top5", "val_ema_top1")))
PROBE_PANELS = (("training loss", ("loss",)), ("validation accuracy (%)", ("val_top1", "val_top5")))

_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))
_W, _H, _L, _R, _T, _B = 440, 250, 62, 14, 26, 34  # panel size and margins (left, right, top, bottom)


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    """About ``n`` round numbers spanning [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if v == int(v) and abs(v) < 1e7:
        return str(int(v))
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.1e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{v:.3g}"


def _panel(draw, x0: int, y0: int, title: str, series: list[tuple[str, list[tuple[float, float]]]]) -> None:
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    xlo, xhi = min(xs), max(xs)
    ylo, yhi = min(ys), max(ys)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    if yhi == ylo:
        pad = abs(yhi) * 0.1 or 1.0
        ylo, yhi = ylo - pad, yhi + pad
    pw, ph = _W - _L - _R, _H - _T - _B
    px = lambda x: x0 + _L + (x - xlo) / (xhi - xlo) * pw  # noqa: E731
    py = lambda y: y0 + _T + (1 - (y - ylo) / (yhi - ylo)) * ph  # noqa: E731
    draw.text((x0 + _L, y0 + 6), title, fill="black")
    draw.rectangle([x0 + _L, y0 + _T, x0 + _L + pw, y0 + _T + ph], outline=(160, 160, 160))
    for t in _ticks(ylo, yhi):
        draw.line([x0 + _L - 3, py(t), x0 + _L + pw, py(t)], fill=(230, 230, 230))
        draw.text((x0 + 4, py(t) - 6), _fmt(t), fill=(60, 60, 60))
    for t in _ticks(xlo, xhi):
        draw.line([px(t), y0 + _T + ph, px(t), y0 + _T + ph + 3], fill=(120, 120, 120))
        draw.text((px(t) - 3 * len(_fmt(t)), y0 + _T + ph + 6), _fmt(t), fill=(60, 60, 60))
    draw.text((x0 + 4, y0 + _H - 14), "step", fill=(60, 60, 60))
    for i, (name, pts) in enumerate(series):
        color = _COLORS[i % len(_COLORS)]
        line = [(px(x), py(y)) for x, y in pts]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        for x, y in line if len(line) <= 30 else line[-1:]:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        if len(series) > 1:  # legend in the title row, right of the title
            lx, ly = x0 + _L + 6 * len(title) + 14 + 84 * i, y0 + 6
            draw.line([lx, ly + 6, lx + 12, ly + 6], fill=color, width=2)
            draw.text((lx + 15, ly), name, fill="black")


def save_curves(rows: Sequence[dict[str, Any]], path: str | os.PathLike,
                panels: Sequence[tuple[str, Sequence[str]]] = PRETRAIN_PANELS) -> Path | None:
    """Draw the metrics ``rows`` (``metrics.jsonl``) as one PNG with a panel per entry of ``panels``.

    Args:
        rows: dicts with ``step`` and metric keys; non-finite values are left out.
        path: the PNG to write (atomically replaced).
        panels: ``(title, metric keys)``; panels without any value are left out.

    Returns:
        The path, or None when no panel has a value yet.
    """
    from PIL import Image, ImageDraw

    drawn = []
    for title, keys in panels:
        series = [(k, [(float(r["step"]), float(r[k])) for r in rows
                       if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]) for k in keys]
        series = [(k, pts) for k, pts in series if pts]
        if series:
            drawn.append((title, series))
    if not drawn:
        return None
    img = Image.new("RGB", (_W * len(drawn), _H), "white")
    draw = ImageDraw.Draw(img)
    for i, (title, series) in enumerate(drawn):
        _panel(draw, i * _W, 0, title, series)
    path = Path(path)
    return save_image_atomic(img, path)


def save_run_curves(run_dir: str | os.PathLike, panels: Sequence[tuple[str, Sequence[str]]]) -> Path | None:
    """``RUN_DIR/curves.png`` from ``RUN_DIR/metrics.jsonl`` (None while there is nothing to draw).

    A picture never stops a run: any failure (a full disk, a font or image library problem) is a
    warning, and the run goes on to its checkpoints and exported weights."""
    from maevit.train.runs import RunDir, read_metrics

    run = RunDir(run_dir)
    try:
        if not run.metrics_path.is_file():
            return None
        return save_curves(read_metrics(run.metrics_path), run.curves_path, panels)
    except Exception as exn:  # noqa: BLE001 - an optional picture
        logging.getLogger(__name__).warning("could not draw %s (%s: %s); training goes on without it",
                                            run.curves_path, type(exn).__name__,
                                            str(exn).strip().splitlines()[0][:200] if str(exn).strip() else "")
        return None
