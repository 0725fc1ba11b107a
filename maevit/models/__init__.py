"""maevit models: the encoder contract, the registry, MAE, masking, patch and position utilities.

Importing this package registers every encoder family (one file each).
"""
from .classifier import create_classifier
from .contract import ContractError, check_encoder
from .mae import MAEDecoder, MAEOutput, MaskedAutoencoder, masked_mse_loss
from .masking import Mask, mask_from_noise, num_visible, random_masking
from .patch import grid_shape, patchify, unpatchify
from .pos_embed import sincos_2d
from .registry import (
    DecoderSize, ModelArgumentError, build_encoder, create_encoder, create_mae, family_defaults, list_models,
    model_info, register_model,
)
from .weights import CheckpointError, LoadReport, export_encoder, load_encoder_weights, load_mae_weights, read_header

# encoder families: importing a family file runs its registrations
from . import vit  # noqa: E402,F401  (isort: skip)
from . import sret  # noqa: E402,F401  (isort: skip)
from . import swin  # noqa: E402,F401  (isort: skip)
from . import hiera  # noqa: E402,F401  (isort: skip)
from . import hybrid, cvt  # noqa: E402,F401  (isort: skip)  convolutional ViTs (issue 11)
from . import deit  # noqa: E402,F401  (isort: skip)
from .vit import ViTEncoder  # noqa: E402

__all__ = [
    "ContractError", "check_encoder", "MAEDecoder", "MAEOutput", "MaskedAutoencoder", "masked_mse_loss", "Mask",
    "mask_from_noise", "num_visible", "random_masking", "grid_shape", "patchify", "unpatchify", "sincos_2d",
    "DecoderSize", "ModelArgumentError", "build_encoder", "create_encoder", "create_mae", "family_defaults",
    "list_models",
    "model_info", "register_model", "ViTEncoder", "create_classifier", "CheckpointError", "LoadReport",
    "export_encoder", "load_encoder_weights", "load_mae_weights", "read_header",
]
