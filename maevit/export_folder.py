"""Model folders: an encoder as timm shares models, a plain-ViT MAE as Hugging Face does.

``maevit export SRC OUT_DIR --format timm`` writes what ``timm.create_model("local-dir:OUT_DIR",
pretrained=True)`` (and, once uploaded with ``huggingface_hub.upload_folder``, ``hf-hub:USER/NAME``)
reads: ``config.json`` in timm's format, ``model.safetensors`` and a ``README.md`` model card.
The folder is written by timm itself (``timm.models.save_for_hf``) from the timm
twin of the encoder, built and loaded strictly here first, so the folder is what timm would
have written for the same weights. ``--format hf`` writes a ``transformers``
``ViTMAEForPreTraining`` folder with ``save_pretrained`` (the weights converted by
:mod:`maevit.models.hf_vitmae`).

Both ``config.json`` files carry the maevit header under the key ``maevit``, so every maevit
command reads a folder wherever it reads a weights file (:func:`maevit.models.weights.read_header`).
A folder is written beside its destination and renamed onto it: a kill leaves the old folder or
the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from maevit.fileio import atomic_write
from maevit.models.weights import FOLDER_CONFIG, FOLDER_HEADER_KEY, encoder_export, header_of, save_weights

WEIGHTS_FILE = "model.safetensors"  # timm's and transformers' name
CARD_FILE = "README.md"  # the Hub's model card
# pretrained_cfg fields timm copies from the published weights of the architecture the folder names
# (their tag, licence, paper): they describe those weights, not these
_SOURCE_FIELDS = ("tag", "license", "paper_ids", "paper_name", "notes", "origin_url", "hf_hub_id", "url",
                  "hf_hub_filename", "description")


class ExportFormatError(ValueError):
    """The model cannot be written in the asked format (no timm twin, not a plain-ViT MAE, ...)."""


def timm_folder_line(folder: str | os.PathLike) -> str:
    """The line that loads a timm model folder."""
    return f"timm.create_model({f'local-dir:{folder}'!r}, pretrained=True)"


def hf_folder_line(folder: str | os.PathLike) -> str:
    """The line that loads a Hugging Face ViTMAE folder."""
    return f"transformers.ViTMAEForPreTraining.from_pretrained({str(folder)!r})"


def write_timm_folder(model: nn.Module, out_dir: str | os.PathLike, *, preprocessing: Mapping[str, Any],
                      card: Callable[[Mapping[str, Any]], str], class_names: list[str] | None = None) -> Path:
    """Write the encoder of ``model`` (an MAE, an encoder or a classifier) as a timm model folder; with
    ``class_names``, the classifier ``model`` with its head (timm's ``label_names``).

    Args:
        model: any maevit model whose encoder has a timm twin (``timm_spec()``).
        out_dir: the folder (replaced if it is an earlier model folder).
        preprocessing: ``mean``, ``std``, ``interpolation``, ``crop_pct`` of the images it expects.
        card: header -> the ``README.md`` text.
        class_names: the classes of a classifier's logits: the head is kept.

    Raises:
        ExportFormatError: the family (or an option of it) has no timm architecture.
    """
    import timm

    norm = {"mean": list(preprocessing["mean"]), "std": list(preprocessing["std"])}
    if class_names is None:
        sd, header = encoder_export(model, **norm)
    else:
        sd, header = dict(model.state_dict()), header_of(model, "classifier", class_names=list(class_names), **norm)
    if not header.get("timm_model"):
        encoder = getattr(model, "encoder", model)
        raise ExportFormatError(
            f"{header['model_name']} has no timm architecture (timm {timm.__version__} has none for the cvt and "
            f"sret families, nor for ViT options other than sin-cos / learned positions with plain attention; "
            f"this one has {_options(encoder)}), so `--format timm` cannot write a folder timm loads. Write the "
            f"maevit format instead (`maevit export SRC OUT.safetensors`): every maevit command and "
            f"`maevit.create_classifier(None, NUM_CLASSES, pretrained=FILE)` rebuild it.")
    twin = timm.create_model(header["timm_model"], pretrained=False, **header["timm_kwargs"])
    twin.load_state_dict(sd, strict=True)  # the folder must load strictly: check it before writing anything
    enc = getattr(model, "encoder", model)
    data_config = {"input_size": (enc.in_chans, *enc.img_size), **preprocessing}

    def fill(tmp: Path) -> None:
        labels = {} if class_names is None else {"label_names": list(class_names)}
        try:
            timm.models.save_for_hf(twin, str(tmp), model_config={FOLDER_HEADER_KEY: header, **labels},
                                    safe_serialization=True, data_config=data_config)
        except TypeError as e:  # older timm: no save_for_hf(data_config=...) (nor `local-dir:` loading)
            raise ExportFormatError(f"`--format timm` needs a newer timm than {timm.__version__} (tested with "
                                    f"1.0.31): pip install -U timm ({e})") from e
        config = json.loads((tmp / FOLDER_CONFIG).read_text())
        for key in _SOURCE_FIELDS:
            config["pretrained_cfg"].pop(key, None)
        (tmp / FOLDER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_weights(sd, tmp / WEIGHTS_FILE, header)  # timm's tensors again, with the header: the file can travel alone
        (tmp / CARD_FILE).write_text(card(header))

    return replace_folder(out_dir, fill)


def write_hf_folder(mae: nn.Module, out_dir: str | os.PathLike, *, preprocessing: Mapping[str, Any],
                    card: Callable[[Mapping[str, Any]], str]) -> Path:
    """Write a plain-ViT ``MaskedAutoencoder`` (with its decoder) as a ``ViTMAEForPreTraining`` folder.

    Also writes ``preprocessor_config.json`` (``ViTImageProcessor``: size, mean, std), which
    ``AutoImageProcessor.from_pretrained`` reads.

    Raises:
        ExportFormatError: not an MAE, or not one Hugging Face's ViTMAE can express.
    """
    from transformers import ViTImageProcessor, ViTMAEForPreTraining

    from maevit.models.hf_vitmae import hf_vitmae_config, to_hf_vitmae_keys

    _check_hf_expressible(mae)
    header = header_of(mae, "mae", mean=list(preprocessing["mean"]), std=list(preprocessing["std"]))
    config = hf_vitmae_config(mae)
    setattr(config, FOLDER_HEADER_KEY, header)  # saved into config.json with the other attributes
    hf = ViTMAEForPreTraining(config).eval()
    layout = "transformers5" if any(k.startswith("vit.layers.") for k in hf.state_dict()) else "hub"
    hf.load_state_dict(to_hf_vitmae_keys(mae.state_dict(), layout), strict=True)
    h, w = mae.encoder.img_size
    processor = ViTImageProcessor(size={"height": h, "width": w}, image_mean=list(preprocessing["mean"]),
                                  image_std=list(preprocessing["std"]), resample=3)  # 3: PIL bicubic

    def fill(tmp: Path) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Writing model shards" for one small file
        hf.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        (tmp / CARD_FILE).write_text(card(header))

    return replace_folder(out_dir, fill)


def _check_hf_expressible(mae: nn.Module) -> None:
    from maevit.models.vit import ViTEncoder

    enc = getattr(mae, "encoder", None)
    if enc is None or not hasattr(mae, "decoder"):
        raise ExportFormatError(
            "`--format hf` writes a full MAE (encoder and decoder) as transformers' ViTMAEForPreTraining, but the "
            "source holds an encoder alone: pass the pretraining run directory or one of its checkpoints")
    args = enc.build_args or {}
    why = None
    if type(enc) is not ViTEncoder:
        why = f"its encoder is {type(enc).__name__} ({enc.model_name}), not a plain ViT"
    elif args.get("pos_encoding", "sincos") != "sincos" or args.get("attention", "mha") != "mha":
        why = (f"it uses pos_encoding={args.get('pos_encoding')} / attention={args.get('attention')} (ViTMAE has "
               "fixed sin-cos positions and plain attention)")
    elif enc.img_size[0] != enc.img_size[1]:
        why = f"its images are {enc.img_size[0]}x{enc.img_size[1]} (ViTMAE builds square grids only)"
    if why:
        raise ExportFormatError(
            f"Hugging Face's ViTMAEForPreTraining cannot hold this model: {why}. Use `--format timm` (where timm "
            "has the family) or the maevit format (`maevit export SRC OUT.safetensors`)")


def _options(encoder: nn.Module) -> str:
    args = getattr(encoder, "build_args", None) or {}
    shown = {k: args[k] for k in ("pos_encoding", "attention") if k in args}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or f"family {type(encoder).__name__}"


def replace_folder(out_dir: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Write a folder with ``fill(tmp)`` and rename it onto ``out_dir``.

    An existing ``out_dir`` is replaced only if it is empty or an earlier model folder
    (it has ``config.json``); anything else is refused, so a typo never deletes a user's folder.

    Raises:
        FileExistsError: ``out_dir`` is a file, or a folder that is not a model folder.
    """
    out = Path(out_dir)
    if out.is_file():
        raise FileExistsError(f"{out} is a file; a model folder is written to a new or empty folder "
                              "(or over an earlier model folder)")
    old = None
    if out.is_dir() and any(out.iterdir()):
        if not (out / FOLDER_CONFIG).is_file():
            raise FileExistsError(f"{out} is a folder with other files in it (no {FOLDER_CONFIG}: not a model "
                                  "folder): choose a new or empty folder, so nothing of yours is replaced")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)  # moved aside, not deleted, until the new folder is in place
    try:
        atomic_write(out, fill, hidden=True)
    except BaseException:
        if old is not None and not out.exists():
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


__all__ = ["ExportFormatError", "write_timm_folder", "write_hf_folder", "timm_folder_line", "hf_folder_line",
           "replace_folder", "WEIGHTS_FILE", "CARD_FILE"]
