"""The weights file is the default: image size and normalisation of a fine-tune or probe come from the
file it starts from (``model.pretrained``) unless the command line or recipe sets them.

A pretraining run records its image size in every file it writes (``build_args``) and its mean / std in
the exported encoder's header and in ``RUN_DIR/config.yaml``; fine-tuning a 32 px encoder at the
ImageNet default of 224 px would resample its position table 16x over and normalise with statistics
it never saw. Each value taken is logged with where it came from.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from maevit.train.sections import DEFAULT_IMG_SIZE, IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger("maevit.defaults")


def _run_config(pretrained: str) -> dict[str, Any]:
    """The ``config.yaml`` of the run directory ``pretrained`` names (or sits in), else {}."""
    import yaml

    from maevit.runlayout import CONFIG_FILE

    p = Path(pretrained)
    for folder in (p, p.parent, p.parent.parent, p.parent.parent.parent):
        if (folder / CONFIG_FILE).is_file():
            try:
                return yaml.safe_load((folder / CONFIG_FILE).read_text()) or {}
            except (OSError, yaml.YAMLError):
                return {}
    return {}


def recorded_input(src: str) -> dict[str, Any]:
    """``{"img_size", "mean", "std"}`` that a weights file or run directory records (its header, else its
    run's config.yaml); a value it does not record is None. Read here for the commands' defaults, and by
    :func:`maevit.load` for a loaded model's preprocessing."""
    from maevit.models.weights import read_header

    header = read_header(src)
    run_cfg = _run_config(src)
    size = (header.get("build_args") or {}).get("img_size") or (run_cfg.get("model") or {}).get("img_size")
    return {"img_size": size[0] if isinstance(size, (list, tuple)) else size,
            "mean": header.get("mean") or (run_cfg.get("data") or {}).get("mean"),
            "std": header.get("std") or (run_cfg.get("data") or {}).get("std")}


def fill_from_weights(cfg: Any) -> Any:
    """Fill ``cfg.model.img_size``, ``cfg.data.mean`` and ``cfg.data.std`` where they are None: from
    ``cfg.model.pretrained``'s header (or its run's config.yaml), else 224 px and ImageNet's statistics.
    Returns ``cfg`` (changed in place), whose ``config.yaml`` then records the values used."""
    m, d = cfg.model, cfg.data
    if m.img_size is not None and d.mean is not None and d.std is not None:
        return cfg
    src = m.pretrained
    found = recorded_input(src) if src else {"img_size": None, "mean": None, "std": None}
    defaults = {"img_size": DEFAULT_IMG_SIZE, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    for key, section, name in (("img_size", m, "model.img_size"), ("mean", d, "data.mean"), ("std", d, "data.std")):
        if getattr(section, key) is not None:
            continue
        if found[key] is not None:
            value = int(found[key]) if key == "img_size" else tuple(float(v) for v in found[key])
            where = f"from {src}"
        else:
            value = defaults[key]
            where = (f"the default: {src} does not record it" if src else "the default: no model.pretrained")
        setattr(section, key, value)
        logger.info("%s=%s (%s)", name, list(value) if isinstance(value, tuple) else value, where)
    return cfg
