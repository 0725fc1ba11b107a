"""``maevit.load(PATH)``: whatever file or run directory maevit wrote -> the model it holds, ready for
inference and carrying its preprocessing; ``maevit.transforms_for(model)`` -> its eval transform.

A notebook needs one call where the command line needs to know which command wrote a file. The file
header says what it holds (:func:`maevit.models.read_header`: ``kind``), and the loaders the commands
use rebuild it: :func:`~maevit.models.create_mae`, :func:`~maevit.models.create_classifier`,
:func:`maevit.train.evaluate.load_classifier` and the probe's :class:`~maevit.train.probe.LinearProbe`.

The preprocessing follows timm's convention, so timm's own helpers read it too
(``timm.data.resolve_data_config(model=model)``): ``model.pretrained_cfg`` holds ``input_size``,
``mean`` / ``std`` (recorded by the run), and maevit's evaluation resize: ``interpolation``
(bicubic) and ``crop_pct`` (resize to size / crop_pct, then center-crop).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from torch import nn

KINDS = ("mae", "encoder", "classifier", "probe_head")


def load(path: str | os.PathLike, *, model: str | None = None) -> nn.Module:
    """The model in a file or run directory written by maevit, in eval mode on the CPU.

    Args:
        path: a pretraining run directory or one of its checkpoints (-> the ``MaskedAutoencoder``;
            ``out = mae(images)``, ``mae.encoder``); ``encoder.safetensors`` or ``maevit export``'s file
            (-> the encoder: ``forward_features`` gives the tokens, calling it the pooled features:
            the class token after the final norm where the family has one, as the kNN probe and
            ``maevit embed`` read it; ``maevit probe`` reads the mean of the patch tokens by default);
            a fine-tuning run directory or ``classifier.safetensors`` (-> the classifier: logits); a probe run directory or ``probe_head.safetensors`` (-> the frozen encoder + the
            probe's head: logits; its encoder is the probe's ``model.pretrained``).
        model: a registered model name (``maevit models``) for weights that do not name their
            architecture (the published MAE files, Hugging Face ViTMAE, timm state dicts: loaded as
            an MAE when they carry a decoder, else as an encoder).

    Returns:
        The model, with ``model.pretrained_cfg`` (timm's keys: ``input_size``, ``mean``, ``std``,
        ``interpolation``, ``crop_pct``, ``num_classes``, ``label_names``; plus ``kind`` and ``file``).

    Raises:
        FileNotFoundError: nothing at ``path``.
        maevit.models.CheckpointError / ModelArgumentError: a file maevit cannot read, or foreign
            weights without ``model``; the message says what to pass.
    """
    from maevit.models.weights import detect_format, read_header, read_state_dict

    header = read_header(path)
    kind = header.get("kind")
    if kind is None:  # weights from elsewhere: an MAE if they carry a decoder
        mae_formats = ("maevit_mae", "mae_published", "hf_vitmae")
        kind = "mae" if detect_format(read_state_dict(path)) in mae_formats else "encoder"
    if kind not in KINDS:
        from maevit.models import CheckpointError

        raise CheckpointError(f"{path} holds a {kind!r}, which maevit.load does not know ({', '.join(KINDS)})")
    net, header = _BUILDERS[kind](path, model, header)
    net.pretrained_cfg = preprocessing(path, net, header, kind)
    return net.eval()


def _mae(path, name, header) -> tuple[nn.Module, dict]:
    from maevit.models import create_mae

    return create_mae(name, checkpoint=path), header


def _encoder(path, name, header) -> tuple[nn.Module, dict]:
    from maevit.models import create_classifier

    # kNN's and embed's pooling: the class token after the pretrained norm ('avg' would replace that
    # norm by a fresh fc_norm); families without a class token average
    return create_classifier(name, 0, pretrained=path, global_pool="token"), header


def _classifier(path, name, header) -> tuple[nn.Module, dict]:
    from maevit.train.evaluate import load_classifier

    return load_classifier(path, name=name)


def _probe(path, name, header) -> tuple[nn.Module, dict]:
    """The probe's encoder (rebuilt as ``maevit probe`` built it, from the run's config.yaml) + its head."""
    import yaml
    from safetensors.torch import load_file

    from maevit.models import CheckpointError, create_classifier
    from maevit.models.weights import find_weights_file
    from maevit.train.probe import LinearProbe
    from maevit.train.runs import RunDir

    head_file = find_weights_file(path)
    run = RunDir(head_file.parent)
    if not run.config_path.is_file():
        raise CheckpointError(f"{head_file} is a linear probe's head, and its run's {run.config_path.name} is not "
                              "beside it to say which encoder it reads: load the probe's run directory")
    m = (yaml.safe_load(run.config_path.read_text()) or {}).get("model") or {}
    encoder = m.get("pretrained")
    if not encoder:
        raise CheckpointError(f"{head_file} probed a randomly initialised encoder (model.pretrained was not set), "
                              "which cannot be rebuilt")
    # model.pretrained as the probe command was given it: from its folder, else beside the run
    found = next((p for p in (Path(encoder), run.root / encoder, run.root.parent / encoder) if p.exists()), None)
    if found is None:
        raise FileNotFoundError(f"{head_file}: the encoder it probes, model.pretrained={encoder} "
                                f"(in {run.config_path}), is not found from here: load it from the folder "
                                "the probe ran in")
    enc = create_classifier(m.get("name") or name, 0, pretrained=found, global_pool=m.get("global_pool", "token"),
                            img_size=m.get("img_size"), **(m.get("args") or {}))
    probe = LinearProbe(enc, int(header["num_classes"]))
    probe.head.load_state_dict(load_file(str(head_file)))
    return probe, header


_BUILDERS: dict[str, Callable[..., tuple[nn.Module, dict]]] = {
    "mae": _mae, "encoder": _encoder, "classifier": _classifier, "probe_head": _probe}


def preprocessing(src: Any, net: nn.Module, header: dict[str, Any], kind: str) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` keys for ``net`` loaded from ``src``: the size it was built at, the
    mean / std its run recorded (ImageNet's where none is recorded, as the commands default), and the
    resize + center crop maevit evaluates with."""
    from timm.data import DEFAULT_CROP_PCT

    from maevit.train.file_defaults import recorded_inputs
    from maevit.train.sections import IMAGENET_MEAN, IMAGENET_STD

    recorded = recorded_inputs(str(src))
    encoder = getattr(net, "encoder", net)  # an MAE's or a probe's encoder
    size = getattr(encoder, "img_size", None) or recorded["img_size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    chans = int(getattr(encoder, "in_chans", None) or (header.get("build_args") or {}).get("in_chans") or 3)
    num_classes = int(header.get("num_classes") or 0) if kind in ("classifier", "probe_head") else 0
    return {
        "architecture": header.get("timm_model") or header.get("model_name") or type(encoder).__name__,
        "input_size": (chans, int(h), int(w)),
        "mean": tuple(float(v) for v in (recorded["mean"] or IMAGENET_MEAN)),
        "std": tuple(float(v) for v in (recorded["std"] or IMAGENET_STD)),
        "interpolation": "bicubic",  # maevit's evaluation transform (maevit.data.transforms.labeled_transform)
        "crop_pct": DEFAULT_CROP_PCT,  # ... which keeps timm's default crop
        "crop_mode": "center",
        "num_classes": num_classes,
        "label_names": list(header.get("class_names") or []) or None,
        "kind": kind,
        "file": str(src),
    }


def transforms_for(model: nn.Module) -> Callable:
    """The eval transform of a model from :func:`load` (or any timm model): PIL image -> normalised
    ``[C, H, W]`` tensor, as ``maevit eval`` / ``probe`` preprocess (resize, center crop, normalise).

    Raises:
        ValueError: the model has no ``pretrained_cfg`` saying its input size and mean / std.
    """
    from maevit.data.transforms import labeled_transform

    cfg = getattr(model, "pretrained_cfg", None) or {}
    missing = [k for k in ("input_size", "mean", "std") if not cfg.get(k)]
    if missing:
        raise ValueError(f"{type(model).__name__} has no pretrained_cfg with {', '.join(missing)}: load it with "
                         "maevit.load(PATH), which records them")
    return labeled_transform(tuple(cfg["input_size"][1:]), False, mean=cfg["mean"], std=cfg["std"],
                             interpolation=cfg.get("interpolation", "bicubic"), crop_pct=cfg.get("crop_pct"))
