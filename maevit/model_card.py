"""The ``README.md`` of an exported model folder: a model card filled from the run that made the weights.

Hugging Face shows a repository's ``README.md`` as its model card (the YAML front
matter sets the library and tags); timm's ``push_to_hf_hub`` writes one too, but
from a timm ``pretrained_cfg`` that knows nothing of the run. Here the facts come
from the run directory alone: the resolved ``config.yaml`` (data, recipe),
``metrics.jsonl`` (steps, final loss, the online kNN probe, validation top-1 of a
fine-tune or a probe), ``eval.json`` (``maevit eval RUN_DIR``) and the newest
checkpoint's ``trainer_state.json`` (processes). A number the run did not measure
is left out, never guessed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from maevit.runlayout import EVAL_FILE, STATE_FILE


@dataclass
class RunFacts:
    """What a run directory says about the weights it made (None: not recorded)."""

    run_dir: Path
    command: str  # pretrain | finetune | probe | unknown: from the file the command exports
    config_text: str = ""  # the resolved config, verbatim
    data: str | None = None
    val_data: str | None = None
    steps: int | None = None
    images_seen: int | None = None
    final_loss: float | None = None
    measured: dict[str, float] = field(default_factory=dict)  # "kNN top-1 (k=20)" -> 26.8, ...


def run_facts(run_dir: str | Path) -> RunFacts:
    """Read :class:`RunFacts` from a run directory (the files each command writes; see :mod:`maevit.train.runs`)."""
    from maevit.train.metrics import read_metrics
    from maevit.train.runs import RunDir

    run = RunDir(run_dir)
    command = next((c for c, p in (("finetune", run.classifier_path), ("probe", run.probe_head_path),
                                   ("pretrain", run.encoder_path)) if p.is_file()), "unknown")
    text = run.config_path.read_text() if run.config_path.is_file() else ""
    cfg = (yaml.safe_load(text) or {}) if text else {}
    data, optim, runcfg = cfg.get("data") or {}, cfg.get("optim") or {}, cfg.get("run") or {}
    facts = RunFacts(run.root, command, text, data.get("train"), data.get("val"))
    rows = read_metrics(run.metrics_path) if run.metrics_path.is_file() else []
    losses = [r for r in rows if isinstance(r.get("loss"), (int, float))]
    if losses:
        facts.steps, facts.final_loss = int(losses[-1]["step"]), float(losses[-1]["loss"])
    ckpt = run.latest_checkpoint()
    state = _json(ckpt / STATE_FILE) if ckpt is not None else {}
    if facts.steps is None and state.get("step"):
        facts.steps = int(state["step"])
    if facts.steps is not None and data.get("batch_size"):
        per_step = int(data["batch_size"]) * int(optim.get("accum_steps") or 1) * int(state.get("num_processes") or 1)
        facts.images_seen = facts.steps * per_step
    knn = [r for r in rows if "knn_top1" in r]
    if knn:
        k = runcfg.get("probe_k", 20)
        where = f" on {runcfg['probe_val']}, bank {runcfg['probe_train']}" if runcfg.get("probe_val") else ""
        facts.measured[f"kNN top-1 (k={k}){where}, step {knn[-1]['step']}"] = float(knn[-1]["knn_top1"])
    val = [r for r in rows if "val_top1" in r]
    if val:
        what = {"finetune": "fine-tune", "probe": "linear probe"}.get(command, "validation")
        facts.measured[f"{what} top-1 on {facts.val_data or 'data.val'}, step {val[-1]['step']}"] = float(
            val[-1]["val_top1"])
    evaluated = _json(run.root / EVAL_FILE)  # `maevit eval RUN_DIR` writes it beside the classifier
    if isinstance(evaluated.get("top1"), (int, float)):
        facts.measured[f"maevit eval top-1 on {evaluated.get('data', '?')} ({evaluated.get('samples', '?')} "
                       "images)"] = float(evaluated["top1"])
    return facts


def _json(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return found if isinstance(found, dict) else {}


_WHAT = {"encoder": "MAE-pretrained encoder", "mae": "masked autoencoder (encoder and decoder)",
         "classifier": "fine-tuned classifier"}


def model_card(
    header: Mapping[str, Any],
    facts: RunFacts | None,
    *,
    library: str,
    load_code: str,
    source: str,
    preprocessing: Mapping[str, Any],
) -> str:
    """The model card (markdown with Hugging Face front matter).

    Args:
        header: the weights' header (:func:`maevit.models.weights.header_of`).
        facts: the run the weights come from, or None (a foreign file).
        library: ``timm`` or ``transformers`` (the Hub's ``library_name``).
        load_code: Python lines that load the folder.
        source: what was exported (the path given to ``maevit export``).
        preprocessing: input size, mean, std, interpolation, crop_pct.
    """
    name, kind = header.get("model_name", "?"), header.get("kind", "encoder")
    lines = ["---", f"library_name: {library}", "tags:", "- image-feature-extraction", "- mae", "- maevit",
             f"- {library}", "---", "", f"# {name}: {_WHAT.get(kind, kind)} (maevit)", "",
             f"Exported by `maevit export` from `{source}`. Architecture (maevit `build_args`): "
             f"`{json.dumps(header.get('build_args', {}))}`.", "", "## Load", "", "```python", load_code, "```", "",
             "## Preprocessing", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in preprocessing.items()]
    if facts is None:
        lines += ["", "## Training", "", "Not exported from a maevit run directory: no training facts recorded."]
        return "\n".join(lines) + "\n"
    rows = [("command", f"maevit {facts.command}"), ("data", facts.data), ("validation data", facts.val_data),
            ("optimizer steps", facts.steps), ("images seen", facts.images_seen),
            ("final training loss", None if facts.final_loss is None else f"{facts.final_loss:.4f}")]
    lines += ["", "## Training", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows if v is not None]
    lines += ["", "## Measured", ""]
    if facts.measured:
        lines += ["| | top-1 (%) |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in facts.measured.items()]
    else:
        lines += ["The run measured no accuracy (no online kNN probe, no validation data)."]
    if facts.config_text:
        lines += ["", "## Recipe (the run's resolved config.yaml)", "", "```yaml", facts.config_text.rstrip(), "```"]
    return "\n".join(lines) + "\n"
